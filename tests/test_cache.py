"""The checked cache: locks that follow no link, entries published whole, a read-only cache still serving."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from cnnrnn.cache import Cache, locked, open_lock
from cnnrnn.errors import UserError


def test_a_link_planted_as_the_lock_file_is_refused_and_its_target_untouched(tmp_path):
    mine = tmp_path / "precious.txt"
    mine.write_text("keep me")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".e.lock").symlink_to(mine)
    with pytest.raises(UserError, match=r"reader.cache: the lock file .*\.e\.lock is a link; remove it"):
        with Cache(tmp_path / "cache", "reader.cache").building("e"):
            pass
    assert mine.read_text() == "keep me"
    with pytest.raises(UserError, match="is not a lock file of ours"):
        Cache(tmp_path / "cache", "reader.cache").check("e")


def test_a_lock_path_that_is_a_folder_or_not_writable_is_one_sentence(tmp_path):
    (tmp_path / ".e.lock").mkdir()
    with pytest.raises(UserError, match="is a folder; remove it"):
        open_lock(tmp_path / ".e.lock", "reader.cache")
    with pytest.raises(UserError, match="is not a lock file of ours"):
        Cache(tmp_path, "reader.cache").check("e")
    existing = tmp_path / ".f.lock"
    existing.write_text("123\n")
    os.close(open_lock(existing, "reader.cache"))
    assert existing.read_text() == "123\n"                       # opened, never truncated by the opening


def test_an_entry_is_published_whole_and_an_interrupted_one_is_continued(tmp_path):
    cache = Cache(tmp_path / "c", "data.cache")
    with pytest.raises(KeyboardInterrupt), cache.building("e") as partial:
        (partial / "half").write_text("1")
        raise KeyboardInterrupt
    assert not cache.done("e") and (cache.partial("e") / "half").is_file()   # no half entry, the work kept
    with cache.building("e") as partial:
        assert (partial / "half").is_file()
        (partial / "whole").write_text("2")
    assert cache.done("e") and sorted(p.name for p in cache.entry("e").iterdir()) == ["half", "whole"]
    with cache.building("e") as partial:
        assert partial is None                                   # published meanwhile: nothing to build


def test_a_read_only_cache_serves_what_it_has_and_refuses_what_it_would_build(tmp_path):
    cache = Cache(tmp_path / "ro", "reader.cache")
    with cache.building("have"):
        pass
    os.chmod(tmp_path / "ro", 0o555)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user who writes anywhere (root)")
        cache.check("have")
        with pytest.raises(UserError, match="cannot be written, and missing is not in it yet"):
            cache.check("missing")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        Cache(tmp_path / "file" / "sub", "reader.cache").check("e")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UserError, match="cannot be used"):
        Cache(tmp_path / "loop", "reader.cache").check("e")


def test_a_second_process_says_it_waits_and_for_whom(tmp_path, caplog):
    entered = threading.Event()

    def hold():
        with locked(tmp_path / ".entry.lock", "data.cache"):
            entered.set()
            time.sleep(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait()
    with caplog.at_level(logging.INFO, "cnnrnn"), locked(tmp_path / ".entry.lock", "data.cache"):
        pass
    holder.join()
    assert f"waiting for process {os.getpid()}, which is building entry" in caplog.text
