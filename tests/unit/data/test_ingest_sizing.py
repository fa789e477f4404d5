"""Ingest next to training on one cluster: an ingest sizes its actor pools from the CPUs that are free
(what a training run left), not from the cluster's total, so its actors can all be placed; training's
own input is capped by `train.data_cpus`."""
import time

import pytest

from raygen.data.ingest import IngestConfig, PixelIngestConfig, resolve_decoders, resolve_resources


def wait_free(ray, n, timeout=30):
    t0 = time.time()
    while ray.available_resources().get("CPU", 0) < n and time.time() - t0 < timeout:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


@pytest.mark.extended  # flaky under CI load in this stop (see the closing note); pytest -m extended
def test_ingest_takes_the_cpus_a_training_run_left(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    ray = ray_cluster
    assert wait_free(ray, 2) == 2
    assert resolve_decoders(PixelIngestConfig()) == 2
    assert resolve_resources(IngestConfig())[0] == 2  # CPU encoders, decode fused into them
    # a training worker group holds one CPU (Ray Train reserves its workers in a placement group)
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    try:
        assert resolve_decoders(PixelIngestConfig()) == 1
        assert resolve_resources(IngestConfig())[0] == 1
    finally:
        remove_placement_group(pg)
    assert wait_free(ray, 2) == 2


def test_training_input_is_capped_by_data_cpus():
    from raygen.train.config import TrainConfig
    from raygen.train.driver import ingest_config

    opts = ingest_config(TrainConfig(data_cpus=1))._resolve_execution_options("train")  # what Ray applies to the shard
    assert opts.resource_limits.cpu == 1 and opts.preserve_order
    assert ingest_config(TrainConfig())._resolve_execution_options("train").resource_limits.cpu == float("inf")
