"""The JAX backend's TPU path (`train.use_tpu=true`) on a local cluster with a simulated 2-host TPU v4
slice, as Ray's own JaxTrainer tests do: Ray reserves the slice from topology and accelerator type and
starts JAX's distributed runtime itself; JAX runs on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_tpu_path_on_a_simulated_slice(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "tpu_slice_run.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={k: v for k, v in __import__("os").environ.items()
                                                       if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["error"] is None and result["checkpoint"]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, seen in enumerate(ranks):  # one JAX process per host, joined into one 2-device runtime by Ray
        assert seen == {"process_count": 2, "process_index": r, "device_count": 2, "platform": "cpu",
                        "jax_platforms": "cpu"}
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    ckpt = json.loads((Path(result["checkpoint"]) / "record.json").read_text())
    assert ckpt["backend"] == "jax" and ckpt["step"] == 4
