"""One real Ray cluster per test session (ray.init costs ~8 s here: platform-notes.md), a shared
cache for the digits classifier, and W&B kept offline."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory):
    os.environ.setdefault("RAYGEN_CACHE", str(tmp_path_factory.mktemp("raygen_cache")))
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raygen.cli import init_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    init_ray()  # the job's own data-context settings
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def job_env(ray_cluster):
    """The environment for job subprocesses that need not start their own cluster: they connect to the
    session's (0.05 s) instead of starting one (~8 s), as a job does under `ray job submit`."""
    return {**os.environ, "WANDB_MODE": "offline", "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
