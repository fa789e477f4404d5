"""`python jobs/ablate.py --sweep NAME|FILE [--preset P] [key=value ...]`: a grid of full raygen runs as
Ray Tune trials, resumable, with a report at the end.

    runs/ablate/<sweep>/
      sweep.yaml          the sweep as run (a different sweep under the same name is refused)
      plan.json           every grid point: trial name, parameters, or why it is excluded
      stages/             stages every trial shares (the drifting MAE; the trained net of eval-only sweeps)
      trials/<trial>/     each trial's raygen run directory (config.yaml, checkpoints, samples, eval, trial.json)
      tune/               Ray Tune's experiment (state for resuming; TensorBoard logs with the HParams view)
      report.html, report.csv

Running the same command again restores the Tune experiment: finished trials are kept, unfinished
ones start again on their own run directory and Ray Train resumes them from their last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import yaml

from raygen.core.files import write_text
from raygen.config import ConfigError, write_config
from raygen.tune import sweep as sw
from raygen.tune.trial import STATUS_FILE, make_trainable, read_status, scalar_metrics, write_status


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/ablate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="shipped sweeps: " + ", ".join(sw.shipped_sweeps()))
    p.add_argument("--sweep", required=True, help="a shipped sweep name or a sweep .yaml file")
    p.add_argument("--preset", help="another base preset of the sweep's recipe for every trial")
    p.add_argument("--name", help="sweep directory name (default: the sweep's name); a new name starts afresh")
    p.add_argument("--runs-root", default=os.environ.get("RAYGEN_RUNS", "runs"),
                   help="where run directories go (default: ./runs or $RAYGEN_RUNS)")
    p.add_argument("--max-concurrent-trials", type=int, help="override the sweep's max_concurrent_trials")
    p.add_argument("--from-run", help="evaluation-only sweeps: the finished run whose network every trial evaluates")
    p.add_argument("--dry-run", action="store_true", help="check the sweep, print the trials and exclusions, stop")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")
    return p.parse_intermixed_args(argv)


def prepare_sweep_dir(spec: sw.SweepSpec, sweep_dir: Path) -> bool:
    """Create the sweep directory or check it holds this very sweep; True when resuming."""
    from raygen.core.job import prepare_run_dir

    stored = sweep_dir / "sweep.yaml"
    mine = sw.spec_dict(spec)
    if stored.is_file():
        theirs = yaml.safe_load(stored.read_text())
        # what defines the trials must match (the description may differ; a restored Tune experiment keeps
        # its own max_concurrent_trials)
        same = {"max_concurrent_trials", "description"}
        diff = sorted(k for k in set(mine) | set(theirs) if k not in same and mine.get(k) != theirs.get(k))
        if diff:
            raise ConfigError(f"{sweep_dir} holds a different sweep (differs in: {', '.join(diff)}); to resume it run "
                              f"its command again, to start this one pass --name <new name>")
        return True
    prepare_run_dir(sweep_dir)
    write_text(stored, yaml.safe_dump(mine, sort_keys=False))
    return False


def print_plan(spec: sw.SweepSpec, trials: list[sw.Trial], concurrent: int) -> None:
    runnable = [t for t in trials if not t.excluded]
    print(f"sweep {spec.name}: recipe {spec.recipe}, {len(trials)} grid points, {len(runnable)} trials "
          f"({concurrent} at a time), headline metric {spec.metric} ({spec.mode})", flush=True)
    for t in trials:
        print(f"  {'EXCLUDED ' if t.excluded else ''}{t.name}" + (f"\n      reason: {t.excluded}" if t.excluded else ""))


def shared_stage(spec: sw.SweepSpec, sweep_dir: Path, trials: list[sw.Trial]) -> dict:
    """Train what every trial shares, once, in <sweep>/shared; return the keys that point trials at it."""
    rec = sw.recipe(spec.recipe)
    base = next(t.cfg for t in trials if t.cfg is not None)
    shared_dir = sweep_dir / "stages"
    if spec.eval_only:
        if spec.eval_only.from_run:
            return {}
        train_dir = shared_dir / "train"
        if read_status(train_dir).get("status") != "finished":
            cfg = dataclasses.replace(base, eval=dataclasses.replace(base.eval, enabled=False))
            train_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, train_dir / "config.yaml")
            print(f"shared stage: training the network every trial evaluates, in {train_dir}", flush=True)
            rec.run(cfg, train_dir)
            write_status(train_dir, status="finished")
        return {}
    if rec.shared_stage is not None:
        return rec.shared_stage(base, shared_dir, list(spec.grid))
    return {}


def eval_source(spec: sw.SweepSpec, sweep_dir: Path) -> str | None:
    if not spec.eval_only:
        return None
    return str(Path(spec.eval_only.from_run).resolve()) if spec.eval_only.from_run else str(sweep_dir / "stages" / "train")


def write_plan(sweep_dir: Path, spec: sw.SweepSpec, trials: list[sw.Trial]) -> None:
    """plan.json, and each runnable trial's config.yaml (kept when the trial already started)."""
    entries = []
    for t in trials:
        entries.append({"name": t.name, "params": t.params, "excluded": t.excluded})
        if t.cfg is not None:
            run_dir = sweep_dir / "trials" / t.name
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(t.cfg, run_dir / "config.yaml")
            if not (run_dir / STATUS_FILE).exists():
                write_status(run_dir, status="pending", params=t.params)
    write_text(sweep_dir / "plan.json", json.dumps({"sweep": spec.name, "recipe": spec.recipe, "metric": spec.metric,
                                                    "mode": spec.mode, "keys": spec.keys_order,
                                                    "eval_only": bool(spec.eval_only), "trials": entries},
                                                   indent=2) + "\n")


