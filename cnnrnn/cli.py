"""Hydra glue for the entry points: compose configs in-process, check a command line before any work starts,
and run a function under @hydra.main with user errors shown as one sentence. Only entry points import this."""
from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from cnnrnn import rundir
from cnnrnn.config import CONFIG_DIR, Config, from_dict
from cnnrnn.errors import UserError
log = logging.getLogger("cnnrnn")
RANK_SCRATCH: Path | None = None  # the throw-away run dir of a rank other than 0 (train.leave_rank removes it)


def compose(overrides: list[str], with_hydra: bool = False):
    """The composed DictConfig for these overrides, as `python -m cnnrnn.train` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose("train", overrides=overrides, return_hydra_config=with_hydra)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=with_hydra)


def _unresolvable(exc: Exception, key: str | None = None) -> UserError:
    where = key or getattr(exc, "full_key", None) or "a value"
    return UserError(f"Cannot resolve {where} ({str(exc).splitlines()[0].rstrip('.')}); give it a plain value, or "
                     f"an interpolation of a key that exists.")


def config_from(dcfg) -> Config:
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    try:
        values = OmegaConf.to_container(dcfg, resolve=True)
    except InterpolationResolutionError as exc:  # '${nope}', '${oc.env:UNSET}' ...
        raise _unresolvable(exc) from None
    values.pop("hydra", None)
    return from_dict(values)


def compose_config(overrides: list[str]) -> Config:
    """A validated Config from command-line style overrides (tests, the oracle, bench)."""
    return config_from(compose(overrides))


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        keys += _all_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def _explain(exc: Exception, overrides: list[str]) -> str:
    """One sentence for a composition error from Hydra."""
    from omegaconf import OmegaConf

    text = str(exc)
    group = re.search(r"Could not find '(\w+)/([^']*)'", text)
    if group:
        options = sorted(p.stem for p in (CONFIG_DIR / group[1]).glob("*.yaml"))
        close = difflib.get_close_matches(group[2], options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"Unknown {group[1]} '{group[2]}'{hint}; choose one of {', '.join(options)}."
    key = re.search(r"Could not (?:override|append to|delete from) '([^']+)'|Key '([^']+)' is not in struct", text)
    if key:
        name = key[1] or key[2]
        known = _all_keys(OmegaConf.to_container(compose([o for o in overrides if o.startswith("task=")])))
        parent, _, leaf = name.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        if siblings:  # a known group: suggest among its own keys only
            close = [f"{parent + '.' if parent else ''}{c}" for c in difflib.get_close_matches(leaf, siblings, n=1)]
        else:
            close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"Unknown config key '{name}'{hint}; `python -m cnnrnn.train --cfg job` lists every key."
    return f"Cannot compose the config from {' '.join(overrides)}: {text.splitlines()[0]}"


# The folder this process claimed (a new run's or sweep's, or the resumed run's); held until the process ends.
_CLAIM: rundir.Claim | None = None
_RESUMED = False


def _output_dir(overrides: list[str], key: str) -> str:
    """hydra.run.dir or hydra.sweep.dir as Hydra will resolve it (interpolations, ${now:...}), made absolute."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    previous = HydraConfig.instance().cfg
    try:
        composed = compose(overrides, with_hydra=True)
        HydraConfig.instance().set_config(composed)  # for ${hydra:...} in the path
        return os.path.abspath(str(OmegaConf.select(composed, key, throw_on_missing=True)))
    except OmegaConfBaseException as exc:
        raise _unresolvable(exc, key) from None
    finally:
        HydraConfig.instance().cfg = previous


def _quote(path: str) -> str:
    """A path as a Hydra override value (quoted unless plain)."""
    if re.fullmatch(r"[\w/.+:-]+", path):
        return path
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _claim_output(argv: list[str], overrides: list[str], hydra_args: dict) -> list[str]:
    """Claim the run's (or sweep's) real folder before Hydra writes anything there, and pin Hydra to it (a second
    ${now:...} could differ by a second); a folder taken by a run, another process or other files is refused."""
    global _CLAIM
    sweep = any(a in ("-m", "--multirun") for a in argv) or str(hydra_args.get("hydra.mode")) == "MULTIRUN"
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    path = _output_dir(overrides, key)
    chosen = key in hydra_args
    for n in range(1, 10):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            _CLAIM = rundir.claim(candidate, key)
            break
        except UserError:
            # a default (timestamped) folder taken by a run started in the same second: the next free name
            if chosen or n == 9 or not Path(candidate).is_dir():
                raise
    pinned = [a for a in argv if not re.match(rf"\+{{0,2}}{re.escape(key)}=", a)]
    return pinned + [f"{key}={_quote(str(_CLAIM.path))}"]


