"""The context experiment's table and figure (docs/context.md), from the runs of its sweep:

    python -m cnnrnn.train -m +experiment=context          # six jobs into runs/context/TIME
    python docs/experiments/context.py runs/context/TIME   # context.md and context.png beside them

Test f1_samples and exact match per model (decoder, decoder without label feedback, BCE) and data.degrade level,
beside the tile oracle, which scores the very same test composites. Runs are found and read as
`python -m cnnrnn.compare` reads them.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from cnnrnn import viz
from cnnrnn.compare import find_runs, read_run
from cnnrnn.files import write_atomic
from cnnrnn.report import markdown

ARMS = ("decoder", "decoder, no feedback", "BCE")  # the rows, in this order
ORACLE = "tile oracle"
KEYS = ("test/f1_samples", "test/exact_match", "test/grounding")


def arm(run) -> str:
    if run.task == "multilabel_bce":
        return "BCE"
    return "decoder" if run.config.get("model", {}).get("feedback", True) else "decoder, no feedback"


def degrade(run) -> float:
    return float(run.config.get("data", {}).get("degrade", 0.0))


def groups(runs) -> tuple[list[float], dict[str, dict[float, dict[str, float]]]]:
    """Degrade levels and {row: {level: {metric: mean over the runs of that row and level}}}."""
    multi = [r for r in runs if not r.single]
    levels = sorted({degrade(r) for r in multi})
    grouped: dict[str, dict[float, list]] = {}
    for r in multi:
        grouped.setdefault(arm(r), {}).setdefault(degrade(r), []).append(r)
    rows = {label: {level: {k: statistics.mean(m.metrics[k] for m in members) for k in KEYS
                            if all(k in m.metrics for m in members)}
                    for level, members in grouped[label].items()}
            for label in [*[a for a in ARMS if a in grouped], *[a for a in grouped if a not in ARMS]]}
    # the oracle scores the same test composites for every arm of a level: the first run that has it
    oracle = {}
    for level in levels:
        first = next((r for r in multi if degrade(r) == level and "oracle/f1_samples" in r.metrics), None)
        if first is not None:
            oracle[level] = {"test/f1_samples": first.metrics["oracle/f1_samples"],
                             "test/exact_match": first.metrics.get("oracle/exact_match")}
    if oracle:
        rows[ORACLE] = oracle
    return levels, rows


def table(levels: list[float], rows: dict) -> str:
    metrics = [("test/f1_samples", "f1_samples"), ("test/exact_match", "exact match")]
    if any("test/grounding" in cell for row in rows.values() for cell in row.values()):
        metrics.append(("test/grounding", "grounding"))
    header = ["model", *[f"{name} (degrade {level:g})" for level in levels for _, name in metrics]]
    body = [[label, *["–" if row.get(level, {}).get(key) is None else f"{row[level][key]:.4f}"
                      for level in levels for key, _ in metrics]] for label, row in rows.items()]
    return ("### Context: test metrics by data.degrade\n\nEvery model scores the same test composites at each level; "
            "the tile oracle is the per-item reader on each occupied cell, told the layout (no context).\n\n"
            + markdown(header, body, "l" + "r" * len(header[1:])) + "\n")


def figure(levels: list[float], rows: dict):
    fig, ax = viz._subplots(figsize=(6, 4))
    for label, row in rows.items():
        points = [(x, row[x]["test/f1_samples"]) for x in levels if row.get(x, {}).get("test/f1_samples") is not None]
        if points:
            ax.plot(*zip(*points), "--" if label == ORACLE else "-o", ms=4, label=label,
                    color="gray" if label == ORACLE else None)
    ax.set_xticks(levels)
    ax.set_xlabel("degrade strength (data.degrade)")
    ax.set_ylabel("test f1_samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    levels, rows = groups([r for r in map(read_run, find_runs([str(folder)])) if r is not None])
    text = table(levels, rows)
    write_atomic(folder / "context.md", text)
    viz.save(figure(levels, rows), folder / "context.png")
    print(text, end="")
