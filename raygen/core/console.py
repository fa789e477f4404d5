"""A quiet, exact driver console for Ray jobs: each worker line once, without Ray-internal noise.

Three sources of noise, each removed where it arises and nothing broader:

1. Every `print` in a Ray Train V2 worker reached the driver twice. Train replaces `builtins.print` by
   `ray.train.v2._internal.logging.patch_print.redirected_print`, which logs the text to the root logger
   (whose console handler, `ray._private.log.PlainRayHandler`, writes it to stderr) and *also* writes it
   with the original print whenever `sys.stderr is not sys.__stderr__` ("tee" for wandb/IPython wrappers).
   A Ray worker process always has `sys.stderr is not sys.__stderr__`: `ray/_private/workers/default_worker.py`
   rebinds `sys.stdout`/`sys.stderr` to unbuffered wrappers at start-up, so the tee fires on every print and
   the line lands twice in the worker's .err file, and log_to_driver forwards both copies. Ray's own switch
   for that patch, RAY_TRAIN_ENABLE_PRINT_PATCH (ray/train/v2/_internal/constants.py), set to 0 in the workers'
   environment leaves `print` alone: the line is written once to stderr, which Ray forwards to the driver and
   keeps in the worker's log file (it is no longer copied into Train's JSON ray-train-app-worker-*.log).
2. "Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object store and
   max_restarts > 0" is an error-level C++ log line (core_worker.cc) of the TrainController process, about
   Ray Train's own watcher actor (ray/train/v2/_internal/callbacks/preemption_callback.py creates it with
   max_restarts=-1); nothing in the job can act on it (https://github.com/ray-project/ray/issues/53727).
   Being C++ output it never passes a Python logger or warnings filter; the one place to drop it is the
   driver's forwarding of worker output, whose documented skip pattern is RAY_DEDUP_LOGS_SKIP_REGEX
   (https://docs.ray.io/en/latest/ray-observability/user-guides/configure-logging.html#log-deduplication).
   The pattern names that notice for that class only: the same notice for any other actor still shows.
3. "`ExecutionOptions.exclude_resources` is deprecated" is a RayDeprecationWarning that Ray raises against
   itself: ray.train's DataConfig.default_ingest_options() passes exclude_resources= to ExecutionOptions
   (ray/train/_internal/data_config.py), in Train's DatasetManager actor; the job never sets it. A warnings
   filter on that message and category is installed in every worker process by Ray's documented
   worker_process_setup_hook (https://docs.ray.io/en/latest/ray-observability/user-guides/configure-logging.html#customizing-worker-process-loggers)
   and in the driver. Every other (Ray)DeprecationWarning still shows.

Use: `quiet_driver()` before `import ray` in the driver (RAY_DEDUP_LOGS_SKIP_REGEX is read when Ray is
imported), then `ray.init(..., runtime_env=runtime_env())`. Errors, tracebacks and all other warnings
of the workers reach the console unchanged.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Ray Train's print patch (cause 1); "0" leaves the builtin print in the Train workers.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# Lines forwarded from workers that match this regex are not printed by the driver (cause 2).
SKIP_REGEX_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"

# core_worker.cc's notice for Ray Train's PreemptionWatcher actor (cause 2); other actors' notices still show.
PREEMPTION_WATCHER_NOTICE = (r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' and ID: '[0-9a-f]+'"
                             r" has constructor arguments in the object store and max_restarts > 0")
# Start of the deprecation message (warnings matches it at the message start, ignoring case) (cause 3).
EXCLUDE_RESOURCES_DEPRECATION = r"`ExecutionOptions\.exclude_resources` is deprecated"

WORKER_SETUP_HOOK = f"{__name__}.quiet_worker"


def skip_regex(existing: str | None = None) -> str:
    """The driver's skip pattern: the PreemptionWatcher notice, or-ed with a pattern the user already set."""
    if existing and PREEMPTION_WATCHER_NOTICE in existing:
        return existing
    return f"(?:{existing})|{PREEMPTION_WATCHER_NOTICE}" if existing else PREEMPTION_WATCHER_NOTICE


