"""A refused input is one line on stderr and an exit status, never a traceback."""
from __future__ import annotations

import pytest

from cnnrnn.errors import UserError, fail


def test_fail_prints_one_error_line_and_exits_with_its_code(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fail("data.grid=17 must be from 1 to 16.")
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: data.grid=17 must be from 1 to 16.\n"
    with pytest.raises(SystemExit) as exit_info:
        fail("Stopped by SIGTERM before the run started; nothing was created.", 143)
    assert exit_info.value.code == 143


def test_a_user_error_is_an_ordinary_exception_carrying_its_sentence():
    assert issubclass(UserError, Exception) and str(UserError("one sentence.")) == "one sentence."
