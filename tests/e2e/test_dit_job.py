"""The job as a user runs it: `python jobs/dit.py --preset smoke` in a fresh process (its own local
Ray cluster), and the same script through `ray job submit` against a `ray start --head` cluster."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, run_job):
    run_dir, proc = run_job("dit", "--preset", "smoke")
    assert run_dir.is_dir() and run_dir.parent == tmp_path / "dit"

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for key in ("fid", "precision", "recall", "diversity_ratio", "fid_features", "class_accuracy", "num_samples",
                "steps", "cfg_scale", "settings", "fid_untrained", "recipe"):
        assert key in metrics, key
    assert metrics["fid_features"] == "digits" and metrics["num_samples"] == 100 and metrics["recipe"] == "dit"
    assert metrics["steps"] == 10 and metrics["settings"] == {"steps": 10, "cfg_scale": 1.25}
    assert 0.0 <= metrics["class_accuracy"] <= 1.0 and metrics["fid"] > 0
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0
    assert metrics["classifier_test_accuracy"] >= 0.97  # the feature network itself is good

    sweep = json.loads((run_dir / "eval" / "steps_sweep.json").read_text())
    assert [r["steps"] for r in sweep] == [5, 10] and all("fid" in r and "recall" in r for r in sweep)
    assert (run_dir / "eval" / "steps_sweep.csv").read_text().startswith("steps,")
    assert metrics["fid@steps=5"] == sweep[0]["fid"]
    # a quiet console: every progress line once, no Ray-internal notices, the summary, then run_dir
    out = proc.stdout + proc.stderr
    progress = [ln for ln in out.splitlines() if "train " in ln and "step" in ln and "%|" in ln]
    assert progress and len(progress) == len(set(progress)), progress
    for noise in ("PreemptionWatcher", "exclude_resources", "Matrix is singular"):
        assert noise not in out, noise
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for png in ("eval/samples.png", "eval/steps_sweep.png", "eval/samples_steps5.png", "plots/training.png", "samples/step_0000015.png",
                "samples/step_0000030.png"):
        Image.open(run_dir / png).verify()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B must run offline without a key"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "train.steps: 30" not in (run_dir / "config.yaml").read_text()  # nested YAML, not dotted
    assert "steps: 30" in (run_dir / "config.yaml").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.extended  # ~2 min of its own head node; left out of the default run for time (pytest -m extended)
def test_ray_job_submit_against_a_head_node(tmp_path):
    """The README's cluster form: ray start --head, then RAY_AUTH_MODE=token ray job submit."""
    port, dash = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # the venv first on PATH, as for a user with an activated venv: the job's `python` must be it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "WANDB_MODE": "offline", "PATH": f"{BIN}:{os.environ['PATH']}"}
    # --block keeps the head in this child process, so stopping it stops only this cluster (`ray stop`
    # would also stop the test session's own cluster)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                             # the test session's own cluster holds the default agent/metrics ports
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}",
                             f"--temp-dir={ray_tmp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        job = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
               str(ROOT), "--", "python", "jobs/dit.py", "--preset", "smoke", "--runs-root", str(tmp_path / "runs"),
               "train.steps=10", "train.ckpt_every=10", "train.sample_every=10", "log.wandb=false",
               "eval.untrained_baseline=false", "eval.sweep={steps: [5]}"]
        for _ in range(60):  # the dashboard and its agent need a few seconds after `ray start`
            assert head.poll() is None, head.stderr.read().decode()[-2000:]
            proc = subprocess.run(job, capture_output=True, text=True, env=env, timeout=600)
            out = proc.stdout + proc.stderr
            not_ready = ("Connection refused", "Failed to connect", "No available agent", "try again later")
            if not any(m in out for m in not_ready):
                break
            time.sleep(2)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "succeeded" in proc.stdout
        run_dir = Path(proc.stdout.split("run_dir: ")[-1].split()[0])
        assert (run_dir / "eval" / "metrics.json").exists()
        assert (run_dir / "checkpoints").is_dir()
    finally:
        head.terminate()
        head.wait(timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
