"""`jobs/generate.py` and `jobs/fid.py` as a user runs them (subprocesses joined to the session's Ray cluster):
a generation killed with SIGKILL and resumed writes every seed exactly once and the same images as an
uninterrupted one; a rerun with other sampler settings is refused; the npz format round-trips; `calc` over
Ray tasks gives the in-process value.

The run directory is made without training, as a finished run leaves it: the `smoke` preset's config.yaml
(raygen.config.write_config) and an untrained DiT-T/4 with random weights exported as net_ema.pt
(raygen.train.checkpoint.export_ema): ~0.2 s instead of a ~40 s training job."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SEEDS = "0-39"
# 20 batches of 2 on 2 CPU workers (also where the cluster has a GPU): seconds, long enough to kill mid-run
SLOW = ["sampler.steps=100", "batch=2", "workers=2", "use_gpu=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from raygen import recipes
    from raygen.cli import load_resolved
    from raygen.config import write_config
    from raygen.train.checkpoint import export_ema

    run = tmp_path_factory.mktemp("runs") / "dit" / "20260101-000000-smoke"
    run.mkdir(parents=True)
    recipe = recipes.get("dit")
    cfg, given_cfg, given = load_resolved(recipe, preset="smoke")
    write_config(cfg, run / "config.yaml", given, given_cfg)
    task = recipe.task(cfg)
    net = task.build_net()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere (DiT zero-initialises its output layer): images vary by seed
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    export_ema(run, task.net_spec(), net.state_dict(), step=0, recipe="dit")
    return run


def job(name: str, *args, env, expect: int | None = 0, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600, **kw)
    if expect is not None:
        assert proc.returncode == expect, (proc.stdout + proc.stderr)[-3000:]
    return proc


def pngs(out: Path) -> dict[int, Path]:
    files = sorted(out.glob("[0-9]*/[0-9]*.png"))
    return {int(f.stem): f for f in files}


def read(files: dict[int, Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(files[s])) for s in sorted(files)])


@pytest.mark.slow
def test_killed_generation_resumes_with_every_seed_once_and_the_same_images(run_dir, tmp_path, job_env):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = [f"run={run_dir}", f"seeds={SEEDS}", *SLOW]
    cmd = [sys.executable, str(ROOT / "jobs" / "generate.py"), *args, f"out={out}"]
    proc = subprocess.Popen(cmd, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, killed as a whole
    deadline = time.monotonic() + 300
    while len(pngs(out)) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the killed driver's actors stop when Ray sees it gone; wait until nothing more is written
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 2.0:
        n = len(pngs(out))
        if n != last:
            last, stable_since = n, time.monotonic()
        time.sleep(0.1)
    before = pngs(out)
    assert 6 <= len(before) < 40, f"the kill should land mid-run, {len(before)} of 40 were written"
    stamps = {s: (f.stat().st_ino, f.stat().st_mtime_ns) for s, f in before.items()}
    stale = out / "000000" / ".000039.png.12345.0123abcd.tmp"  # what a write cut by SIGKILL leaves
    stale.write_bytes(b"half a png")

    resumed = job("generate", *args, f"out={out}", env=job_env)
    assert f"40 seeds, {len(before)} already written" in resumed.stdout
    lines = resumed.stdout.strip().splitlines()
    assert lines[-2] == f"samples: {out}" and lines[-1] == f"run_dir: {out}"
    after = pngs(out)
    assert sorted(after) == list(range(40))  # every seed, each once (one file name per seed)
    assert {s: (after[s].stat().st_ino, after[s].stat().st_mtime_ns) for s in before} == stamps  # none rewritten
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    assert json.loads((out / "manifest.json").read_text())["seeds"] == SEEDS

    refused = job("generate", f"run={run_dir}", f"seeds={SEEDS}", "sampler.steps=20", f"out={out}", env=job_env,
                  expect=2)
    err = refused.stderr.strip().splitlines()[-1]
    assert "sampler.steps: 100 -> 20" in err and "another out=" in err
    assert pngs(out).keys() == after.keys()

    # uninterrupted, into another dir, as format=npz (per-batch shards, then samples.npz): the same images
    made = job("generate", *args, "format=npz", f"out={fresh}", env=job_env)
    assert made.stdout.strip().splitlines()[-2] == f"samples: {fresh / 'samples.npz'}"
    with np.load(fresh / "samples.npz") as z:
        assert z["images"].shape == (40, 16, 16, 1) and z["images"].dtype == np.uint8
        np.testing.assert_array_equal(z["seeds"], np.arange(40))
        np.testing.assert_array_equal(z["labels"], np.arange(40) % 10)  # class-balanced by seed
        a, b = read(after), z["images"][..., 0]
    assert not (fresh / "shards").exists()
    assert len(np.unique(a.reshape(40, -1), axis=0)) == 40  # the images differ by seed
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).sum())
    again = job("generate", *args, "format=npz", f"out={fresh}", env=job_env)
    assert "40 seeds, 40 already written" in again.stdout

    # jobs/fid.py on the generated folder: Ray tasks (2 workers) give the in-process value
    from raygen.data.embedded import digits
    from raygen.eval.fid_protocol import calc

    train, labels = digits(16, "train")
    zpath = tmp_path / "digits.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i, img in enumerate(train[:300]):
            buf = io.BytesIO()
            Image.fromarray(img[..., 0]).save(buf, format="PNG")
            zf.writestr(f"{i:08d}"[:5] + f"/img{i:08d}.png", buf.getvalue())
    ref = tmp_path / "ref.npz"
    made = job("fid", "ref", "--data", zpath, "--dest", ref, env=job_env)
    assert made.stdout.strip().splitlines()[-1] == f"ref: {ref}"
    scored = job("fid", "calc", "--images", out, "--ref", ref, "--num", 20, "--seeds", 2, "--workers", 2,
                 env=job_env)
    result = json.loads((out / "fid.json").read_text())
    assert scored.stdout.strip().splitlines()[-1] == f"fid: {result['fid']:g}"
    local = calc(str(out), str(ref), 20, 2, False, None, None, "edm", 250, 1, str(tmp_path / "local.json"))
    np.testing.assert_allclose([r["fid"] for r in result["ranges"]], [r["fid"] for r in local["ranges"]], rtol=1e-6)
    assert result["fid"] == min(r["fid"] for r in result["ranges"]) > 0


def test_labels_are_balanced_by_seed_or_one_class():
    from raygen.config import ConfigError
    from raygen.recipes.generate import batches_to_do, labels_of, png_path

    seeds = np.array([7, 10, 23])
    np.testing.assert_array_equal(labels_of(seeds, 10, "balanced"), [7, 0, 3])
    np.testing.assert_array_equal(labels_of(seeds, 10, "4"), [4, 4, 4])
    with pytest.raises(ConfigError, match="classes 0..9"):
        labels_of(seeds, 10, "10")
    assert png_path(Path("o"), 123456) == Path("o/123000/123456.png")
    # the batch cut is fixed by the seed list: a resumed batch only loses its written seeds
    todo = batches_to_do([0, 1, 2, 3, 4], np.arange(5), {1, 2, 3}, 2)
    assert todo == [([0], [0]), ([4], [4])]
