"""Bad FSDiT configs stop before anything is written or Ray starts, with one line naming the key and the fix."""
import pytest

from raygen import recipes
from raygen.cli import load_resolved
from raygen.config import ConfigError


@pytest.mark.parametrize("overrides, says", [
    (["stage.space=latent"], "stage.latents=<SD-VAE latent store>"),
    (["train.use_tpu=true", "train.num_workers=2"], "train.topology"),
    (["model.use_support_tokens=false"], "model.cross_attn=none"),
    (["eval.settings.omega=1.5"], "eval.settings.omega"),
    (["eval.reference_per_class=1"], "eval.reference_per_class >= 2"),
    (["data.split=60/16"], "data.split='60/16' must be three class counts"),
    (["stage.latents=/x", "stage.pixels=/y"], "give one"),
])
def test_bad_config_names_the_key_and_the_fix(overrides, says):
    with pytest.raises(ConfigError) as e:
        load_resolved(recipes.get("fsdit"), overrides=overrides)
    assert says in str(e.value), str(e.value)


def test_the_big_preset_asks_for_its_stores_and_loads_with_them():
    with pytest.raises(ConfigError, match="stage.latents"):
        load_resolved(recipes.get("fsdit"), preset="miniimagenet_big")
    cfg, _, _ = load_resolved(recipes.get("fsdit"), preset="miniimagenet_big",
                              overrides=["stage.latents=/s/lat", "stage.supports=/s/sig"])
    assert cfg.model.size == "big" and cfg.train.batch_size == 128 and cfg.method.cfg_scale == 3.0
