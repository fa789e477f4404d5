"""The U-Net diffusion jobs as a user runs them: `python jobs/edm.py --preset smoke` with a worker failure
(restart from the last checkpoint, every step logged once), evaluated with its Heun steps sweep; and
`python jobs/sdd.py --preset smoke` on raw .npy volumes (data.source=files): encoded once into a one-channel
pixel store with one intensity window, trained, sampled, and the store reused by a second run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from raygen.train.checkpoint import EXPORT_FILE, latest_checkpoint


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_edm_smoke_with_a_worker_failure_then_evaluated(run_job, tmp_path):
    run_dir, _ = run_job("edm", "--preset", "smoke", "debug.fail_at_step=20", "train.max_failures=1")
    assert (run_dir / ".debug_failed_at_20").exists()
    assert [r["step"] for r in records(run_dir)] == [10, 20, 30], "each step logged once across the restart"

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["recipe"] == "edm" and metrics["fid_features"] == "digits" and metrics["num_samples"] == 100
    assert metrics["steps"] == 5 and metrics["nfe"] == 9 and metrics["solver"] == "heun"  # Heun: 2N - 1
    for key in ("fid", "precision", "recall", "diversity_ratio", "class_accuracy", "fid_untrained"):
        assert np.isfinite(metrics[key]), key
    sweep = json.loads((run_dir / "eval" / "steps_sweep.json").read_text())
    assert [(r["steps"], r["nfe"]) for r in sweep] == [(3, 5), (5, 9)]
    for png in ("eval/samples.png", "eval/steps_sweep.png", "samples/step_0000030.png", "plots/training.png"):
        Image.open(run_dir / png).verify()

    # the export is the last checkpoint's EMA, and the config records EDM's loop policies as resolved
    export = torch.load(run_dir / EXPORT_FILE, map_location="cpu", weights_only=False)
    state = torch.load(latest_checkpoint(run_dir) / "state.pt", map_location="cpu", weights_only=False)
    for k, v in state["ema"].items():
        torch.testing.assert_close(export["ema"][k], v)
    cfg = (run_dir / "config.yaml").read_text()
    assert "loss_reduction: sum" in cfg and "kind: adam" in cfg and "warmup_steps: 157" in cfg  # 10 kimg at batch 64


def write_volumes(root):
    """Two CT-like volumes [D,H,W] in HU whose slices span different ranges."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i, (lo, hi) in enumerate([(-1000.0, -200.0), (200.0, 1000.0)]):
        vol = rng.uniform(lo, hi, size=(24, 24, 6)).astype(np.float32)
        np.save(root / f"vol{i}.npy", vol)
    return root


@pytest.mark.slow
def test_sdd_smoke_on_npy_volumes_through_one_pixel_store(run_job, tmp_path):
    vols = write_volumes(tmp_path / "volumes")
    args = ["--preset", "smoke", "data.source=files", f"data.path={vols}", "data.resolution=16", "source.npy_axis=2",
            "source.intensity=[-1000,1000]", "store.channels=gray", "eval.sweep={}", "eval.num_samples=20",
            "train.steps=10", "train.batch_size=4", "train.ckpt_every=10", "train.sample_every=10", "log.wandb=false"]
    run_dir, proc = run_job("sdd", *args)
    assert "stage 1:" in proc.stdout

    stores = [p for p in (tmp_path / "stores").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1
    meta = json.loads((stores[0] / "meta.json").read_text())
    assert meta["kind"] == "pixels" and meta["arrays"]["image"]["shape"] == [1, 16, 16]
    assert meta["counts"]["stored"] == 12  # 2 volumes x 6 slices along axis 2
    from raygen.data.store import Store

    store = Store(stores[0])
    images, keys = np.asarray(store.array("image")), list(store.keys())
    # one window [-1000, 1000] for every slice: volume 0 (HU <= -200) stays below 0.4 x 255, volume 1
    # (HU >= 200) above 0.6 x 255; a per-slice min-max would stretch both to 0..255
    dark = [im for im, k in zip(images, keys) if str(k).startswith("vol0")]
    bright = [im for im, k in zip(images, keys) if str(k).startswith("vol1")]
    assert len(dark) == len(bright) == 6
    assert max(im.max() for im in dark) <= 102 and min(im.min() for im in bright) >= 153

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["recipe"] == "sdd" and metrics["nfe"] == metrics["steps"] == 20
    assert "fid" not in metrics  # no feature space for CT slices offline: samples only
    Image.open(run_dir / "eval" / "samples.png").verify()
    assert [r["step"] for r in records(run_dir)] == [10]

    # the same config again finds the encoded store (by its fingerprint) instead of encoding again
    from raygen import recipes
    from raygen.cli import load_resolved
    from raygen.recipes.diffusion import prepare_pixel_store

    cfg, _, _ = load_resolved(recipes.get("sdd"), preset="smoke", overrides=args[2:])
    again = prepare_pixel_store(cfg, tmp_path)
    assert again.data.source == "store" and again.data.path == str(stores[0])
    assert json.loads((stores[0] / "meta.json").read_text()) == meta  # untouched
