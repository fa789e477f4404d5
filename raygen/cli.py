"""The job contract shared by every `jobs/<job>.py`:

    python jobs/<job>.py [--preset NAME | --config FILE.yaml] [dotted.key=value ...] [--runs-root DIR]

Config errors and unwritable run directories stop the job before anything is written, with one
line naming the key or path and the fix. The last line a job prints is `run_dir: <absolute path>`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

from raygen.config import ConfigError, all_keys, dump_yaml, load_config


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
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # reproducible data order, hence exact resume
    ctx.enable_progress_bars = False  # one progress bar (training) instead of one per epoch
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "...disabled": we know
    ctx.print_on_execution_start = False  # and no two log lines per epoch


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def setup_job(recipe: str, config_cls, argv=None):
    """Parse, validate and create the run directory. Returns (cfg, run_dir, resumed)."""
    args = parse_args(recipe, config_cls, argv)
    try:
        cfg, _ = load_config(config_cls, preset=args.preset, preset_dir=preset_dir(recipe),
                             config_file=args.config, overrides=args.overrides)
        run_dir, resumed = resolve_run_dir(args.runs_root, recipe, cfg.run.name, args.preset or
                                           (Path(args.config).stem if args.config else None))
        prepare_run_dir(run_dir)
    except ConfigError as e:
        fail(str(e))
    if resumed:
        print(f"resuming run {run_dir}", flush=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    return cfg, run_dir, resumed


def guarded(fn, cfg, run_dir: Path):
    """Run a recipe; a failure becomes one clear line (plus Ray's detail above it) and exit code 1.
    The run directory keeps its checkpoints: the same command resumes from the newest."""
    import ray.train

    try:
        return fn(cfg, run_dir)
    except ConfigError as e:
        fail(str(e))
    except ray.train.TrainingFailedError as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else type(cause).__name__
        fail(f"training failed: {msg}\n  run_dir: {run_dir}\n  to resume from its last checkpoint, run the same "
             f"command with run.name={run_dir.name[16:]}", code=1)


def main(argv=None) -> None:
    """`raygen <job> [args...]`: run jobs/<job>.py's recipe from an installed package."""
    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = {"drifting": "raygen.recipes.drifting:main", "latent_mae": "raygen.recipes.latent_mae:main",
            "dit": "raygen.recipes.dit:main", "encode_latents": "raygen.data.ingest:encode_latents",
            "encode_siglip": "raygen.data.ingest:encode_siglip", "inspect_latents": "raygen.data.inspect:main",
            "encode_pixels": "raygen.data.ingest:encode_pixels",
            "ablate": "raygen.tune.ablate:main", "report": "raygen.tune.report:main"}
    if not argv or argv[0] not in jobs:
        fail(f"usage: raygen <{'|'.join(jobs)}> [--preset NAME | --config FILE] [key=value ...]")
    import importlib

    module, fn = jobs[argv[0]].split(":")
    getattr(importlib.import_module(module), fn)(argv[1:])



def report(run_dir: Path, metrics: dict) -> None:
    """Tell the user where everything went; the last line is `run_dir: <path>`."""
    run_dir = Path(run_dir)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    if shown:
        print("eval: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    for rel in ("config.yaml", "metrics.jsonl", "checkpoints", "samples", "plots", "eval", "tensorboard", "wandb"):
        if (run_dir / rel).exists():
            print(f"  {rel:<14} {run_dir / rel}")
    print(f"run_dir: {run_dir}", flush=True)
