"""`run.storage=s3://...` against a real S3 server (moto, on the loopback address): a run killed with
SIGKILL and resumed from the bucket on a fresh cluster, with an empty runs root, equals an uninterrupted
run; everything a run promises is in the bucket."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
N = 24  # long enough that the kill lands mid-run (the tiny net trains ~17 steps/s)
TINY = ["--preset", "smoke", f"train.steps={N}", "train.ckpt_every=4", "train.log_every=1", "train.batch_size=32",
        "train.sample_every=4", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "log.wandb=false",
        "log.progress=false", "eval.enabled=false", "optim.warmup_steps=2"]


def job(args, env, runs_root):
    return [sys.executable, str(ROOT / "jobs" / "dit.py"), *TINY, *args, "--runs-root", str(runs_root)]


def final_state(s3, prefix: str) -> dict:
    """The latest registered checkpoint of the run under `prefix`, read back from the bucket as Ray
    Train recorded it."""
    from ray.train import Result

    [run] = {k.split("/")[2] for k in s3.keys(f"{prefix}/dit/") if k.count("/") > 2}
    result = Result.from_path(s3.uri(f"{prefix}/dit/{run}/checkpoints"))
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        state.update(json.loads((Path(d) / "record.json").read_text()))
    return state


def bucket_text(s3, key: str) -> str:
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode()


@pytest.mark.slow
def test_a_run_killed_and_resumed_from_the_bucket_equals_an_uninterrupted_one(s3_server, job_env, tmp_path):
    s3 = s3_server
    # the job's own credentials and endpoint (the session's cluster was started without them): raygen
    # passes them to its Ray workers and to Ray Train's controller through the job's runtime environment
    env = {**job_env, **s3.env}
    # the uninterrupted run and the one to kill side by side (one worker each on the session's 2 CPUs)
    straight = subprocess.Popen(job([f"run.storage={s3.plain_uri('straight')}", "run.name=straight"], env,
                                    tmp_path / "a"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    # killed without warning once its first checkpoint is registered in the bucket
    killed_args = [f"run.storage={s3.plain_uri('killed')}", "run.name=killed"]
    proc = subprocess.Popen(job(killed_args, env, tmp_path / "b"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    while not any(k.endswith("checkpoints/checkpoint_manager_snapshot.json") for k in s3.keys("killed/")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 300, "no checkpoint registered in the bucket"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    shutil_rm(tmp_path / "b")  # nothing local survives: the resume has only the bucket
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out[-3000:]

    # resumed on a fresh cluster (the job starts its own Ray) with an empty runs root
    fresh_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    resumed = subprocess.run(job(killed_args, fresh_env, tmp_path / "c"), env=fresh_env, capture_output=True,
                             text=True, timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "fetched run" in out and "resuming run" in out

    a, b = final_state(s3, "straight"), final_state(s3, "killed")
    assert a["counters"]["step"] == b["counters"]["step"] == N and a["counters"]["data"] == b["counters"]["data"]
    for part in ("model", "ema", "optimizer"):
        flat_a = torch.nn.utils.parameters_to_vector([v for v in _tensors(a[part])])
        flat_b = torch.nn.utils.parameters_to_vector([v for v in _tensors(b[part])])
        torch.testing.assert_close(flat_a, flat_b, rtol=1e-5, atol=1e-6, msg=f"{part} differs")

    # the bucket holds what the run promises, each step logged once across the kill
    [run] = {k.split("/")[2] for k in s3.keys("killed/dit/") if k.count("/") > 2}
    keys = set(s3.keys(f"killed/dit/{run}/"))
    for rel in ("config.yaml", "metrics.jsonl", "net_ema.pt", "plots/training.png", f"samples/step_{N:07d}.png"):
        assert f"killed/dit/{run}/{rel}" in keys, rel
    steps = [json.loads(line)["step"] for line in bucket_text(s3, f"killed/dit/{run}/metrics.jsonl").splitlines()]
    assert steps == list(range(1, N + 1))
    local = next((tmp_path / "c" / "dit").glob("*-killed"))
    assert local.name == run and [json.loads(x)["step"] for x in (local / "metrics.jsonl").read_text().splitlines()] \
        == steps
    assert not (local / "checkpoints").exists()  # Ray Train read and wrote them in the bucket only


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree.float().flatten()
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _tensors(tree[k])
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def shutil_rm(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
