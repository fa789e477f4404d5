"""`python jobs/diffit.py --preset smoke` as a user runs it, with a learned variance (L_simple + lambda L_vlb),
respaced ancestral sampling and the CFG ramp: a worker failure restarts from the last checkpoint (every step
logged once), then the run samples, evaluates and exports the EMA of its last checkpoint."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from raygen.train.checkpoint import EXPORT_FILE, latest_checkpoint, load_exported


@pytest.mark.slow
def test_diffit_smoke_with_learned_sigma_and_a_worker_failure(run_job):
    run_dir, _ = run_job("diffit", "--preset", "smoke", "debug.fail_at_step=15", "train.max_failures=1",
                         "method.learn_sigma=true", "method.sampler=ddpm", "method.respace=10",
                         "method.cfg_schedule=power_cosine", "eval.sweep=null", "eval.sweep={respace: ['5', '10']}", "log.wandb=false")
    assert (run_dir / ".debug_failed_at_15").exists()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in records] == [10, 20], "each step logged once across the restart"
    assert all(np.isfinite(r["loss_vlb"]) and r["loss_vlb"] > 0 for r in records)  # the variance head trains

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["recipe"] == "diffit" and metrics["nfe"] == 10  # 10 respaced ancestral steps
    for key in ("fid", "precision", "recall", "diversity_ratio", "class_accuracy", "fid_untrained"):
        assert np.isfinite(metrics[key]), key
    sweep = json.loads((run_dir / "eval" / "respace_sweep.json").read_text())
    assert [(str(r["respace"]), r["nfe"]) for r in sweep] == [("5", 5), ("10", 10)]
    for png in ("eval/samples.png", "samples/step_0000020.png", "plots/training.png"):
        Image.open(run_dir / png).verify()

    # the export is the last checkpoint's EMA of a DiffiT U-Net with the variance channels
    net, record = load_exported(run_dir)
    assert type(net).__name__ == "DiffiTUNet" and net.out_channels == 2 and record["recipe"] == "diffit"
    state = torch.load(latest_checkpoint(run_dir) / "state.pt", map_location="cpu", weights_only=False)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state["ema"][k].to(v.dtype))
    assert (run_dir / EXPORT_FILE).is_file()
