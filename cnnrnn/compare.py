"""Compare finished runs: python -m cnnrnn.compare RUN_DIR_OR_GLOB ... [--out DIR] [--x epoch|time].

Reads each run's metrics.json, its config (.hydra/config.yaml, else checkpoints/last.pt) and its validation
curve (the history in checkpoints/last.pt), and writes into DIR `table.md` (single-label and multi-label runs in
a table each; also printed) and `curves.png` (every run's validation curve). A folder stands for every run below
it; runs that have not finished, or whose metrics.json is not a flat object of numbers, are left out with a
warning. DIR defaults to the one folder of runs given, else runs/compare/TIME; compare writes only into a new or
empty folder or one it wrote before, and never over a file it did not make.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cnnrnn.errors import UserError, fail, refusals
from cnnrnn.files import read_yaml, write_atomic
from cnnrnn.report import duration, markdown
from cnnrnn.rundir import RUN_MARKS, holds_run

log = logging.getLogger("cnnrnn")

DASH = "–"
OUTPUTS = ("table.md", "curves.png")
MARK = ".compare"  # in an output folder: the files compare wrote there, one per line


@dataclass
class Run:
    path: Path
    metrics: dict
    config: dict
    name: str = ""
    curve: list[tuple[int, float | None, float]] = field(default_factory=list)  # (epoch, seconds from start, value)

    @property
    def single(self) -> bool:
        """A single-label run (accuracy), else a multi-label one (F1 on composites)."""
        return "test/acc" in self.metrics

    @property
    def select(self) -> str:
        """The validation metric the run was selected on."""
        return "acc" if self.single else "f1_samples"

    @property
    def task(self) -> str:
        return str(self.config.get("task", DASH))


# --- finding runs -------------------------------------------------------------------------------------------

def _unfinished(folder: Path, more: int = 0) -> str:
    others = f" (and {more} more run{'s' if more > 1 else ''} like it)" if more else ""
    return (f"{folder} has no metrics.json{others}: the run is unfinished or failed; finish it with python -m "
            f"cnnrnn.train resume={folder}, or leave it out.")


def runs_in(path: Path) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run dirs a command-line path stands for: a run dir, its metrics.json, or a folder."""
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run dir (runs/TASK/TIME), a sweep folder or a glob.")
    if path.is_file():
        if path.name == "metrics.json":
            return [path.parent], []
        raise UserError(f"{path} is a file, not a run; give a run dir (runs/TASK/TIME), a sweep folder or a glob.")
    if holds_run(path):
        return ([path], []) if (path / "metrics.json").is_file() else ([], [path])
    # a reader trained inside a run (reader.cache=null: RUN/reader) is a stage of that run, not a run to compare
    below = sorted(d for d in {p.parent for pattern in RUN_MARKS for p in path.rglob(pattern)}
                   if not (d.name == "reader" and holds_run(d.parent)))
    if not below:
        raise UserError(f"{path} holds no run (no metrics.json in it or below it); give a run dir "
                        f"(runs/TASK/TIME) or a sweep folder.")
    done = [d for d in below if (d / "metrics.json").is_file()]
    return done, sorted(set(below) - set(done))


def find_runs(inputs: list[str]) -> list[Path]:
    """Every finished run dir named by the inputs (paths or globs), each once, in the order given; the unfinished
    ones are left out with a warning (an error if no run is left)."""
    found, unfinished = [], []
    for arg in inputs:
        paths = [Path(arg)]
        if not paths[0].exists() and glob.has_magic(arg):
            paths = [Path(p) for p in sorted(glob.glob(arg, recursive=True))]
            if not paths:
                raise UserError(f"{arg} matches nothing; give run dirs, a sweep folder or a glob that matches them.")
        for path in paths:
            done, not_done = runs_in(path)
            found, unfinished = found + done, unfinished + not_done
    if not found and unfinished:
        raise UserError(_unfinished(unfinished[0], len(unfinished) - 1))
    for folder in unfinished:
        log.warning("left out: %s", _unfinished(folder))
    unique = {}
    for run in found:
        unique.setdefault(run.resolve(), run)
    return list(unique.values())


