"""How a run is spread over workers, checked before Ray starts: elastic [min, max] counts, TPU slices
(Ray's own TPU helpers), and the data position carried over a resize."""
import pytest

from raygen.config import ConfigError
from raygen.train.config import TrainConfig
from raygen.train.state import Counters, DataPosition


def test_elastic_worker_counts_are_checked_for_every_size():
    tc = TrainConfig(num_workers=[1, 2], batch_size=64)
    tc.validate()
    assert (tc.min_workers, tc.max_workers, tc.elastic, list(tc.world_sizes())) == (1, 2, True, [1, 2])
    assert not TrainConfig(num_workers=2, batch_size=64).elastic
    with pytest.raises(ConfigError, match="not divisible by 3 workers"):
        TrainConfig(num_workers=[2, 4], batch_size=64).validate()
    with pytest.raises(ConfigError, match=r"\[min, max\]"):
        TrainConfig(num_workers=[3, 1], batch_size=6).validate()
    with pytest.raises(ConfigError, match="max_failures"):
        TrainConfig(num_workers=[1, 2], batch_size=64, max_failures=0).validate()


def test_config_loads_num_workers_as_a_count_or_a_range(tmp_path):
    from raygen.config import load_config
    from raygen.recipes import dit

    cfg, _ = load_config(dit.DiTConfig, preset=None, preset_dir=tmp_path, overrides=["train.num_workers=[1,2]"])
    assert cfg.train.num_workers == [1, 2]
    cfg, _ = load_config(dit.DiTConfig, preset=None, preset_dir=tmp_path, overrides=["train.num_workers=2"])
    assert cfg.train.num_workers == 2


def test_data_position_after_a_resize_keeps_the_fraction_of_the_epoch():
    c = Counters(step=40, data=DataPosition(epoch=3, batch=10), world=2)
    assert c.position_for(2) == DataPosition(3, 10)
    assert c.position_for(1) == DataPosition(3, 20)  # half the shards' batches per worker -> twice as many alone
    assert c.position_for(4) == DataPosition(3, 5)
    assert Counters(data=DataPosition(1, 7)).position_for(3) == DataPosition(1, 7)  # world not recorded
    assert Counters.from_dict({"step": 1, "data": {"epoch": 0, "batch": 2}, "world": 2}).world == 2


def test_tpu_slices_are_checked_with_rays_names_and_hosts():
    TrainConfig(use_tpu=True, accelerator_type="TPU-V6E", topology="4x4", num_workers=4, batch_size=64).validate()
    TrainConfig(use_tpu=True, accelerator_type="TPU-V5LITEPOD", topology="2x4", num_workers=1).validate()
    with pytest.raises(ConfigError, match="TPU-V5LITEPOD"):  # v5e's name in Ray
        TrainConfig(use_tpu=True, accelerator_type="TPU-V5E", topology="2x4", num_workers=1).validate()
    with pytest.raises(ConfigError, match="4 hosts"):  # a v6e 4x4 has 4 hosts, one worker each
        TrainConfig(use_tpu=True, accelerator_type="TPU-V6E", topology="4x4", num_workers=2, batch_size=64).validate()
    with pytest.raises(ConfigError, match="whole slices"):
        TrainConfig(use_tpu=True, accelerator_type="TPU-V6E", topology="4x4", num_workers=[4, 8]).validate()
