"""How numbers are shown to a person: durations and tables."""
from __future__ import annotations


def duration(seconds: float | None) -> str:
    """About how long, for a person: '40 s', '12.5 min', '1.5 h' ('–' for None)."""
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def markdown(header: list[str], rows: list[list[str]], align: str) -> str:
    """A Markdown table; align holds 'l' or 'r' per column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
