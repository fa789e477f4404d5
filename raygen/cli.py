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
from raygen.core import storage
from raygen.core.job import (create_run_dir, fail, init_ray, interrupts, lock_run, parse_args, preset_dir, report,
                             resolve_run_dir, stop_ray)


def load_resolved(recipe, *, preset=None, config_file=None, overrides=()):
    """(resolved config, the config as given, the given keys as a dict) of a recipe."""
    from raygen.recipes import resolved

    given_cfg, given = load_config(recipe.config, preset=preset, preset_dir=preset_dir(recipe.name),
                                   config_file=config_file, overrides=overrides)
    return resolved(recipe, given_cfg), given_cfg, given


# keys that may change when a run is resumed: how long it runs, how it logs and checkpoints, how it is
# evaluated, and the resources it runs on; every other key changes the model, the data or the method
RESUMABLE = ("run.", "log.", "eval.", "debug.", "train.steps", "train.log_every", "train.ckpt_every",
             "train.sample_every", "train.keep_checkpoints", "train.max_failures", "train.max_nonfinite_in_a_row",
             "train.num_workers", "train.use_gpu", "train.cpus_per_worker", "train.gpus_per_worker",
             "train.torch_threads", "train.compile")
HISTORY_FILE = "config_history.jsonl"


def resume_changes(recipe, run_dir: Path, cfg) -> dict:
    """{key: (saved, new)} of the keys that differ from the run's config.yaml. Raises ConfigError, naming
    them and the fix, when one of them is not in RESUMABLE: its checkpoints were trained without it."""
    from raygen.config import all_keys, flatten, to_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():  # the first attempt stopped before its config was written: nothing to compare
        return {}
    try:
        saved, _ = load_config(recipe.config, preset=None, preset_dir=preset_dir(recipe.name), config_file=str(path))
    except ConfigError as e:
        raise ConfigError(f"cannot resume {run_dir}: its config.yaml does not load ({e}); start a new run with "
                          f"run.name=<new name>") from None
    leaves = set(all_keys(recipe.config))
    old, new = flatten(to_dict(saved), leaves=leaves), flatten(to_dict(cfg), leaves=leaves)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    fixed = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE)}
    if fixed:
        keys = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fixed.items())
        raise ConfigError(f"cannot resume {run_dir} with a different model, data or method ({keys}): its checkpoints "
                          f"were trained with the saved config.yaml; revert these keys, or start a new run with "
                          f"run.name=<new name>")
    return changed


def setup_job(recipe, argv=None):
    """Every check before anything is written or Ray starts: parse, load, resolve and check the config;
    for a named run that exists, compare it with the saved one; lock the run name (one writer).
    Returns (cfg, args, plan) where plan = (run_dir or None, resumed, changes, given, given_cfg)."""
    args = parse_args(recipe.name, recipe.config, argv)
    try:
        cfg, given_cfg, given = load_resolved(recipe, preset=args.preset, config_file=args.config,
                                              overrides=args.overrides)
        root = Path(args.runs_root).expanduser().resolve() / recipe.name
        if cfg.run.name:
            lock_run(root, f"name-{cfg.run.name}", f"run.name={cfg.run.name} ({root})")
        if getattr(cfg.run, "storage", None):
            storage.check(cfg.run.storage)
            if cfg.run.name:  # a fresh cluster: the run lives on in storage
                storage.fetch_named_run(cfg.run.storage, args.runs_root, recipe.name, cfg.run.name)
        run_dir, resumed = resolve_run_dir(args.runs_root, recipe.name, cfg.run.name, run_label(args))
        changes = resume_changes(recipe, run_dir, cfg) if resumed else {}
    except ConfigError as e:
        fail(str(e))
    return cfg, args, (run_dir if resumed else None, resumed, changes, given, given_cfg)


def run_label(args) -> str | None:
    return args.preset or (Path(args.config).stem if args.config else None)


