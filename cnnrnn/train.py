"""Train a model: python -m cnnrnn.train task=lstm|lstm2|cnn|reader|multilabel|multilabel_bce [key=value ...]

The command line is composed once and checked (one sentence for a bad key, value or folder) before any folder
exists, then stages.run(cfg, folder) trains. With -m, a Hydra sweep whose every job is checked before its folder
is made. resume=RUN_DIR continues a stopped run exactly as it was configured."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from cnnrnn import build, checkpoint, rundir, shell, stages, training
from cnnrnn.config import Config, from_dict
from cnnrnn.errors import UserError, fail, refusal, refusals
from cnnrnn.files import read_yaml, write_atomic
from cnnrnn.ranks import Stopped, cores, process_rank, processes_sharing_cores, share_of_cores

log = logging.getLogger("cnnrnn")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        if any(a in ("--cfg", "-c") for a in argv):  # what it prints must be a config the project accepts
            values = [a for i, a in enumerate(argv) if a in ("-m", "--multirun") or not a.startswith("-") and (
                i == 0 or argv[i - 1] not in ("--cfg", "-c", "--package", "-p", "--info", "-i"))]
            with refusals():
                for overrides in shell.parse(values).jobs:
                    shell.job_config(overrides)
        return shell.sweep(argv, job)  # --help, --cfg job, --info: Hydra's own answers
    signal.signal(signal.SIGTERM, _raise_stopped)  # before the loop's own handling: a clean refusal, not a kill
    rank, claim, saved = process_rank(), None, None
    try:
        with refusals():
            command = shell.parse(argv)
            if command.multirun:
                return start_sweep(argv, command)
            cfg, folder, _ = shell.job_config(command.jobs[0])
            folder = os.path.abspath(folder)
            if cfg.resume is not None:
                cfg, folder, saved, claim = continue_run(cfg, command, lock=rank == 0)
            else:
                build.preflight(cfg)
                stages.check(cfg)
                if rank == 0:  # last, so that a command refused above has created nothing
                    claim = claim_folder(folder, "hydra.run.dir", command.hydra)
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
        name = path if n == 1 else f"{path}-{n}"
        try:
            return rundir.claim(name, key)
        except UserError:
            if key in given or n == 9 or not Path(name).is_dir():
                raise


def run_in(cfg: Config, folder: Path, saved: dict | None, claim: rundir.Claim | None, overrides: list[str],
           rank: int) -> None:
    """Train in the claimed folder; a refusal or an interrupt before the first checkpoint leaves nothing behind."""
    if claim is not None:
        folder = claim.path
    shell.log_to(folder if rank == 0 else None, logging.INFO if rank == 0 else logging.ERROR)
    cfg, needed = stages.prepare(cfg, folder)
    if rank == 0 and cfg.resume is None:
        write_atomic(folder / ".hydra" / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_atomic(folder / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides))
    elif rank == 0 and saved is None:  # started again: the killed try's TensorBoard points go
        for events in folder.glob("events.out.tfevents.*"):
            events.unlink()
    use_share_of_cores(cfg.trainer.threads)
    code = 0
    try:
        stages.run(cfg, folder, saved, needed)
    except (UserError, OSError) as exc:
        if refusal(exc) is None:
            raise
        log.error("%s", refusal(exc))
        code = 2
    except (KeyboardInterrupt, Stopped) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        log.error("Stopped by %s before the first checkpoint of %s; nothing of it was saved, so the same command "
                  "starts it again.", signal.Signals(signum).name, folder)
        code = 128 + signum
    except SystemExit as exc:  # a stop signal in the loop: it said how to continue
        code = exc.code if isinstance(exc.code, int) else 1
    kept = any(folder.glob("checkpoints/last.pt")) or any(folder.glob(".*.partial/checkpoints/last.pt"))
    if code and claim is not None and cfg.resume is None and not kept:
        claim.remove_all()  # a refused run leaves no folder it created
    elif claim is not None:
        claim.release()
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
    """(config, folder, last.pt or None, claim) of a resumed run, or a sentence: an override that differs from the
    run's own value is refused (for a finished run too, where it would change nothing). A run stopped before its
    first checkpoint starts again in its folder, with its .hydra/config.yaml."""
    folder = Path(cfg.resume)
    if not cfg.resume.strip() or not folder.is_dir():
        raise UserError(f"resume={cfg.resume} is not a folder; give the run dir to continue (runs/TASK/TIME).")
    if "hydra.run.dir" in command.hydra:
        raise UserError("resume continues the run in its own folder; drop hydra.run.dir.")
    last, record = folder / "checkpoints" / "last.pt", folder / ".hydra" / "config.yaml"
    saved = checkpoint.load(last) if last.is_file() else None
    if saved is not None:
        for key in ("config", "model", "optimizer", "scheduler", "rng", "state"):  # every field a resumed run reads
            checkpoint.entry(saved, key, dict, last)
        old = saved["config"]
        if set(saved["state"]) != {f.name for f in dataclasses.fields(training.TrainState)}:
            raise UserError(f"{last} holds a loop state of another version; start that run again without resume.")
    elif record.is_file():
        old = read_yaml(record)
    else:
        raise UserError(f"resume={folder} has neither checkpoints/last.pt nor .hydra/config.yaml, so it is no run "
                        f"folder of cnnrnn; give the folder of a run.")
    done = (folder / "metrics.json").is_file()
    check_unchanged(command.jobs[0], cfg.to_dict(), old, folder, done)
    if done:
        print(f"Run {folder} is finished (results in {folder / 'metrics.json'}); nothing to do.", file=sys.stderr)
        raise SystemExit(0)
    kept = from_dict({**old, "resume": cfg.resume})
    if saved is not None and record.is_file() and read_yaml(record) != old:
        log.warning("%s differs from the config in %s, which the resumed run follows", record, last)
    return kept, folder, saved, rundir.lock_existing(folder) if lock else None


def check_unchanged(overrides: list[str], mine: dict, old: dict, folder: Path, done: bool) -> None:
    """Refuse an override of a resumed run whose value differs from the run's own."""
    for line in overrides:
        key = line.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra") or key == "resume" or "/" in key:
            continue
        new, was = mine, old
        for part in key.split("."):
            new = new.get(part) if isinstance(new, dict) else None
            was = was.get(part) if isinstance(was, dict) else None
        if new != was:
            what = (f"is a finished run (results in {folder / 'metrics.json'}), so {key}={new} (its {was}) would "
                    f"change nothing" if done else
                    f"continues that run as it was configured, but {key}={new} differs from its {was}")
            raise UserError(f"resume={folder} {what}; drop {key}, or start a new run with it.")


