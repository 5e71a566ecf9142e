"""Train a model: python -m cnnrnn.train task=lstm|lstm2|cnn|reader|multilabel|multilabel_bce [key=value ...]

The command line is composed once and checked (one sentence for a bad key, value or folder, before any folder
exists), then the core trains: stages.run(cfg, folder). With -m, a Hydra sweep: every job is checked before
the sweep's folder is made. resume=RUN_DIR continues a stopped run exactly as it was configured.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from cnnrnn import build, checkpoint, rundir, shell, stages, training
from cnnrnn.config import Config, from_dict
from cnnrnn.errors import UserError, fail
from cnnrnn.files import write_atomic
from cnnrnn.ranks import Stopped, cores, process_rank, processes_sharing_cores, share_of_cores

log = logging.getLogger("cnnrnn")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return shell.sweep(argv, job)  # --help, --cfg job, --info: Hydra's own answers
    signal.signal(signal.SIGTERM, _raise_stopped)  # before the loop's own handling: a clean refusal, not a kill
    rank, claim, saved = process_rank(), None, None
    try:
        command = shell.parse(argv)
        if command.multirun:
            return start_sweep(argv, command)
        cfg, folder, _ = shell.job_config(command.jobs[0])
        if cfg.resume:
            cfg, folder, saved, claim = continue_run(cfg, command, lock=rank == 0)
        else:
            build.preflight(cfg)
            if rank == 0:  # last, so that a command refused above has created nothing
                claim = claim_folder(folder, "hydra.run.dir", command.hydra)
    except UserError as exc:
        fail(str(exc))
    except (KeyboardInterrupt, Stopped) as exc:  # while the command line is checked: nothing exists yet
        signum = getattr(exc, "signum", signal.SIGINT)
        if claim is not None:
            claim.remove_all()
        fail(f"Stopped by {signal.Signals(signum).name} before the run started; nothing was created.", 128 + signum)
    run_in(cfg, Path(folder), saved, claim, command.jobs[0], rank)


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def claim_folder(path: str, key: str, given: dict) -> rundir.Claim:
    """Claim a new run's (or sweep's) folder: a default (timestamped) one taken by a run started in the same
    second gets the next free name; one the user chose is refused if taken."""
    for n in range(1, 10):
        try:
            return rundir.claim(path if n == 1 else f"{path}-{n}", key)
        except UserError:
            if key in given or n == 9 or not Path(path if n == 1 else f"{path}-{n}").is_dir():
                raise
    raise AssertionError("unreachable")


def run_in(cfg: Config, folder: Path, saved: dict | None, claim: rundir.Claim | None, overrides: list[str],
           rank: int) -> None:
    """Train in the claimed folder; a refusal or an interrupt before the first checkpoint leaves nothing behind."""
    if claim is not None:
        folder = claim.path
    shell.log_to(folder if rank == 0 else None, logging.INFO if rank == 0 else logging.ERROR)
    cfg, needed = stages.prepare(cfg, folder)
    if rank == 0 and saved is None:
        write_atomic(folder / ".hydra" / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_atomic(folder / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides))
    use_share_of_cores(cfg.trainer.threads)
    code = 0
    try:
        stages.run(cfg, folder, saved, needed)
    except UserError as exc:
        log.error("%s", exc)
        code = 2
    except (KeyboardInterrupt, Stopped) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        log.error("Stopped by %s before the first checkpoint of %s; nothing of it was saved, so the same command "
                  "starts it again.", signal.Signals(signum).name, folder)
        code = 128 + signum
    except SystemExit as exc:  # a stop signal in the loop: it said how to continue
        code = exc.code if isinstance(exc.code, int) else 1
    if code and claim is not None and saved is None and not (folder / "checkpoints" / "last.pt").is_file():
        claim.remove_all()  # a refused run leaves no folder it created
    if rank != 0:  # gloo's threads abort the interpreter's teardown now and then: leave without it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)


def use_share_of_cores(threads: int | None, n_jobs: int | None = None) -> None:
    """Set this process's share of the cores when it runs beside others (torchrun, a sweep's parallel jobs)."""
    share = share_of_cores(threads, n_jobs)
    if share:
        import torch
        torch.set_num_threads(share)
        log.info("%d threads: this machine's %d cores shared by %d processes", share, cores(),
                 processes_sharing_cores(n_jobs))


def continue_run(cfg: Config, command: shell.Command, lock: bool):
    """(config, folder, last.pt, claim) of a resumed run, or a sentence: an override that differs from the run's
    own value is refused (for a finished run too, where it would change nothing)."""
    folder = Path(cfg.resume)
    last = folder / "checkpoints" / "last.pt"
    if not folder.is_dir():
        raise UserError(f"resume={folder} is not a folder; give the run dir to continue (runs/TASK/TIME).")
    if not last.is_file():
        raise UserError(f"resume={folder} has no checkpoints/last.pt (it stopped before its first checkpoint); "
                        f"start that run again without resume.")
    saved = checkpoint.load(last)
    old = checkpoint.entry(saved, "config", dict, last)
    for key in ("model", "optimizer", "scheduler", "rng", "state"):  # every field a resumed run reads
        checkpoint.entry(saved, key, dict, last)
    if set(saved["state"]) != {f.name for f in dataclasses.fields(training.TrainState)}:
        raise UserError(f"{last} holds a loop state of another version; start that run again without resume.")
    done = (folder / "metrics.json").is_file()
    mine = cfg.to_dict()
    for line in command.jobs[0]:
        key = line.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra") or key == "resume" or "/" in key:
            continue
        new, was = mine, old
        for part in key.split("."):
            new = new.get(part) if isinstance(new, dict) else None
            was = was.get(part) if isinstance(was, dict) else None
        if new != was:
            what = (f"is a finished run ({saved['state']['epoch']} epochs; results in {folder / 'metrics.json'}), so "
                    f"{key}={new} (its {was}) would change nothing" if done else
                    f"continues that run as it was configured, but {key}={new} differs from its {was}")
            raise UserError(f"resume={folder} {what}; drop {key}, or start a new run with it.")
    if done:
        print(f"Run {folder} is finished ({saved['state']['epoch']} epochs; results in {folder / 'metrics.json'}); "
              f"nothing to do.", file=sys.stderr)
        raise SystemExit(0)
    kept = from_dict({**old, "resume": cfg.resume})
    edited = folder / ".hydra" / "config.yaml"
    if edited.is_file() and yaml.safe_load(edited.read_text()) != old:
        log.warning("%s differs from the config in %s, which the resumed run follows", edited, last)
    return kept, folder, saved, rundir.lock_existing(folder) if lock else None


def start_sweep(argv: list[str], command: shell.Command) -> None:
    """Check every job of the sweep (those of an experiment file's sweeper too), claim the sweep's folder, then
    let Hydra launch the jobs."""
    if any(line.startswith("resume=") for job in command.jobs for line in job):
        raise UserError("resume continues one run; drop -m.")
    subdir = command.hydra.get("hydra.sweep.subdir", "")
    if subdir.split("=", 1)[-1].startswith("/") or ".." in subdir:
        raise UserError(f"{subdir} must stay inside the sweep folder: a relative path without '..'.")
    _, folder, params = shell.job_config(command.jobs[0], "hydra.sweep.dir")
    extra = shell.parse(["-m", *(f"{k}={v}" for k, v in params.items())]).jobs if params else [[]]
    for overrides in command.jobs:
        for more in extra:
            build.preflight(shell.job_config([*more, *overrides], "hydra.sweep.dir")[0])
    claim = claim_folder(folder, "hydra.sweep.dir", command.hydra)
    pinned = [a for a in argv if not a.lstrip("+").startswith("hydra.sweep.dir=")]
    try:
        shell.sweep([*pinned, f"hydra.sweep.dir={claim.path}"], job)
    except SystemExit as exc:
        if exc.code:
            claim.remove_if_unused()
        raise


def job(cfg: Config, folder: Path, n_jobs: int | None) -> None:
    """One job of a sweep, in the folder Hydra made for it inside the claimed sweep folder."""
    shell.log_to(folder)
    try:
        claim = rundir.lock_job(folder)
    except UserError as exc:
        fail(str(exc))
    use_share_of_cores(cfg.trainer.threads, n_jobs)
    try:
        stages.run(cfg, folder)
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    finally:
        claim.release()


if __name__ == "__main__":
    main()
