"""The DiffiT recipe's model keys: each preset builds the network it says, overrides reach it, and a key
that does not apply, an unknown arch or a size that does not split into windows stops before Ray starts,
naming the key and the fix."""
import pytest
import torch

from raygen import recipes
from raygen.cli import load_resolved
from raygen.config import ConfigError
from raygen.nets.diffit import TMSA, DiffiTLatent, DiffiTUNet, param_count
from raygen.recipes.diffit import DiffiTTask


def resolved(*overrides, preset=None):
    cfg, _, _ = load_resolved(recipes.get("diffit"), preset=preset, overrides=list(overrides))
    return cfg


def build(cfg):
    with torch.device("meta"):
        return DiffiTTask(cfg).net_spec().build()


def test_default_builds_the_digits_unet_and_overrides_reach_it():
    net = build(resolved())
    assert isinstance(net, DiffiTUNet) and net.in_channels == 1 and net.num_classes == 10
    assert 0.7e6 < param_count(net) < 0.9e6
    assert {m.window_size for m in net.modules() if isinstance(m, TMSA)} == {4}
    wide = build(resolved("model.model_channels=48", "model.channel_mult=[1,2]", "model.window_size=2",
                          "model.tmsa=false", "method.learn_sigma=true"))
    assert wide.levels == 2 and wide.stem.out_channels == 48 and wide.out_channels == 2
    assert {m.window_size for m in wide.modules() if isinstance(m, TMSA)} == {2}
    assert all(m.qkv_temb is None for m in wide.modules() if isinstance(m, TMSA))


def test_latent_arch_builds_the_named_size():
    net = build(resolved("model.arch=DiffiT-S/2", "model.depth=3", "data.resolution=16"))
    assert isinstance(net, DiffiTLatent) and len(net.blocks) == 3 and net.x_embedder.proj.out_channels == 384
    assert net.grid == 8 and net.window_size == 8  # latent default: one window over the whole grid (global)


@pytest.mark.parametrize("overrides, names", [
    (["model.arch=DiT-B/2"], ["model.arch='DiT-B/2'", "DiffiT-{T,S,B,L,XL}"]),
    (["model.arch=cifar"], ["model.arch='cifar'", "cifar10, imagenet64, digits"]),
    (["model.hidden_size=256"], ["model.hidden_size", "model.arch=digits", "remove it"]),
    (["model.arch=DiffiT-S/2", "model.num_blocks=2"], ["model.num_blocks", "model.arch=DiffiT-S/2"]),
    (["model.window_size=3"], ["model.window_size", "data.resolution=16", "3x3 windows"]),
    (["data.resolution=20"], ["data.resolution=20", "10x10 token grid"]),
    (["model.arch=DiffiT-S/4", "data.resolution=30"], ["data.resolution=30", "patch size 4"]),
    (["model.time_init=normal"], ["model.time_init", "zero"]),
])
def test_model_keys_that_cannot_build_name_the_key(overrides, names):
    with pytest.raises(ConfigError) as e:
        resolved(*overrides)
    for name in names:
        assert name in str(e.value), (name, str(e.value))