def filter_deprecations() -> None:
    """Ignore only Ray's self-inflicted exclude_resources RayDeprecationWarning (idempotent)."""
    # Importing the category first also imports ray.util.annotations, whose import-time
    # filterwarnings("module", RayDeprecationWarning) would otherwise be inserted ahead of this filter.
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", message=EXCLUDE_RESOURCES_DEPRECATION, category=RayDeprecationWarning)


class _DropNotice(logging.Filter):
    """Drops INFO (and lower) records whose message contains one of `notices`; warnings, errors and every
    other record pass."""

    def __init__(self, notices: tuple[str, ...]):
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and any(n in record.getMessage() for n in self.notices))


DATA_EXECUTOR_LOGGER = "ray.data._internal.execution.streaming_executor"
# Known-harmless INFO notices, by logger: Ray Data's "Dataset <id> execution finished in N seconds" (the
# training stream re-executes its dataset every epoch, so once per epoch) and "Progress bars disabled"
# (raygen prints its own progress), and Ray Train's "Reporting training result N: TrainingReport(...)"
# (every report's metrics dict, already in metrics.jsonl and the progress line). Failures
# ("execution failed") and everything else still pass.
NOTICES = {
    DATA_EXECUTOR_LOGGER: ("execution finished in",),
    "ray.data._internal.progress": ("Progress bars disabled",),
    # this module names its logger by its file path (`logging.getLogger(__file__)`), resolved below
    "ray.train.v2._internal.execution.context": ("Reporting training result",),
}


def _logger_name(name: str) -> str:
    if name == "ray.train.v2._internal.execution.context":
        try:
            import importlib

            return importlib.import_module(name).__file__
        except ImportError:
            return name
    return name


def filter_data_notices() -> None:
    for name, notices in NOTICES.items():
        log = logging.getLogger(_logger_name(name))
        if not any(isinstance(f, _DropNotice) for f in log.filters):
            log.addFilter(_DropNotice(notices))


def quiet_worker() -> None:
    """Ray's worker_process_setup_hook: runs once in every worker process of the job, before any task."""
    filter_deprecations()
    filter_data_notices()


def runtime_env() -> dict:
    """The job-level runtime_env for ray.init: Ray merges it with the one of `ray job submit`
    (env_vars key by key). A variable already set in the driver's environment (the user's, or the
    submitted job's env_vars) is left to it rather than overridden."""
    env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    env_vars = {k: v for k, v in {PRINT_PATCH_ENV: "0"}.items() if k not in os.environ}
    env_vars.update(storage_env())
    if env_vars:
        env["env_vars"] = env_vars
    return env


# what workers need to reach `run.storage`: the binding, and the job's cloud credentials and endpoints
# (on a cluster the nodes' own roles usually do; a job's explicit keys travel with it)
STORAGE_ENV_PREFIXES = ("RAYGEN_STORAGE", "RAYGEN_RUNS_ROOT", "AWS_", "GOOGLE_APPLICATION_CREDENTIALS")


def storage_env() -> dict:
    """The variables that bind `run.storage` for Ray workers, when a job bound it (raygen.core.storage)."""
    if "RAYGEN_STORAGE" not in os.environ:
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def quiet_driver() -> None:
    """Set up the driver's console; call once, before `import ray` and `ray.init`."""
    os.environ[SKIP_REGEX_ENV] = skip_regex(os.environ.get(SKIP_REGEX_ENV))
    filter_data_notices()
    ray_logging = sys.modules.get("ray._private.ray_logging")
    if ray_logging is not None:
        # Ray was imported already, so its deduplicators read the variable before it was set; give them
        # the same pattern as the import would have.
        for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
            dedup.skip_re = re.compile(os.environ[SKIP_REGEX_ENV])
    filter_deprecations()
