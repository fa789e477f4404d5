"""The drifting job end to end (MAE -> generator with a worker failure and a resume -> the omega sweep
through the one evaluator), then the same command again."""
import json

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_smoke_chain_end_to_end_with_a_worker_failure(run_job, tmp_path):
    """MAE -> generator (a worker fails once at step 7 and the group resumes from the step-6
    checkpoint) -> omega sweep; every promised file exists with the right content."""
    run_dir, _ = run_job("drifting", "--preset", "smoke", "debug.fail_at_step=7", "run.name=chain")
    assert run_dir.parent == tmp_path / "drifting"
    assert (run_dir / "mae" / "net_ema.pt").is_file() and (run_dir / "mae" / "config.yaml").is_file()
    assert (run_dir / "net_ema.pt").is_file()
    assert (run_dir / ".debug_failed_at_7").exists()

    sweep = json.loads((run_dir / "eval" / "omega_sweep.json").read_text())
    assert [r["omega"] for r in sweep] == [1.0, 2.0]
    for r in sweep:
        assert r["fid"] > 0 and 0.0 <= r["class_accuracy"] <= 1.0 and r["num_samples"] == 100
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 and r["diversity_ratio"] >= 0.0
    assert (run_dir / "eval" / "omega_sweep.csv").read_text().startswith("omega,")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["best_omega"] in (1.0, 2.0) and metrics["omega"] == metrics["best_omega"]
    best = min(sweep, key=lambda r: r["fid"])
    for k in ("fid", "precision", "recall", "diversity_ratio", "class_accuracy"):
        assert metrics[k] == best[k] and metrics[f"{k}@omega={best['omega']:g}"] == best[k]
    assert metrics["fid_untrained"] > 0 and metrics["classifier_test_accuracy"] >= 0.97
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12], "resumed at step 6 without losing or repeating a log"
    assert all(np.isfinite(r["loss"]) for r in records)
    for r in records:  # the method's own diagnostics: drift norms per temperature, the omega drawn
        assert all(r[f"drift_theta_{R}"] > 0 for R in ("0.02", "0.05", "0.2")) and 1.0 <= r["omega_mean"] <= 4.0
    for png in ("eval/omega_sweep.png", "eval/samples_omega1.png", "eval/samples_omega2.png", "eval/samples.png",
                "plots/training.png", "samples/step_0000012.png", "mae/plots/training.png",
                "mae/samples/step_0000020.png"):
        Image.open(run_dir / png).verify()
    # the same command again: the finished MAE is reused, training is done, evaluation is skipped
    again, proc = run_job("drifting", "--preset", "smoke", "run.name=chain", "eval.enabled=false")
    assert "using the MAE already trained" in proc.stdout
    assert again == run_dir