def check_command_line(argv: list[str]) -> list[str]:
    """Refuse a bad command line before Hydra creates anything; return argv, completed for resume and ranks."""
    global RANK_SCRATCH
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return argv  # --help, --cfg, --info ...: Hydra's own
    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as exc:
        raise UserError(f"Cannot parse the command line ({str(exc).splitlines()[0]}); write key=value pairs, "
                        f"e.g. task=cnn trainer.epochs=5.") from None
    plain, hydra_args, hydra_lines = [], {}, []
    for o in parsed:
        first = o.input_line
        if o.is_sweep_override():  # check the first job of a sweep; every job validates itself again
            first = f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
        if o.key_or_group.startswith("hydra"):
            hydra_args[o.key_or_group] = o.value()
            hydra_lines.append(first)
        else:
            plain.append(first)
    try:
        composed = compose(plain)
    except Exception as exc:
        raise UserError(_explain(exc, plain)) from None
    cfg = config_from(composed)
    rank = int(os.environ.get("RANK", "0"))
    if cfg.resume:
        argv = argv + check_resume(cfg, composed, parsed, lock=rank == 0)
    else:
        from cnnrnn.build import preflight
        preflight(cfg)
        if rank == 0:  # last, so that a command refused above has created nothing
            argv = _claim_output(argv, plain + hydra_lines, hydra_args)
    if rank > 0:  # only rank 0 writes a run dir and logs
        RANK_SCRATCH = Path(tempfile.mkdtemp(prefix="cnnrnn-rank"))
        argv = argv + [f"hydra.run.dir={RANK_SCRATCH}", "hydra.output_subdir=null",
                       "hydra/job_logging=disabled"]
    return argv


# Keys a resume may change: they shape no training, and a bad oracle.ckpt could otherwise never be fixed.
RESUME_FREE = ("oracle.ckpt",)


def check_resume(cfg: Config, composed, parsed, lock: bool = True) -> list[str]:
    """Overrides that make Hydra write into the resumed run (without touching its .hydra/), or an error.
    An override that differs from the run's own value is refused, for a finished run too (where it would
    silently change nothing), except RESUME_FREE keys."""
    global _CLAIM, _RESUMED
    from omegaconf import OmegaConf

    from cnnrnn.build import preflight
    from cnnrnn.engine import load_checkpoint

    folder = Path(cfg.resume)
    last = folder / "checkpoints" / "last.pt"
    if not folder.is_dir():
        raise UserError(f"resume={folder} is not a folder; give the run dir to continue (runs/TASK/TIME).")
    if not last.is_file():
        raise UserError(f"resume={folder} has no checkpoints/last.pt (it stopped before its first checkpoint); "
                        f"start that run again without resume.")
    saved = load_checkpoint(last)
    done = saved.get("finished")
    mine = OmegaConf.to_container(composed, resolve=True)
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or key == "resume" or key in RESUME_FREE and not done:
            continue
        path = key.split(".")
        new, old = mine, saved["config"]
        for part in path:
            new = new.get(part) if isinstance(new, dict) else None
            old = old.get(part) if isinstance(old, dict) else None
        if new != old and done:
            raise UserError(f"resume={folder} is a finished run ({saved['epoch']} epochs; results in "
                            f"{folder / 'metrics.json'}), so {key}={new} (its {old}) would change nothing; drop "
                            f"{key}, or start a new run with it.")
        if new != old:
            raise UserError(f"resume={folder} continues that run as it was configured, but {key}={new} differs "
                            f"from its {old}; drop {key}, or start a new run.")
    if done:
        print(f"Run {folder} is finished ({saved['epoch']} epochs; results in {folder / 'metrics.json'}); "
              f"nothing to do.", file=sys.stderr)
        raise SystemExit(0)
    if lock:
        _CLAIM, _RESUMED = rundir.lock_existing(folder), True
    kept = from_dict({**saved["config"], "resume": cfg.resume, "oracle": {
        **saved["config"]["oracle"], **({"ckpt": cfg.oracle.ckpt} if cfg.oracle.ckpt else {})}})
    if kept.kind != "single" and kept.oracle.ckpt:  # the rest was checked when the run started
        try:
            preflight(kept, only_oracle=True)
        except UserError as exc:
            raise UserError(f"{str(exc).rstrip('.')}; a resumed run takes a new one as oracle.ckpt=PATH.") from None
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [f"hydra.run.dir={_quote(os.path.abspath(folder))}", f"hydra.output_subdir=.hydra/resume-{stamp}"]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def processes_sharing_cores(hydra_cfg=None) -> int:
    """How many processes a launcher started side by side on this machine: torchrun's local world size, or a
    sweep's parallel jobs (hydra.launcher.n_jobs of the joblib launcher; -1: one per core); else 1."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    n_jobs = None
    if hydra_cfg is not None and str(hydra_cfg.mode) == "RunMode.MULTIRUN":
        n_jobs = hydra_cfg.launcher.get("n_jobs")
    if n_jobs is None or n_jobs == 0:
        return 1
    return cores() if n_jobs < 0 else int(n_jobs)


def default_threads(hydra_cfg=None) -> int | None:
    """Intra-op threads for a process that shares the cores with others (their share), or None (torch's own
    default, every core) when it runs alone; each process taking every core slows all of them several times."""
    share = processes_sharing_cores(hydra_cfg)
    return max(1, cores() // share) if share > 1 else None


def remove_rank_scratch() -> None:
    """Remove the throw-away run dir of a rank other than 0, if this process is one."""
    if RANK_SCRATCH is not None:
        shutil.rmtree(RANK_SCRATCH, ignore_errors=True)


def job_threads(cfg: Config, hydra_cfg=None) -> int | None:
    """The threads hydra_entry sets for a job: its share of the cores (default_threads), or None when
    trainer.threads is given (an explicit value wins: train.run sets exactly that) or the process runs alone."""
    return None if cfg.trainer.threads else default_threads(hydra_cfg)


def device_flag(name: str, flag: str = "--device"):
    """The torch.device for an entry point's --device (cpu, cuda, or auto: cuda where there is one); a sentence
    for cuda without a GPU, found before any work."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} cuda, but no CUDA device is available here; use {flag} cpu.")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def writable_file(name: str, what: str, example: str, make_folder: bool = False) -> Path:
    """`name` as a file an entry point writes at the end (what: how the user gave it, e.g. "--json x"); a
    sentence now, before any work, if it is a folder, or its folder is missing (unless make_folder: then the
    first folder that exists above it) or not writable."""
    path = Path(name)
    if path.is_dir():
        raise UserError(f"{what} is a folder; give a file path, e.g. {path / example}.")
    folder = path.parent
    while make_folder and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what}: {folder} is a file, not a folder; choose another path.")
    if not folder.is_dir():
        raise UserError(f"{what}: the folder {folder} does not exist; create it first or choose another path.")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{what} cannot be written here (permission denied); choose a path you can write to.")
    return path


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _abandon(out_dir: Path, hydra_cfg) -> None:
    """After a refusal or an interrupt before the first checkpoint: remove what this run created, so the same
    command works once fixed (a resumed run loses only its .hydra/resume-* folder)."""
    if (out_dir / "checkpoints" / "last.pt").exists() and not _RESUMED:
        return  # a run with a checkpoint is kept: the message names it, resume continues it
    subdir = hydra_cfg.output_subdir
    if _RESUMED:
        if subdir and str(subdir).startswith(".hydra/resume-"):
            shutil.rmtree(out_dir / subdir, ignore_errors=True)
    elif str(hydra_cfg.mode) == "RunMode.MULTIRUN":
        if out_dir.parent == Path(hydra_cfg.sweep.dir).resolve() and out_dir.name:  # the sweep was claimed new
            shutil.rmtree(out_dir, ignore_errors=True)
    elif _CLAIM is not None and out_dir == _CLAIM.path.resolve():  # claimed empty or new: all that is in it is this run's
        rundir.remove_contents(out_dir)


