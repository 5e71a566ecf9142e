"""Hydra glue for the entry points: compose configs in-process, check a command line before any work starts,
and run a function under @hydra.main with user errors shown as one sentence. Only entry points import this."""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from cnnrnn.config import CONFIG_DIR, Config, from_dict
from cnnrnn.errors import UserError
log = logging.getLogger("cnnrnn")


def compose(overrides: list[str]):
    """The composed DictConfig for these overrides, as `python -m cnnrnn.train` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose("train", overrides=overrides)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def config_from(dcfg) -> Config:
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(dcfg, resolve=True)
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


def _holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in ("checkpoints", "metrics.json", ".hydra"))


def check_command_line(argv: list[str]) -> list[str]:
    """Refuse a bad command line before Hydra creates anything; return argv, completed for resume and ranks."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return argv  # --help, --cfg, --info ...: Hydra's own
    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as exc:
        raise UserError(f"Cannot parse the command line ({str(exc).splitlines()[0]}); write key=value pairs, "
                        f"e.g. task=cnn trainer.epochs=5.") from None
    plain, hydra_args = [], {}
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            hydra_args[o.key_or_group] = o.value()
        elif o.is_sweep_override():  # check the first job of a sweep; every job validates itself again
            plain.append(f"{o.get_key_element()}={next(o.sweep_string_iterator())}")
        else:
            plain.append(o.input_line)
    try:
        composed = compose(plain)
    except Exception as exc:
        raise UserError(_explain(exc, plain)) from None
    cfg = config_from(composed)
    rank = int(os.environ.get("RANK", "0"))
    if cfg.resume:
        argv = argv + check_resume(cfg, composed, parsed)
    elif rank == 0 and "hydra.run.dir" in hydra_args and _holds_run(Path(str(hydra_args["hydra.run.dir"]))):
        folder = hydra_args["hydra.run.dir"]
        raise UserError(f"hydra.run.dir={folder} already holds a run, which this one would mix with; choose a new "
                        f"folder, or continue that run with resume={folder}.")
    if not cfg.resume:
        from cnnrnn.build import preflight
        preflight(cfg)
    if rank > 0:  # only rank 0 writes a run dir and logs
        argv = argv + [f"hydra.run.dir={tempfile.mkdtemp(prefix='cnnrnn-rank')}", "hydra.output_subdir=null",
                       "hydra/job_logging=disabled"]
    return argv


def check_resume(cfg: Config, composed, parsed) -> list[str]:
    """Overrides that make Hydra write into the resumed run (without touching its .hydra/), or an error."""
    from omegaconf import OmegaConf

    from cnnrnn.engine import load_checkpoint

    folder = Path(cfg.resume)
    last = folder / "checkpoints" / "last.pt"
    if not folder.is_dir():
        raise UserError(f"resume={folder} is not a folder; give the run dir to continue (runs/TASK/TIME).")
    if not last.is_file():
        raise UserError(f"resume={folder} has no checkpoints/last.pt (it stopped before its first checkpoint); "
                        f"start that run again without resume.")
    saved = load_checkpoint(last)
    if saved.get("finished"):
        print(f"Run {folder} is finished ({saved['epoch']} epochs; results in {folder / 'metrics.json'}); "
              f"nothing to do.", file=sys.stderr)
        raise SystemExit(0)
    mine = OmegaConf.to_container(composed, resolve=True)
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or key == "resume":
            continue
        path = key.split(".")
        new, old = mine, saved["config"]
        for part in path:
            new = new.get(part) if isinstance(new, dict) else None
            old = old.get(part) if isinstance(old, dict) else None
        if new != old:
            raise UserError(f"resume={folder} continues that run as it was configured, but {key}={new} differs "
                            f"from its {old}; drop {key}, or start a new run.")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [f"hydra.run.dir={folder}", f"hydra.output_subdir=.hydra/resume-{stamp}"]


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
        try:
            cfg = config_from(dcfg)
            threads = None if cfg.trainer.threads else default_threads(HydraConfig.get())
            if threads:  # an explicit trainer.threads wins
                import torch

                torch.set_num_threads(threads)
                log.info("%d threads: this machine's %d cores shared by %d processes", threads, cores(),
                         processes_sharing_cores(HydraConfig.get()))
            run(cfg, HydraConfig.get().runtime.output_dir)
        except UserError as exc:
            log.error("%s", exc)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            log.error("Interrupted before the first checkpoint; nothing was saved.")
            raise SystemExit(130) from None

    _main()