def start_sweep(argv: list[str], command: shell.Command) -> None:
    """Check every job of the sweep (those of an experiment file's sweeper too) and the folder each will write,
    claim the sweep's folder, then let Hydra launch the jobs."""
    if any(line.startswith("resume=") for job in command.jobs for line in job):
        raise UserError("resume continues one run; drop -m.")
    _, folder, params = shell.job_config(command.jobs[0], "hydra.sweep.dir")
    folder = os.path.abspath(folder)
    extra = shell.parse(["-m", *(f"{k}={v}" for k, v in params.items())]).jobs if params else [[]]
    jobs = [[*more, *overrides] for overrides in command.jobs for more in extra]
    folders: dict[str, int] = {}
    for num, overrides in enumerate(jobs):
        cfg, job_folder, _ = shell.job_config([*overrides, f"hydra.sweep.dir={folder}"], "hydra.sweep.subdir", num)
        build.preflight(cfg)
        stages.check(cfg)
        job_folder = os.path.realpath(os.path.join(folder, job_folder))
        if os.path.commonpath([job_folder, os.path.realpath(folder)]) != os.path.realpath(folder):
            raise UserError(f"hydra.sweep.subdir puts job {num} in {job_folder}, outside the sweep folder {folder}; "
                            f"give a relative path that stays inside it, such as the default.")
        if job_folder in folders:
            raise UserError(f"jobs {folders[job_folder]} and {num} of this sweep would share the folder {job_folder}; "
                            f"keep ${{hydra.job.num}} in hydra.sweep.subdir so that every job gets its own.")
        folders[job_folder] = num
    claim = claim_folder(folder, "hydra.sweep.dir", command.hydra)
    pinned = [a for a in argv if not a.lstrip("+").startswith(("hydra.sweep.dir=", "hydra.output_subdir="))]
    try:
        shell.sweep([*pinned, f"hydra.sweep.dir={claim.path}", "hydra.output_subdir=null"],
                    functools.partial(job, total=len(jobs)))
    except SystemExit as exc:
        if exc.code:
            claim.remove_if_unused()
        raise


def job(cfg: Config, folder: Path, n_jobs: int | None, sweep_dir: Path, num: int, overrides: list[str],
        total: int = 1) -> None:
    """One job of a sweep, in the folder Hydra made for it inside the claimed sweep folder: checked and locked
    before anything is written there."""
    try:
        inside = os.path.commonpath([os.path.realpath(folder), os.path.realpath(sweep_dir)])
        if inside != os.path.realpath(sweep_dir):
            raise UserError(f"job {num} would write into {folder}, outside the sweep folder {sweep_dir}; give "
                            f"hydra.sweep.subdir a relative path that stays inside it.")
        claim = rundir.lock_job(folder)
    except UserError as exc:
        fail(f"{str(exc).rstrip('.')}; job {num} and the {total - num - 1} after it did not run.")
    shell.log_to(folder)
    write_atomic(folder / ".hydra" / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_atomic(folder / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides))
    use_share_of_cores(cfg.trainer.threads, n_jobs)
    try:
        stages.run(cfg, folder)
    except (UserError, OSError) as exc:  # a path too long for the file system is refused like the rest
        if refusal(exc) is None:
            raise
        log.error("%s; the jobs after job %d of %d did not run.", refusal(exc).rstrip("."), num, total)
        raise SystemExit(2) from None
    finally:
        claim.release()


if __name__ == "__main__":
    main()