def _status_callback(sweep_dir: Path):
    from ray import tune

    class TrialStatus(tune.Callback):
        """Marks trials Tune ended without their own final word: stopped early by the scheduler."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            run_dir = sweep_dir / "trials" / trial.config["trial"]["name"]
            st = read_status(run_dir)
            # Tune ended it without an error and it did not finish: the scheduler stopped it (the trial
            # function may have seen its Train run torn down and recorded that as an error first)
            if st.get("status") in ("running", "error"):
                wall = st.get("wall_s", 0) if st["status"] == "error" else st.get("wall_s", 0) + time.time() - st["started"]
                write_status(run_dir, status="stopped", stopped_by="scheduler", error=None, wall_s=wall,
                             metrics=scalar_metrics(trial.last_result or {}))

    return TrialStatus()


def run_sweep(spec: sw.SweepSpec, sweep_dir: Path, trials: list[sw.Trial], concurrent: int) -> None:
    from ray import tune

    runnable = [t for t in trials if not t.excluded]
    trainable = tune.with_resources(make_trainable(sweep_dir, spec.recipe, eval_source(spec, sweep_dir)),
                                    sw.driver_resources(spec))
    experiment = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(experiment)):
        print(f"resuming sweep {sweep_dir}: finished trials are kept, unfinished ones continue", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        scheduler = None
        if spec.scheduler:
            from ray.tune.schedulers import ASHAScheduler

            s = spec.scheduler
            scheduler = ASHAScheduler(time_attr="step", metric=s.metric, mode=s.mode, grace_period=s.grace_period,
                                      reduction_factor=s.reduction_factor,
                                      # past the last step: ASHA stops a trial at max_t, before its evaluation
                                      max_t=max(t.cfg.train.steps for t in runnable) + 1)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([{"name": t.name, "params": t.params} for t in runnable])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=scheduler,
                                        trial_name_creator=lambda t: t.config["trial"]["name"],
                                        trial_dirname_creator=lambda t: t.config["trial"]["name"]),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), callbacks=[_status_callback(sweep_dir)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    tuner.fit()


def main(argv=None) -> Path:
    from raygen.core import storage
    from raygen.core.job import fail, init_ray
    from raygen.tune.report import write_report

    args = parse_args(argv)
    try:
        spec = sw.load_sweep(args.sweep, args.preset, args.overrides)
        if args.max_concurrent_trials:
            spec.max_concurrent_trials = args.max_concurrent_trials
        if args.from_run:
            spec.eval_only = sw.EvalOnly(from_run=args.from_run)
        trials = sw.plan(spec)  # everything is checked before the first trial (or shared stage) starts
        sw.check_metrics(spec, trials)
        root = next((t.cfg.run.storage for t in trials if t.cfg is not None), None)
        storage.check(root)
    except ConfigError as e:
        fail(str(e))
    storage.bind(root, args.runs_root)  # trials' checkpoints, metrics and eval results go to run.storage too
    init_ray()
    import ray

    try:
        sw.resolve_resources(spec, ray.cluster_resources())  # gpus_per_worker unset: the cluster's GPUs if any
        concurrent = sw.check_resources(spec, ray.cluster_resources())
        if spec.resources.gpus_per_worker:
            trials = sw.plan(spec)  # the trials' configs now train on GPUs
    except ConfigError as e:
        fail(str(e))
    print_plan(spec, trials, concurrent)
    if args.dry_run:
        return None
    sweep_dir = Path(args.runs_root).expanduser().resolve() / "ablate" / (args.name or spec.name)
    if storage.pull(sweep_dir):  # a sweep resumed on a fresh cluster
        print(f"fetched sweep {sweep_dir.name} from {storage.display(storage.remote_of(sweep_dir))}", flush=True)
    try:
        resumed = prepare_sweep_dir(spec, sweep_dir)
        trials = sw.plan(spec, shared_stage(spec, sweep_dir, trials))
        write_plan(sweep_dir, spec, trials)
    except ConfigError as e:
        fail(str(e))
    print(f"{'resuming' if resumed else 'starting'} sweep in {sweep_dir}", flush=True)
    try:
        run_sweep(spec, sweep_dir, trials, concurrent)
    finally:  # also after a Ctrl-C: the report shows where the sweep stands
        out = write_report(sweep_dir)
        print(f"report: {out}", flush=True)
        storage.push(sweep_dir)
    ray.shutdown()  # flushes the workers' forwarded output, so the line below stays the last one
    print(f"tensorboard --logdir {sweep_dir / 'tune'}   # HParams tab: every trial's parameters and final metrics")
    print(f"sweep_dir: {sweep_dir}", flush=True)
    return sweep_dir
