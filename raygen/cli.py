"""The job contract shared by every `jobs/<job>.py` and the `raygen` command:

    python jobs/<job>.py [--preset NAME | --config FILE.yaml] [dotted.key=value ...] [--runs-root DIR]

The config is loaded (defaults <- preset <- file <- overrides, each section checking its own values),
then resolved by the recipe (values derived from the data or other keys), and written to the run
directory with every key marked given, resolved or default. Config errors and unwritable run
directories stop the job before anything is written, with one line naming the key or path and the
fix. The last line a job prints is `run_dir: <absolute path>`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

from raygen.config import ConfigError, all_keys, load_config, write_config


def preset_dir(recipe: str) -> Path:
    return Path(str(resources.files("raygen") / "configs" / recipe))


def parse_args(recipe: str, config_cls, argv=None) -> argparse.Namespace:
    presets = sorted(p.stem for p in preset_dir(recipe).glob("*.yaml"))
    p = argparse.ArgumentParser(
        prog=f"jobs/{recipe}.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set with key=value):\n  " + "\n  ".join(all_keys(config_cls)),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a shipped preset: {', '.join(presets)} (default: default)")
    src.add_argument("--config", help="a YAML config file (same keys as the presets)")
    p.add_argument("--runs-root", default=os.environ.get("RAYGEN_RUNS", "runs"),
                   help="where run directories go (default: ./runs or $RAYGEN_RUNS)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_intermixed_args(argv)


def resolve_run_dir(runs_root: str, recipe: str, name: str | None, preset: str | None) -> tuple[Path, bool]:
    """runs/<recipe>/<YYYYmmdd-HHMMSS>-<name>. A run with an explicit name that already exists is
    resumed (the newest one with that name); unnamed runs always start fresh."""
    root = Path(runs_root).expanduser().resolve() / recipe
    if name:
        if "/" in name or name.startswith("."):
            raise ConfigError(f"run.name={name!r} must be a plain directory name")
        existing = sorted(root.glob(f"*-{name}")) if root.is_dir() else []
        existing = [d for d in existing if d.name[:15].replace("-", "").isdigit()]
        if existing:
            return existing[-1], True
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{stamp}-{name or preset or 'default'}"
    n = 1
    while run_dir.exists():  # two unnamed runs started in the same second
        n += 1
        run_dir = root / f"{stamp}-{name or preset or 'default'}-{n}"
    return run_dir, False


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory, proving it is writable before any work starts."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write the run directory {run_dir}: {e.strerror or e}; pass --runs-root <writable dir>"
        ) from None


def init_ray() -> None:
    """Connect to the cluster named by RAY_ADDRESS (`ray job submit` sets it), else start a local one."""
    from raygen.core import console

    console.quiet_driver()  # before `import ray`: Ray reads its log-forwarding settings on import
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False,
                 runtime_env=console.runtime_env())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # reproducible data order, hence exact resume
    ctx.enable_progress_bars = False  # one progress bar (training) instead of one per epoch
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "...disabled": we know
    ctx.print_on_execution_start = False  # and no two log lines per epoch


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


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


def guarded(fn, *args):
    """Run a recipe; a failure becomes one clear line (plus Ray's detail above it) and exit code 1.
    The run directory keeps its checkpoints: the same command resumes from the latest."""
    import ray.train

    run_dir = args[1] if len(args) > 1 else None
    try:
        return fn(*args)
    except ConfigError as e:
        fail(str(e))
    except ray.train.TrainingFailedError as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else type(cause).__name__
        fail(f"training failed: {msg}\n  run_dir: {run_dir}\n  to resume from its last checkpoint, run the same "
             f"command with run.name={Path(run_dir).name[16:]}", code=1)


def run_job(name: str, argv=None) -> Path:
    """A recipe's job (`jobs/<name>.py`): set up the run, start or join Ray, run, report; returns the run dir."""
    from raygen import recipes

    recipe = recipes.get(name)
    cfg, run_dir, _ = setup_job(recipe, argv)
    init_ray()
    report(run_dir, guarded(recipe.run, cfg, run_dir))
    return run_dir


DATA_JOBS = {"encode_latents": "raygen.data.ingest:encode_latents", "encode_siglip": "raygen.data.ingest:encode_siglip",
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


def report(run_dir: Path, metrics: dict) -> None:
    """Tell the user where everything went; the last line is `run_dir: <path>`."""
    run_dir = Path(run_dir)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
             if not isinstance(v, (dict, list)) and "@" not in k}
    if shown:
        print("eval: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    for rel in ("config.yaml", "metrics.jsonl", "net_ema.pt", "checkpoints", "samples", "plots", "eval",
                "tensorboard", "wandb"):
        if (run_dir / rel).exists():
            print(f"  {rel:<14} {run_dir / rel}")
    print(f"run_dir: {run_dir}", flush=True)