def hydra_entry(run: Callable[[Config, str], object]) -> None:
    """Check the command line, then call run(cfg, output_dir) under @hydra.main."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    try:
        sys.argv = sys.argv[:1] + check_command_line(sys.argv[1:])
    except UserError as exc:
        fail(str(exc))

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def _main(dcfg) -> None:
        hydra_cfg = HydraConfig.get()
        out_dir = Path(hydra_cfg.runtime.output_dir).resolve()
        job, mine = None, str(hydra_cfg.mode) != "RunMode.MULTIRUN"
        try:
            if not mine:  # a sweep's job: its folder is new in the claimed sweep folder, unless the subdir clashes
                job, mine = rundir.lock_job(out_dir), True
            cfg = config_from(dcfg)
            threads = job_threads(cfg, hydra_cfg)
            if threads:  # an explicit trainer.threads wins
                import torch

                torch.set_num_threads(threads)
                log.info("%d threads: this machine's %d cores shared by %d processes", threads, cores(),
                         processes_sharing_cores(hydra_cfg))
            run(cfg, str(out_dir))
        except UserError as exc:
            log.error("%s", exc)
            if mine:
                _abandon(out_dir, hydra_cfg)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            log.error("Interrupted before the first checkpoint; nothing was saved.")
            if mine:
                _abandon(out_dir, hydra_cfg)
            raise SystemExit(130) from None
        finally:
            if job:
                job.release()
            remove_rank_scratch()  # a rank other than 0 that stopped (train.leave_rank when it finished)

    try:
        _main()
    except SystemExit as exc:
        if exc.code in (2, 130) and _CLAIM is not None and not _RESUMED:
            _CLAIM.remove_if_unused()  # a refused run leaves no folder it created
        raise