# --- reading a run ------------------------------------------------------------------------------------------

def read_run(path: Path) -> Run | None:
    """The run (metrics, config, validation curve), or None (with a warning) when its metrics.json is not a JSON
    object."""
    from cnnrnn import checkpoint

    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        log.warning("left out: %s is not valid JSON (%s); recompute it with python -m cnnrnn.evaluate %s",
                    path / "metrics.json", exc, path)
        return None
    if not isinstance(metrics, dict):
        log.warning("left out: %s holds a %s, not an object of metrics", path / "metrics.json", type(metrics).__name__)
        return None
    # a number that is not one (a string, a list, a bool) would break the tables: only real numbers are kept
    kept = {k: v for k, v in metrics.items() if k in ("hardware", "oracle/ckpt") or isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}
    if len(kept) < len(metrics):
        log.warning("%s: %d entries that are not numbers left out", path / "metrics.json", len(metrics) - len(kept))
    hydra, file = path / ".hydra" / "config.yaml", path / "checkpoints" / "last.pt"
    config = read_yaml(hydra) if hydra.is_file() else None  # else the config last.pt carries
    last = checkpoint.load(file) if file.is_file() else {}
    if config is None and not last:
        log.warning("%s has neither .hydra/config.yaml nor checkpoints/last.pt: its task is unknown", path)
    elif config is None:
        config = checkpoint.entry(last, "config", dict, file)
    run = Run(path, kept, config or {})
    # the validation curve: (epoch, seconds since the run started, value) from the history in last.pt
    history = checkpoint.entry(checkpoint.entry(last, "state", dict, file), "history", list, file) if last else []
    tag = f"val/{run.select}"
    run.curve = [(h["epoch"], h.get("wall_s"), h[tag]) for h in history if isinstance(h, dict) and tag in h]
    if not run.curve:
        log.warning("%s: no val/%s curve in its checkpoints/last.pt", path, run.select)
    return run


def name_runs(runs: list[Run]) -> None:
    """Each run's name: its path below the folder all of them share (a sweep's job folders)."""
    paths = [str(r.path.resolve()) for r in runs]
    common = os.path.commonpath(paths) if len(runs) > 1 else str(runs[0].path.resolve().parent)
    for run, path in zip(runs, paths):
        run.name = os.path.relpath(path, common) if path != common else run.path.name


# --- tables -------------------------------------------------------------------------------------------------

