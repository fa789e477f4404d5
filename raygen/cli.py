"""The job contract shared by every `jobs/<job>.py` and the `raygen` command:

    python jobs/<job>.py [--preset NAME | --config FILE.yaml] [dotted.key=value ...] [--runs-root DIR]

The config is loaded (defaults <- preset <- file <- overrides, each section checking its own values),
then resolved by the recipe (values derived from the data or other keys), and written to the run
directory with every key marked given, resolved or default. Config errors and unwritable run
directories stop the job before anything is written, with one line naming the key or path and the
fix. The last line a job prints is `run_dir: <absolute path>`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from raygen.config import ConfigError, load_config, write_config
from raygen.core.job import fail, init_ray, parse_args, prepare_run_dir, preset_dir, report, resolve_run_dir


def load_resolved(recipe, *, preset=None, config_file=None, overrides=()):
    """(resolved config, the config as given, the given keys as a dict) of a recipe."""
    from raygen.recipes import resolved

    given_cfg, given = load_config(recipe.config, preset=preset, preset_dir=preset_dir(recipe.name),
                                   config_file=config_file, overrides=overrides)
    return resolved(recipe, given_cfg), given_cfg, given


def setup_job(recipe, argv=None):
    """Parse, load, resolve and check the config, then create the run directory. Returns
    (cfg, run_dir, resumed)."""
    args = parse_args(recipe.name, recipe.config, argv)
    try:
        cfg, given_cfg, given = load_resolved(recipe, preset=args.preset, config_file=args.config,
                                              overrides=args.overrides)
        run_dir, resumed = resolve_run_dir(args.runs_root, recipe.name, cfg.run.name, args.preset or
                                           (Path(args.config).stem if args.config else None))
        prepare_run_dir(run_dir)
    except ConfigError as e:
        fail(str(e))
    if resumed:
        print(f"resuming run {run_dir}", flush=True)
    write_config(cfg, run_dir / "config.yaml", given, given_cfg)
    return cfg, run_dir, resumed


def guarded(fn, cfg, run_dir: Path):
    """Run a recipe; a failure becomes one clear line (Ray's detail stays above it) and exit code 1.
    The run directory keeps its checkpoints: the same command resumes from the latest."""
    import ray.exceptions
    import ray.train

    resume = f"to resume from its last checkpoint, run the same command with run.name={Path(run_dir).name[16:]}"
    try:
        return fn(cfg, run_dir)
    except ConfigError as e:
        fail(str(e))
    except (ray.train.TrainingFailedError, ray.exceptions.RayError, OSError) as e:
        cause = root_cause(e)
        if disk_full(e):
            fail(f"no space left on the device holding {run_dir}: free space there, or pass --runs-root <a disk "
                 f"with room>; then {resume}", code=1)
        if isinstance(e, OSError):
            raise
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else type(cause).__name__
        fail(f"training failed: {msg}\n  run_dir: {run_dir}\n  {resume}", code=1)


def root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def disk_full(e: BaseException) -> bool:
    """Whether the failure is ENOSPC anywhere in its chain (Ray re-raises worker errors as text too)."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def run_job(name: str, argv=None) -> Path:
    """A recipe's job (`jobs/<name>.py`): set up the run, start or join Ray, run, report; returns the run dir."""
    from raygen import recipes

    recipe = recipes.get(name)
    cfg, run_dir, _ = setup_job(recipe, argv)
    init_ray()
    report(run_dir, guarded(recipe.run, cfg, run_dir))
    return run_dir


DATA_JOBS = {"encode_latents": "raygen.data.ingest:encode_latents", "encode_siglip": "raygen.data.ingest:encode_siglip",
             "encode_pixels": "raygen.data.ingest:encode_pixels",
             "inspect_latents": "raygen.data.inspect:main", "ablate": "raygen.tune.ablate:main",
             "report": "raygen.tune.report:main"}


def main(argv=None) -> None:
    """`raygen <job> [args...]`: a recipe's job (every registered recipe) or a data / sweep job."""
    from raygen import recipes

    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = [*recipes.names(), *DATA_JOBS]
    if not argv or argv[0] not in jobs:
        fail(f"usage: raygen <{'|'.join(jobs)}> [--preset NAME | --config FILE] [key=value ...]")
    if argv[0] in DATA_JOBS:
        import importlib

        module, fn = DATA_JOBS[argv[0]].split(":")
        getattr(importlib.import_module(module), fn)(argv[1:])
    else:
        run_job(argv[0], argv[1:])


