"""The drifting job as users meet it: config errors before anything runs, the class-balanced batch
stream (deterministic, resumable, split over workers), and the whole chain end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raygen import recipes
from raygen.cli import load_resolved, run_job
from raygen.data.samplers import ClassIndexedData, MemoryBank
from raygen.recipes.drifting import DriftingTask
from raygen.train.state import DataPosition

ROOT = Path(__file__).resolve().parents[3]


def config(*overrides, preset="smoke"):
    cfg, _, _ = load_resolved(recipes.get("drifting"), preset=preset, overrides=list(overrides))
    return cfg


def job_error(capsys, tmp_path, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_job("drifting", ["--runs-root", str(tmp_path), *argv])
    assert e.value.code == 2
    assert not (tmp_path / "drifting").exists() or not any((tmp_path / "drifting").iterdir()), "nothing written"
    return capsys.readouterr().err


def test_config_errors_name_the_key_and_the_fix(capsys, tmp_path):
    err = job_error(capsys, tmp_path, "--preset", "smoke", "train.num_workers=3")
    assert "batch.nc=10" in err and "train.num_workers" in err and "multiple" in err
    err = job_error(capsys, tmp_path, "--preset", "smoke", "drift.coupling=sinkhorn", "drift.sinkhorn_marginal=none")
    assert "sinkhorn" in err.lower() and "omega" in err.lower()
    err = job_error(capsys, tmp_path, "--preset", "imagenet256_ablation")
    assert "stage.latents" in err
    err = job_error(capsys, tmp_path, "--preset", "smoke", "batch.nc=11")
    assert "batch.nc=11" in err  # more distinct classes than the digits have
    err = job_error(capsys, tmp_path, "--preset", "smoke", "model.arch=DriftDiT-T/3")
    assert "model.arch" in err


def test_sinkhorn_none_is_fine_when_every_class_has_cfg():
    cfg = config("drift.coupling=sinkhorn", "drift.sinkhorn_marginal=none", "batch.omega_min=1.5")
    assert cfg.drift.coupling == "sinkhorn"


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_batch_stream_is_class_balanced_deterministic_resumable_and_split_over_workers():
    cfg = config("batch.nc=10", "batch.pos=5", "batch.uncond=3")
    task = DriftingTask(cfg)
    data = ClassIndexedData(cfg.data)
    data_labels = data.labels
    one = take(task.batches(DataPosition(), 0, 1, "cpu"), 4)
    again = take(task.batches(DataPosition(), 0, 1, "cpu"), 4)
    for (p1, b1), (p2, b2) in zip(one, again):
        assert p1 == p2
        for k in b1:
            torch.testing.assert_close(b1[k], b2[k])
    assert [p.batch for p, _ in one] == [1, 2, 3, 4]
    # resuming at position 2 continues with the third batch exactly
    (p3, b3), = take(task.batches(DataPosition(0, 2), 0, 1, "cpu"), 1)
    assert p3.batch == 3
    for k in b3:
        torch.testing.assert_close(b3[k], one[2][1][k])
    _, b = one[0]
    assert sorted(b["label"].tolist()) == list(range(10))  # nc = all 10 digits, distinct
    assert b["pos"].shape == (10, 5, 1, 16, 16) and b["uncond"].shape == (10, 3, 1, 16, 16)
    # every positive is an image of its class: find each one in the data set
    flat = torch.from_numpy(data.images.reshape(len(data_labels), -1))
    for c, pos in zip(b["label"].tolist(), b["pos"]):
        for img in pos:
            match = (flat == img.reshape(1, -1)).all(1).nonzero().flatten().numpy()
            assert len(match) and all(data_labels[m] == c for m in match)
    assert not torch.equal(one[0][1]["pos"], one[1][1]["pos"])  # fresh draws every step
    # two workers: the same global classes, split in halves, different positives
    w0 = take(task.batches(DataPosition(), 0, 2, "cpu"), 1)[0][1]
    w1 = take(task.batches(DataPosition(), 1, 2, "cpu"), 1)[0][1]
    assert len(w0["label"]) == len(w1["label"]) == 5
    assert torch.equal(torch.cat([w0["label"], w1["label"]]), one[0][1]["label"])


def test_queue_sampler_is_the_release_memory_bank_and_resumes_exactly():
    """batch.sampler=queue: each step pushes random items; a class's queue is the last class_queue pushed
    items of that class, the global queue the last global_queue; the step's classes are the labels of its
    pushed batch, positives come from their queues, negatives from the global queue."""
    cfg = config("batch.sampler=queue", "batch.nc=6", "batch.push_per_step=8", "batch.class_queue=5",
                 "batch.global_queue=20", "batch.pos=4", "batch.uncond=3")
    data = ClassIndexedData(cfg.data)
    bank = MemoryBank(data.labels, 10, 8, 5, 20, cfg.train.seed).at(6)
    history = np.concatenate([bank.pushed(s) for s in range(-3, 7)])  # pre-fill ceil(20/8) = 3 pushes
    for c in range(10):
        assert list(bank.per_class[c]) == [i for i in history if data.labels[i] == c][-5:]
    assert list(bank.everything) == list(history[-20:])
    fresh = MemoryBank(data.labels, 10, 8, 5, 20, cfg.train.seed).at(3).at(6)
    assert [list(q) for q in fresh.per_class] == [list(q) for q in bank.per_class]

    task = DriftingTask(cfg)
    stream = task.batches(DataPosition(0, 6), 0, 1, "cpu")
    pos, batch = next(stream)
    assert pos.batch == 7
    np.testing.assert_array_equal(batch["label"].numpy(), data.labels[bank.at(6).last[:6]])
    flat = torch.from_numpy(data.images.reshape(len(data.labels), -1))

    def index_of(img):
        return set((flat == img.reshape(1, -1)).all(1).nonzero().flatten().tolist())

    for c, imgs in zip(batch["label"].tolist(), batch["pos"]):
        queue = set(bank.per_class[c])
        assert all(index_of(img) & queue for img in imgs)
    everything = set(bank.everything)
    assert all(index_of(img) & everything for img in batch["uncond"].flatten(0, 1))
    # resumed at step 6 or run from 0: the same batch
    run = task.batches(DataPosition(), 0, 1, "cpu")
    seventh = [next(run) for _ in range(7)][-1][1]
    for k in batch:
        torch.testing.assert_close(batch[k], seventh[k])


def tiny_mae_export(cfg):
    """What a latent_mae run exports (net_ema.pt): the NetSpec and the weights of a fresh MAE."""
    from raygen.recipes.latent_mae import LatentMAEConfig, MAETask

    task = MAETask(LatentMAEConfig(data=cfg.data, model=cfg.mae.model))
    torch.manual_seed(0)
    return {"net": task.net_spec().to_dict(), "ema": task.build_net().state_dict()}


def test_cached_real_features_give_the_same_loss_as_computing_them():
    """The default gathers the real samples' features from a per-worker cache: the loss and the
    generator's gradient must equal those with the features computed from the images each step."""
    cfg = config("batch.pos=4", "batch.uncond=3", "batch.gen=4")
    task = DriftingTask(cfg, tiny_mae_export(cfg))
    assert task.cache_real()
    net = task.build_net()
    for p in net.parameters():
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    _, by_index = next(task.batches(DataPosition(), 0, 1, "cpu"))
    assert set(by_index) == {"label", "pos_idx", "uncond_idx"}
    cfg.features.cache_real = False
    _, by_image = next(task.batches(DataPosition(), 0, 1, "cpu"))
    assert set(by_image) == {"label", "pos", "uncond"}
    assert torch.equal(by_index["label"], by_image["label"])
    losses, grads = [], []
    for batch, cached in ((by_index, True), (by_image, False)):
        cfg.features.cache_real = cached
        method = task.build_method()
        loss = method.loss(net, batch, torch.Generator().manual_seed(5))
        loss.backward()
        mae = method.mae("cpu")  # frozen: no gradient is computed for the feature network
        assert not mae.training and all(not p.requires_grad and p.grad is None for p in mae.parameters())
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        net.zero_grad()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)
    assert losses[0] > 0 and grads[0].abs().sum() > 0


