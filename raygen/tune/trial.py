"""One sweep trial: a full raygen run of the recipe (checkpoints, samples, evaluation) in
<sweep>/trials/<name>, started by a Tune trial. A trial started again (a resumed sweep) runs the same
recipe on the same run directory, so Ray Train continues from that run's last checkpoint; a trial
whose run already finished reports its recorded result without running again.

trial.json in the run directory is the trial's status for the report: running, finished, error or
stopped (by the scheduler), with the wall time summed over attempts and the final metrics.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from raygen.core.files import write_text

STATUS_FILE = "trial.json"


def read_status(run_dir: Path) -> dict:
    """trial.json. A trial the scheduler stopped reads as `stopped` even if its own process, torn down
    at the same moment, recorded the interruption as an error after the driver marked it."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if status.get("stopped_by"):
        status.update(status="stopped", error=None)
    return status


def write_status(run_dir: Path, **fields) -> dict:
    status = {**read_status(run_dir), **fields, "updated": time.time()}
    write_text(Path(run_dir) / STATUS_FILE, json.dumps(status, indent=2) + "\n")
    return status


def scalar_metrics(metrics: dict) -> dict:
    """The numbers of a result (Tune's loggers and the report take scalars)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def make_trainable(sweep_dir: Path, recipe: str, eval_from: str | None):
    """Tune's function trainable for a sweep; its config is {"trial": {"name", "params"}} (a module-level
    function bound with `tune.with_parameters`, so nothing of the driver's state is pickled with it)."""
    from ray import tune

    return tune.with_parameters(run_trial, sweep_dir=str(sweep_dir), recipe=recipe, eval_from=eval_from)


def run_trial(config: dict, sweep_dir: str, recipe: str, eval_from: str | None) -> None:
    """Run the trial's recipe on its run directory. The trial's own Train run gets the callback that
    forwards its reports to Tune (ASHA, Tune's loggers); a stage trained inside it (the drifting MAE)
    does not, so its steps never mix with the trial's."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raygen import recipes
    from raygen.config import load_config
    from raygen.train.logging import read_metrics

    run_dir = Path(sweep_dir) / "trials" / config["trial"]["name"]
    status = read_status(run_dir)
    if status.get("status") == "finished":  # finished before the driver recorded it: keep it
        tune.report({**status.get("metrics", {}), "eval_done": 1})
        return
    rec = recipes.get(recipe)
    cfg, _ = load_config(rec.config, preset=None, preset_dir=Path("/nonexistent"),
                         config_file=str(run_dir / "config.yaml"))
    started = time.time()
    prior = float(status.get("wall_s", 0.0))
    write_status(run_dir, status="running", started=started, wall_s=prior, stopped_by=None,
                 attempts=int(status.get("attempts", 0)) + 1, params=config["trial"]["params"])
    try:
        if eval_from:
            metrics = rec.evaluate(cfg, run_dir, eval_from)
        else:
            metrics = rec.run(cfg, run_dir, callbacks=[TuneReportCallback()])
    except BaseException as e:
        write_status(run_dir, status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:500],
                     wall_s=prior + time.time() - started)
        raise
    records = read_metrics(run_dir)
    final = {**scalar_metrics(records[-1] if records else {}), **scalar_metrics(metrics or {})}
    write_status(run_dir, status="finished", wall_s=prior + time.time() - started, metrics=final)
    tune.report({**final, "eval_done": 1})
