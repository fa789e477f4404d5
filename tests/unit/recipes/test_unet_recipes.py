"""The U-Net recipes' configs (edm, sdd): EDM's durations in images become step counts, the published
presets carry the paper's numbers, and every inconsistent config stops naming the key and the fix."""
import math

import numpy as np
import pytest

from raygen import recipes
from raygen.cli import load_resolved
from raygen.config import ConfigError


def resolved(name, *overrides, preset=None):
    cfg, _, _ = load_resolved(recipes.get(name), preset=preset, overrides=list(overrides))
    return cfg


@pytest.fixture
def cifar_folder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "cifar" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "cifar" / c / "0.png")
    return tmp_path / "cifar"


def test_edm_cifar10_preset_is_the_papers_configuration(cifar_folder):
    cfg = resolved("edm", f"data.path={cifar_folder}", preset="cifar10_ddpmpp")
    # 200 Mimg at batch 512, the LR ramp over 10 Mimg (EDM, arXiv 2206.00364, App. F.1)
    assert cfg.train.steps == math.ceil(200e6 / 512) and cfg.optim.warmup_steps == math.ceil(10e6 / 512)
    assert (cfg.optim.kind, cfg.optim.lr, cfg.optim.grad_clip) == ("adam", 1e-3, 0.0)
    assert (cfg.train.ema_halflife_kimg, cfg.train.ema_rampup_ratio) == (500, 0.05)
    assert (cfg.train.loss_reduction, cfg.train.nonfinite_grads, cfg.train.amp) == ("sum", "nan_to_num", "off")
    assert (cfg.method.augment_p, cfg.model.augment_dim, cfg.method.steps) == (0.12, 9, 18)
    assert cfg.source.path == str(cifar_folder) and cfg.data.source == "files"

    from raygen.nets.unet import param_count, unet

    import torch

    with torch.device("meta"):
        net = unet(cfg.model.arch, img_resolution=32, in_channels=3, out_channels=3, num_classes=10, augment_dim=9,
                   **cfg.model.overrides())
    assert abs(param_count(net) - 55.7e6) < 0.1e6  # EDM's DDPM++ for conditional CIFAR-10


def test_sdd_presets_state_the_official_options(cifar_folder):
    klub = resolved("sdd", f"data.path={cifar_folder}", preset="cifar10_klub")
    hkd = resolved("sdd", f"data.path={cifar_folder}", preset="cifar10_hkd")
    for cfg in (klub, hkd):
        m = cfg.method
        assert (m.eta, m.shift, m.scale, m.sigmoid_start, m.sigmoid_end, m.sigmoid_power) == (1e4, 0.6, 0.39, 10, -13, 1)
        assert cfg.optim.lr == 2e-4 and m.steps == 200
    assert (klub.method.loss, klub.train.batch_size) == ("klub", 288)
    assert (hkd.method.loss, hkd.method.weights, hkd.train.batch_size) == ("hkd", "sdd", 512)
    assert hkd.train.steps == math.ceil(200e6 / 512)


def test_volumes_preset_reads_npy_with_one_window(tmp_path):
    np.save(tmp_path / "ct.npy", np.zeros((4, 8, 8), np.int16))
    cfg = resolved("sdd", f"source.path={tmp_path}", "source.intensity=[-1000,1000]", preset="volumes")
    assert cfg.data.path == str(tmp_path) and cfg.source.kind == "npy" and cfg.source.npy_axis == 2
    assert cfg.store.channels == "gray" and cfg.source.intensity == [-1000, 1000]


@pytest.mark.parametrize("recipe", ["edm", "sdd"])
@pytest.mark.parametrize("overrides, key", [
    (["data.source=files"], "data.path"),
    (["source.path=/tmp"], "source.path"),
    (["method.augment_p=0.12"], "model.augment_dim"),
    (["model.channel_mult=[1,2,2,2,2,2]"], "model.channel_mult"),
    (["model.augment_dim=4"], "model.augment_dim"),
    (["train.duration_kimg=-1"], "train.duration_kimg"),
])
def test_inconsistent_configs_name_the_key(recipe, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolved(recipe, *overrides)


def test_durations_in_images_resolve_for_any_recipe():
    cfg = resolved("dit", "train.duration_kimg=12.8", "optim.warmup_kimg=1.28", "train.batch_size=128")
    assert (cfg.train.steps, cfg.optim.warmup_steps) == (100, 10)