def test_generation_uses_only_the_callers_generator():
    cfg = config()
    task = DriftingTask(cfg)
    net = task.build_net()
    for p in net.parameters():  # make the output depend on the inputs (the output layer starts at zero)
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    cond, method = {"label": torch.arange(10)}, task.build_method()
    state = torch.get_rng_state()
    a = task.generate(method, net, cond, torch.Generator().manual_seed(3), omega=2.0)
    b = task.generate(method, net, cond, torch.Generator().manual_seed(3), omega=2.0)
    c = task.generate(method, net, cond, torch.Generator().manual_seed(4), omega=2.0)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (10, 1, 16, 16)


def test_a_missing_or_mismatched_mae_checkpoint_names_the_key_and_the_fix(tmp_path):
    from raygen.config import ConfigError
    from raygen.recipes.drifting import check_mae
    from raygen.recipes.latent_mae import load_mae

    with pytest.raises(ConfigError, match=r"stage.mae_ckpt=.*no net_ema.pt there.*jobs/latent_mae.py"):
        load_mae(tmp_path)
    cfg = config()
    state = tiny_mae_export(cfg)
    check_mae(state, cfg)  # digits MAE for a digits generator: fine
    state["net"]["kwargs"] = {**state["net"]["kwargs"], "in_channels": 4}
    with pytest.raises(ConfigError, match=r"stage.mae_ckpt: the MAE takes 4x16.*train the MAE on the same data"):
        check_mae(state, cfg)
