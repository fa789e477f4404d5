"""raygen.core.console: the filters themselves, against Ray's own classes, without a cluster."""
import builtins
import importlib
import io
import logging
import os
import re
import sys
import warnings

import pytest

from raygen.core import console

# The notice as the driver received it from the TrainController (Ray 2.60).
NOTICE = ("[2026-12-03 07:44:19,965 E 4269 4297] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
          "and ID: 'e265be465fcae64ba945d6dd01000000' has constructor arguments in the object store and "
          "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
          "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
KEPT = [
    NOTICE.replace("'PreemptionWatcher'", "'MyActor'"),  # the same notice for a user's actor still shows
    "[2026-12-03 07:44:20,001 E 4269 4297] core_worker.cc:900: Unhandled error (suppress with ...)",
    "Traceback (most recent call last):",
    "RuntimeError: boom",
    "train run:  90%|#####     | 27/30 [00:13<00:01,  2.02step/s] loss 0.6132",
]


def test_skip_regex_drops_only_the_preemption_watcher_notice():
    from ray._private.ray_logging import LogDeduplicator
    from ray._private.ray_constants import RAY_DEDUP_LOGS

    pattern = console.skip_regex()
    assert [line for line in [NOTICE, *KEPT] if not re.search(pattern, line)] == KEPT
    if not RAY_DEDUP_LOGS:
        pytest.skip("RAY_DEDUP_LOGS=0: Ray's driver does not apply its skip pattern")
    # Ray's own driver-side filter of forwarded worker output, given the pattern quiet_driver sets.
    dedup = LogDeduplicator(5, None, pattern)
    out = dedup.deduplicate({"ip": "1.2.3.4", "pid": 4269, "job": "01", "is_err": True, "lines": [NOTICE, *KEPT]})
    assert out[0]["lines"] == KEPT


def test_skip_regex_keeps_the_users_pattern():
    pattern = console.skip_regex("^noise$")
    assert re.search(pattern, "noise") and re.search(pattern, NOTICE) and not re.search(pattern, "noise!")
    assert console.skip_regex(pattern) == pattern  # calling twice does not grow it


def test_exclude_resources_deprecation_filtered_other_deprecations_not():
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.filter_deprecations()
        ExecutionOptions(exclude_resources=ExecutionResources.zero())  # what ray.train's DataConfig does
        ExecutionOptions(actor_locality_enabled=False)  # another Ray deprecation
        warnings.warn("`ExecutionOptions.exclude_resources` is deprecated", DeprecationWarning)  # not Ray's
        warnings.warn("something else is deprecated", RayDeprecationWarning)
    got = [(w.category, str(w.message)[:40]) for w in caught]
    assert not any(c is RayDeprecationWarning and "exclude_resources" in m for c, m in got), got
    assert (DeprecationWarning, "`ExecutionOptions.exclude_resources` is ") in got
    assert any("actor_locality_enabled" in m for _, m in got)
    assert (RayDeprecationWarning, "something else is deprecated") in got


def _print_through_train_patch(monkeypatch) -> str:
    """Print once the way a Ray Train worker does: Train's patch_print_function, a root logger with a
    console handler on stderr, and sys.stderr rebound as Ray's default_worker.py does at start-up."""
    from ray.train.v2._internal.logging import patch_print

    stream = io.StringIO()
    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test
    monkeypatch.setattr(sys, "stderr", stream)  # `sys.stderr is not sys.__stderr__`, as in every Ray worker
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    patch_print.patch_print_function()
    print("step 1/30", file=sys.stderr, flush=True)
    return stream.getvalue()


def test_train_print_patch_writes_twice_in_a_worker(monkeypatch):
    monkeypatch.delenv(console.PRINT_PATCH_ENV, raising=False)
    assert _print_through_train_patch(monkeypatch) == "step 1/30\nstep 1/30\n"  # the cause


def test_print_patch_off_writes_once(monkeypatch):
    monkeypatch.delenv(console.PRINT_PATCH_ENV, raising=False)
    for k, v in console.runtime_env()["env_vars"].items():
        monkeypatch.setenv(k, v)
    assert _print_through_train_patch(monkeypatch) == "step 1/30\n"


def test_runtime_env(monkeypatch):
    monkeypatch.delenv(console.PRINT_PATCH_ENV, raising=False)
    env = console.runtime_env()
    assert env["env_vars"] == {console.PRINT_PATCH_ENV: "0"}
    module, _, name = env["worker_process_setup_hook"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is console.quiet_worker
    monkeypatch.setenv(console.PRINT_PATCH_ENV, "1")  # the user's (or the submitted job's) choice stands
    assert "env_vars" not in console.runtime_env()


def test_quiet_driver_sets_the_skip_pattern(monkeypatch):
    monkeypatch.setenv(console.SKIP_REGEX_ENV, "^mine$")
    ray_logging = pytest.importorskip("ray._private.ray_logging")
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        monkeypatch.setattr(dedup, "skip_re", dedup.skip_re)  # restored after the test
    with warnings.catch_warnings():
        console.quiet_driver()
    assert os.environ[console.SKIP_REGEX_ENV] == console.skip_regex("^mine$")
    assert re.search(ray_logging.stderr_deduplicator.skip_re, NOTICE)  # Ray was imported before: applied too
    assert ray_logging.stderr_deduplicator.skip_re.search("mine")


def test_dataset_finished_notice_is_dropped_but_a_failure_is_not():
    import logging

    from raygen.core.console import DATA_EXECUTOR_LOGGER, filter_data_notices

    filter_data_notices()
    log = logging.getLogger(DATA_EXECUTOR_LOGGER)
    make = lambda level, msg: log.makeRecord(log.name, level, __file__, 1, msg, (), None)  # noqa: E731
    assert not log.filter(make(logging.INFO, "✔️  Dataset train_1 execution finished in 0.07 seconds"))
    assert log.filter(make(logging.INFO, "⚠️  Dataset train_1 execution failed"))
    assert log.filter(make(logging.WARNING, "something else"))
    filter_data_notices()  # idempotent: one filter
    assert sum(type(f).__name__ == "_DropNotice" for f in log.filters) == 1
    from ray.train.v2._internal.execution import context as train_context

    train = train_context.logger  # the very logger Ray Train reports through (named by its file path)
    assert not train.filter(train.makeRecord(train.name, logging.INFO, __file__, 1,
                                             "Reporting training result 3: TrainingReport(...)", (), None))
    assert train.filter(train.makeRecord(train.name, logging.ERROR, __file__, 1, "worker died", (), None))
