"""Hydra, and nothing else of the command line: the task presets of config.py registered as Hydra's `task`
group, one composition per job, our own checks of every key and path before any folder exists, and Hydra's
sweeps (-m, the joblib launcher). The entry points call this; the core never imports it."""
from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cnnrnn import config
from cnnrnn.errors import UserError
from cnnrnn.stages import LOG_DATEFMT, LOG_FORMAT

log = logging.getLogger("cnnrnn")
GROUPS = ("task", "experiment", "arm", "hydra/launcher")  # the config groups a command line may choose from
HYDRA_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.launcher.", "hydra.verbose")


def compose(overrides: list[str], with_hydra: bool = False):
    """The composed DictConfig for these overrides, as `python -m cnnrnn.train` sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    store = ConfigStore.instance()
    for name in config.PRESETS:
        store.store(group="task", name=name, node=config.preset_dict(name), package="_global_")
    if GlobalHydra.instance().is_initialized():
        return hydra_compose("train", overrides=overrides, return_hydra_config=with_hydra)
    with initialize_config_dir(str(config.CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=with_hydra)


def to_config(composed) -> config.Config:
    """The validated Config of a composed DictConfig (its hydra node left out)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        values = OmegaConf.to_container(OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"]),
                                        resolve=True)
    except OmegaConfBaseException as exc:  # '${nope}', '${oc.env:UNSET}' ...
        raise UserError(f"Cannot resolve {getattr(exc, 'full_key', None) or 'a value'} "
                        f"({str(exc).splitlines()[0].rstrip('.')}); give it a plain value.") from None
    return config.from_dict(values)


@dataclass
class Command:
    multirun: bool
    jobs: list[list[str]]                        # the overrides of each job (one job without -m)
    hydra: dict[str, str] = field(default_factory=dict)   # hydra.* settings given, as written


def parse(argv: list[str]) -> Command:
    """Check every override's key against the config and each group's choice against its options, and expand
    sweeps into jobs; one sentence for the first bad one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if a not in ("-m", "--multirun")])
    except Exception as exc:  # Hydra's grammar errors have no stable type
        raise UserError(f"Cannot parse the command line ({str(exc).splitlines()[0]}); write key=value pairs, "
                        f"e.g. task=cnn trainer.epochs=5, and quote a value that holds spaces, accents or other "
                        f"characters: 'data.root=\"my data\"'.") from None

    def values(o) -> list[str]:
        return list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())]

    tasks = next((values(o) for o in parsed if o.key_or_group == "task"), ["multilabel"])
    choices, hydra = [], {}
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override() and not multirun:
            raise UserError(f"{o.input_line} gives several values, which makes a sweep; add -m (python -m "
                            f"cnnrnn.train -m {o.input_line}), or give one value.")
        if key.startswith("hydra") and key != "hydra/launcher":
            if not key.startswith(HYDRA_KEYS):
                raise UserError(f"{key} cannot be set here: cnnrnn keeps each run's config in RUN_DIR/.hydra and its "
                                f"log in RUN_DIR/train.log; choose the folder with hydra.run.dir (a sweep's with "
                                f"hydra.sweep.dir and hydra.sweep.subdir).")
            hydra[key] = o.input_line
        elif key in GROUPS:
            for value in values(o):
                check_option(key, value)
        elif o.type.name != "DEL":
            for task in tasks:
                config.check_key(key, task)
        choices.append([f"{o.get_key_element()}={v}" for v in values(o)] if o.is_sweep_override() else [o.input_line])
    return Command(multirun, [list(job) for job in itertools.product(*choices)], hydra)


def check_option(group: str, name: str) -> None:
    if group == "task":
        config.preset_dict(name)  # one sentence for an unknown task
    elif group in ("experiment", "arm") and not (config.CONFIG_DIR / group / f"{name}.yaml").is_file():
        options = sorted(p.stem for p in (config.CONFIG_DIR / group).glob("*.yaml"))
        raise UserError(f"Unknown {group} '{name}'; choose one of {', '.join(options)}.")


def job_config(overrides: list[str], key: str = "hydra.run.dir", num: int | None = None
               ) -> tuple[config.Config, str, dict]:
    """(validated config, the path at `key` as Hydra resolves it, and the sweeper's own params) of one job's
    overrides; `num`: the job's number in a sweep, with the folder name Hydra's launcher gives that job."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        composed = compose(overrides, with_hydra=True)
    except Exception as exc:  # a YAML or interpolation error in a file: Hydra's types vary
        raise UserError(f"Cannot compose the config from {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None
    if num is not None:  # what the launcher sets: the job's number and its overrides as a name (Hydra's own rule)
        names = composed.hydra.job.config.override_dirname
        task = sorted(o for o in overrides if not o.lstrip("+~").startswith("hydra")
                      and o.split("=", 1)[0].lstrip("+~") not in names.exclude_keys)
        with open_dict(composed):
            composed.hydra.job.num = num
            composed.hydra.job.override_dirname = names.item_sep.join(task).replace("=", names.kv_sep)
    previous = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(composed)  # for ${hydra:...} in the path
        folder = str(OmegaConf.select(composed, key, throw_on_missing=True))
    except OmegaConfBaseException as exc:
        raise UserError(f"Cannot resolve {key} ({str(exc).splitlines()[0].rstrip('.')}); give it a plain value, or "
                        f"an interpolation of a key that exists.") from None
    finally:
        HydraConfig.instance().cfg = previous
    params = OmegaConf.to_container(composed.hydra.sweeper).get("params") or {}
    return to_config(composed), folder, params


def log_to(folder: Path | None, level: int = logging.INFO) -> None:
    """The project's messages to stderr (stdout stays free for JSON) and to FOLDER/train.log."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if folder is not None:
        handlers.append(logging.FileHandler(folder / "train.log"))
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT, handlers=handlers, force=True)


def sweep(argv: list[str], job) -> None:
    """Run Hydra's sweep (its sweeper and launcher) with `job(cfg, folder, n_jobs, sweep folder, job number,
    overrides)` as each job's work. Hydra writes nothing into a job's folder itself: the job checks and claims it
    first, then writes its .hydra/ files."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=str(config.CONFIG_DIR), config_name="train", version_base="1.3")
    def main(composed) -> None:
        s = HydraConfig.get()
        launcher = s.launcher.get("n_jobs") if str(s.mode) == "RunMode.MULTIRUN" else None
        job(to_config(composed), Path(s.runtime.output_dir), launcher, Path(s.sweep.dir), s.job.num,
            list(s.overrides.task))

    compose([])  # registers the task presets
    sys.argv = sys.argv[:1] + argv
    main()
