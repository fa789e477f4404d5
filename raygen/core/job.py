"""The job contract's plumbing shared by every job, recipe or not (ingest, sweeps, training):

    python jobs/<job>.py [--preset NAME | --config FILE.yaml] [dotted.key=value ...] [--runs-root DIR]

argument parsing, the run directory, starting or joining Ray, one-line failures, and the closing
summary whose last line is `run_dir: <absolute path>`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from raygen.config import ConfigError, all_keys


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
    """Create the run directory, proving it is writable before any work starts (the probe file is
    removed also when writing it fails half-way, e.g. on a full disk)."""
    probe = run_dir / f".write_probe{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as e:
        raise ConfigError(
            f"cannot write the run directory {run_dir}: {e.strerror or e}; pass --runs-root <writable dir>"
        ) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


_held_locks: dict[str, object] = {}  # lock files this process holds, open until it exits


def lock_run(root: Path, key: str, what: str) -> None:
    """Make this process the one writer of run `key` under `root`: an exclusive `flock` on
    `<root>/.locks/<key>.lock`, held until the process exits. The kernel drops it on any exit, a
    SIGKILL too, so a lock left by a dead process is never in the way; the file names the holder so
    a refused second command can say who has the run."""
    import fcntl
    import socket

    if key in _held_locks:
        return
    lock_dir = Path(root) / ".locks"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        fh = open(lock_dir / f"{key}.lock", "a+")
    except OSError as e:
        raise ConfigError(f"cannot write under {root}: {e.strerror or e}; pass --runs-root <writable dir>") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise ConfigError(f"{what} is already running ({holder}); wait for it to finish, or start a separate run "
                          f"with run.name=<another name>") from None
    try:  # who holds it, for a refused second command; the lock holds even if a full disk refuses the text
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)}")
        fh.flush()
    except OSError:
        pass
    _held_locks[key] = fh


def create_run_dir(runs_root: str, recipe: str, name: str | None, preset: str | None) -> tuple[Path, bool]:
    """Lock the run and find or make its directory: `resolve_run_dir`, with the run locked first (a
    named run by its name, before its directory is looked up, so two identical commands cannot both
    create it), and a new directory created atomically (two unnamed runs in the same second get two)."""
    root = Path(runs_root).expanduser().resolve() / recipe
    if name:
        lock_run(root, f"name-{name}", f"run.name={name}")
    run_dir, resumed = resolve_run_dir(runs_root, recipe, name, preset)
    if not resumed:
        base, n = run_dir, 1
        while True:
            try:
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                run_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                run_dir = base.with_name(f"{base.name}-{n}")
            except OSError as e:
                raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror or e}; pass --runs-root "
                                  "<writable dir>") from None
    lock_run(root, f"dir-{run_dir.name}", f"the run in {run_dir}")
    prepare_run_dir(run_dir)
    return run_dir, resumed


def init_ray() -> None:
    """Connect to the cluster named by RAY_ADDRESS (`ray job submit` sets it), else start a local one."""
    from raygen.core import console

    console.quiet_driver()  # before `import ray`: Ray reads its log-forwarding settings on import
    import ray

    global _ray_started_here
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False,
                 runtime_env=console.runtime_env())
        _ray_started_here = True
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # reproducible data order, hence exact resume
    ctx.enable_progress_bars = False  # one progress bar (training) instead of one per epoch
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "...disabled": we know
    ctx.print_on_execution_start = False  # and no two log lines per epoch


def fail(msg: str, code: int = 2):
    """End the job with one line (`error: ...`) and `code`. Ray is shut down first when it runs, which
    flushes its forwarded worker output, so that line is the last one the user sees."""
    stop_ray()
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


_ray_started_here = False  # whether init_ray connected this process (then the job may also disconnect it)


def stop_ray() -> None:
    """Disconnect from (a local cluster: stop) Ray, when this job's `init_ray` connected it; a process that
    was already connected (a test session, a notebook) keeps its connection."""
    global _ray_started_here
    ray = sys.modules.get("ray")
    try:
        if _ray_started_here and ray is not None and ray.is_initialized():
            ray.shutdown()
            _ray_started_here = False
    except Exception:  # the line after it matters more than a clean shutdown
        pass


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


@contextlib.contextmanager
def interrupts(describe):
    """Ctrl-C (SIGINT) or SIGTERM inside the block ends the job with one line, `describe()`: what was
    interrupted, what is kept and the command that resumes, and exit code 130 (128 + SIGINT)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        yield
    except KeyboardInterrupt:
        try:
            line = describe()
        except Exception as e:  # the line must come out even if looking at the run fails
            line = f"interrupted ({type(e).__name__} while describing what is kept: {e})"
        stop_ray()  # this job's workers and the forwarding of their output: the line below is the last
        print(f"\n{line}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def resume_command(job: str, argv, extra: list[str] = ()) -> str:
    """The command line that runs `job` again with the same arguments (plus `extra`)."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in ["python", f"jobs/{job}.py", *args, *extra])
