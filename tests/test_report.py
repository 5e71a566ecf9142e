"""report: durations and tables as a person reads them."""
from cnnrnn.report import duration, markdown


def test_a_duration_reads_as_a_person_would_say_it():
    assert [duration(s) for s in (None, 40, 89.6, 720, 5399, 5400, 9000)] == [
        "–", "40 s", "90 s", "12.0 min", "90.0 min", "1.5 h", "2.5 h"]


def test_a_markdown_table_aligns_its_columns_as_asked():
    assert markdown(["run", "acc"], [["a", "0.9"]], "lr") == "| run | acc |\n|---|---:|\n| a | 0.9 |"
