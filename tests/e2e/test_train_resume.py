"""The generic loop under a real TorchTrainer on the session's Ray cluster: checkpoint + fault
restart + rerun-resume reproduce a straight run exactly; NaN losses are skipped and counted, and
too many in a row stop the run with a clear message."""
import json
from pathlib import Path

import pytest
import torch

from raygen.cli import run_job
from raygen.train.checkpoint import EXPORT_FILE, latest_checkpoint, read_record


def main(argv):
    return run_job("dit", argv)


N = 8
TINY = [
    "--preset", "smoke", f"train.steps={N}", f"train.ckpt_every={N // 2}", "train.log_every=1",
    "train.batch_size=32", "train.sample_every=1000", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
    "log.wandb=false", "log.progress=false", "eval.enabled=false", "optim.warmup_steps=2",
]


def final_state(run_dir: Path) -> dict:
    """The latest registered checkpoint's payload and record (as Ray Train recorded it)."""
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return {**torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False), **read_record(ckpt)}


def metric_steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_training(a: dict, b: dict):
    assert a["counters"]["step"] == b["counters"]["step"] == N
    assert a["counters"]["data"] == b["counters"]["data"]
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k} differs")


@pytest.mark.slow
def test_fault_restart_and_resume_reproduce_a_straight_run(ray_cluster, tmp_path, capsys):
    root = ["--runs-root", str(tmp_path)]
    common = TINY + root + ["debug.nan_at_steps=[2]", "train.grad_accum=2"]
    straight = main(common + ["run.name=straight"])

    # a worker raises at step 5; FailureConfig(max_failures=1) restarts the group from the step-4 checkpoint
    restarted = main(common + ["run.name=fault", "debug.fail_at_step=5", "train.max_failures=1"])
    assert (restarted / ".debug_failed_at_5").exists()

    # the same failure without retries stops the job; running the same command again resumes it
    killed = common + ["run.name=killed", "debug.fail_at_step=5", "train.max_failures=0"]
    with pytest.raises(SystemExit) as exc:
        main(killed)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "injected worker failure" in err and "run.name=killed" in err
    resumed = main(killed)
    assert resumed.name.endswith("-killed") and len(list(tmp_path.glob("dit/*-killed"))) == 1

    ref = final_state(straight)
    for other in (restarted, resumed):
        assert_same_training(ref, final_state(other))
        records = metric_steps(other)
        assert [r["step"] for r in records] == list(range(1, N + 1)), "each step must be logged exactly once"
    # the NaN at step 2 was skipped and counted, not trained on
    assert metric_steps(straight)[-1]["nonfinite_total"] == 1
    assert all(torch.isfinite(v).all() for v in ref["model"].values())
    # every output a run promises
    for rel in ("config.yaml", "metrics.jsonl", "plots/training.png", f"samples/step_{N:07d}.png", "tensorboard",
                EXPORT_FILE):
        assert (straight / rel).exists(), rel
    # the exported EMA rebuilds the network with no config: its weights are the checkpoint's EMA
    from raygen.train.checkpoint import load_exported

    net, record = load_exported(straight)
    assert record["step"] == N and record["recipe"] == "dit"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ref["ema"][k].to(v.dtype))


@pytest.mark.slow
def test_many_nonfinite_losses_in_a_row_stop_with_a_clear_message(ray_cluster, tmp_path, capsys):
    args = TINY + ["--runs-root", str(tmp_path), "debug.nan_at_steps=[1,2,3]", "train.max_nonfinite_in_a_row=3",
                   "train.max_failures=0"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "3 non-finite losses/gradients in a row" in err and "optim.lr" in err