def open_run(recipe, cfg, args, plan) -> Path:
    """Create (or reopen) the run directory, locked to this process, and record the config: config.yaml
    for a new run; for a resumed one an appended line in config_history.jsonl, never a rewrite of the
    config its checkpoints were trained with."""
    import json
    import time

    _, resumed, changes, given, given_cfg = plan
    try:
        run_dir, resumed = create_run_dir(args.runs_root, recipe.name, cfg.run.name, run_label(args))
    except ConfigError as e:
        fail(str(e))
    if resumed:
        print(f"resuming run {run_dir}" + (f" (changed: {', '.join(changes)})" if changes else ""), flush=True)
        if changes:
            record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
                      "changed": {k: list(v) for k, v in changes.items()}}
            with open(run_dir / HISTORY_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
    if not (run_dir / "config.yaml").is_file():
        write_config(cfg, run_dir / "config.yaml", given, given_cfg)
    storage.push(run_dir)
    return run_dir


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
    """A recipe's job (`jobs/<name>.py`): every check, then Ray, then the run directory, the run and the
    summary. Returns the run directory."""
    from raygen import recipes
    from raygen.train.driver import check_resources

    recipe = recipes.get(name)
    cfg, args, plan = setup_job(recipe, argv)
    storage.bind(getattr(cfg.run, "storage", None), args.runs_root)  # before Ray starts: workers inherit it
    run_dir = None
    with interrupts(lambda: interrupted(name, argv, cfg, run_dir)):
        init_ray()
        try:
            check_resources(cfg.train)
        except ConfigError as e:
            fail(str(e))
        run_dir = open_run(recipe, cfg, args, plan)
        try:
            metrics = guarded(recipe.run, cfg, run_dir)
        finally:  # what the run wrote, also when it failed: a resume elsewhere starts from storage
            keep_in_storage(run_dir)
        stop_ray()  # flushes Ray's forwarded output (a lost node's notice, say) so `run_dir:` stays the last line
        report(run_dir, metrics)
    return run_dir


def keep_in_storage(run_dir) -> None:
    """Push the run directory to `run.storage` (when bound); a failure here is reported, not raised over
    the run's own outcome."""
    try:
        storage.push(run_dir)
    except Exception as e:  # noqa: BLE001 - the run's result matters more; say what was not copied
        print(f"warning: could not copy {run_dir} to run.storage: {e}", file=sys.stderr, flush=True)
        return
    if storage.remote_of(run_dir):
        print(f"  storage        {storage.display(storage.remote_of(run_dir))} (checkpoints and a copy of the run "
              "directory)", flush=True)


def interrupted(job: str, argv, cfg, run_dir) -> str:
    """The one line a Ctrl-C or SIGTERM ends a recipe's job with: what stopped, what is kept, how to resume."""
    from raygen.core.job import resume_command
    from raygen.train.checkpoint import latest_checkpoint, read_record

    if run_dir is None:
        return f"interrupted: {job} stopped before its run directory was made; nothing was written"
    ckpt = latest_checkpoint(run_dir)
    kept = (f"its checkpoint of step {read_record(ckpt)['step']} is kept" if ckpt is not None
            else "no checkpoint was registered yet (a resumed run starts at step 0)")
    args = list(sys.argv[1:] if argv is None else argv)
    named = any(a.startswith("run.name=") for a in args)
    cmd = resume_command(job, args, [] if named else [f"run.name={Path(run_dir).name[16:]}"])
    return f"interrupted: the {job} run in {run_dir}; {kept}; resume it with: {cmd}"


DATA_JOBS = {"encode_latents": "raygen.data.ingest:encode_latents", "encode_siglip": "raygen.data.ingest:encode_siglip",
             "encode_pixels": "raygen.data.ingest:encode_pixels", "prepare_fewshot": "raygen.data.fewshot_prep:main",
             "inspect_latents": "raygen.data.inspect:main", "ablate": "raygen.tune.ablate:main",
             "report": "raygen.tune.report:main", "generate": "raygen.recipes.generate:main",
             "fid": "raygen.eval.fid_protocol:main"}


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