def _num(value, fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def runs_table(runs: list[Run], single: bool) -> str:
    """Single-label or multi-label runs: size, epochs, best validation, test metrics, speed and hardware."""
    tests = [("test/acc", "**test acc**", ".2%")] if single else [
        ("test/f1_samples", "**test f1_samples**", ".4f"), ("test/exact_match", "exact match", ".4f"),
        ("test/f1_micro", "f1_micro", ".4f")]
    if not single and any("oracle/f1_samples" in r.metrics for r in runs):
        tests.append(("oracle/f1_samples", "tile oracle f1_samples", ".4f"))
    header = ["run", "task", "params", "epochs (best)", f"best val {'acc' if single else 'f1_samples'}",
              *[t[1] for t in tests], "ms/step", "wall", "hardware"]
    rows = []
    for r in runs:
        m = r.metrics
        epochs = f"{m['epochs']} ({m.get('best_epoch', DASH)})" if "epochs" in m else DASH
        rows.append([f"`{r.name}`", r.task, _num(m.get("params"), ","), epochs,
                     _num(m.get(f"val/{r.select}_best"), ".2%" if single else ".4f"),
                     *[_num(m.get(key), fmt) for key, _, fmt in tests], _num(m.get("train/ms_per_step"), ".1f"),
                     duration(m.get("wall_time_s")), str(m.get("hardware", DASH))])
    return markdown(header, rows, "ll" + "r" * (len(header) - 3) + "l")


def table(runs: list[Run]) -> str:
    """table.md: a table for the single-label runs and one for the multi-label runs (those present)."""
    parts = []
    for single, title in ((True, "Single-label runs (test items)"),
                          (False, "Multi-label runs (test composites)")):
        chosen = [r for r in runs if r.single == single]
        if chosen:
            parts.append(f"### {title}\n\n{runs_table(chosen, single)}\n")
    return "\n".join(parts)


# --- the command --------------------------------------------------------------------------------------------

def out_dir(inputs: list[str], out: str | None) -> Path:
    """--out, else the single folder of runs given, else runs/compare/TIME (a new folder); never a run dir, whose
    own curves.png would be overwritten, nor a folder of files that compare did not write."""
    if out is not None:
        folder = Path(out)
    elif len(inputs) == 1 and Path(inputs[0]).is_dir() and not holds_run(Path(inputs[0])):
        folder = Path(inputs[0])
    else:
        folder = Path("runs") / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; give a folder for table.md and curves.png.")
    if holds_run(folder) or any(folder.glob(".*.lock")):
        raise UserError(f"--out {folder} is a run dir or a cache of readers, whose own files this could overwrite; "
                        f"choose another folder with --out.")
    ours = set((folder / MARK).read_text(errors="replace").split()) if (folder / MARK).is_file() else set()
    theirs = [n for n in OUTPUTS if (folder / n).exists() and n not in ours] + sorted(ours - set(OUTPUTS))
    if theirs:
        raise UserError(f"--out {folder} holds a {theirs[0]} that compare did not write, or a {MARK} of another "
                        f"tool; choose a new folder with --out, so that nothing of yours is overwritten.")
    above = folder  # the folder is made at the end: check now that it can be, before the runs are read
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"--out {folder}: {above} is a file, not a folder; choose another folder with --out.")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"--out {folder} cannot be written (permission denied); choose a folder you can write to "
                        f"with --out.")
    return folder


def compare(inputs: list[str], out: str | None = None, x: str = "epoch") -> dict[str, Path]:
    """Write table.md and curves.png for these runs; returns what was written."""
    from cnnrnn import viz

    folder = out_dir(inputs, out)
    runs = [run for run in map(read_run, find_runs(inputs)) if run is not None]
    if not runs:
        raise UserError(f"none of {' '.join(inputs)} has a readable metrics.json; recompute them with python -m "
                        f"cnnrnn.evaluate RUN_DIR.")
    name_runs(runs)
    series = {}
    for r in runs:
        points = [(e if x == "epoch" else s / 60, v) for e, s, v in r.curve if x == "epoch" or s is not None]
        series.setdefault(f"val {r.select}", []).append((r.name, [p[0] for p in points], [p[1] for p in points]))
    text = table(runs)
    write_atomic(folder / MARK, "\n".join(OUTPUTS) + "\n")  # first: what follows is compare's to replace
    write_atomic(folder / "table.md", text)
    viz.save(viz.compare_curves(series, "epoch" if x == "epoch" else "wall time (min)"), folder / "curves.png")
    print(text, end="")
    return {name: folder / name for name in OUTPUTS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run dirs, sweep folders or globs (quoted, e.g. 'runs/cnn/*')")
    parser.add_argument("--out", help="folder for table.md and curves.png (default: the single folder of runs "
                                      "given, else runs/compare/TIME)")
    parser.add_argument("--x", choices=("epoch", "time"), default="epoch", help="the curves' x axis")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # ours only: the libraries' INFO messages are not for the user
    try:
        with refusals():
            written = compare(args.runs, args.out, args.x)
    except KeyboardInterrupt:
        fail("Interrupted; table.md and the figures may be incomplete.", 130)
    log.info("wrote %s", ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
