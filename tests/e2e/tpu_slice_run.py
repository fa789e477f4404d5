"""Run by test_fsdit_tpu.py in its own process (it needs its own Ray cluster): a local cluster with a
simulated 2-host TPU v4 slice (the resources and labels Ray's TPU nodes carry; JAX on CPU), and the JAX
backend's TPU path (`train.use_tpu=true`) training a tiny FSDiT-shaped task on it. Each worker writes
what JAX saw to <out>/rank<r>.json, the driver the run's outcome to <out>/result.json."""
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from raygen.core.contracts import Method, NetSpec, Task  # noqa: E402
from raygen.train.config import DebugConfig, LogConfig, OptimConfig, TrainConfig  # noqa: E402
from raygen.train.state import DataPosition  # noqa: E402

SHOTS, DIM = 2, 8


class Flow(Method):
    def loss(self, net, batch, key):
        from raygen.jaxgen.flow import FlowConfig, flow_loss

        module, variables = net.unbind()
        return flow_loss(module, variables["params"], batch, key, FlowConfig())[1]["loss"]


@dataclass
class Cfg:
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(tensorboard=False, wandb=False, progress=False))
    debug: DebugConfig = field(default_factory=DebugConfig)


class SliceTask(Task):
    recipe, backend, num_classes, sample_shape, preview_upscale = "tpu_check", "jax", 0, (8, 8, 3), 1

    def __init__(self, cfg, out):
        self.cfg, self.out = cfg, out

    def net_spec(self):
        return NetSpec("raygen.jaxgen.fsdit:fsdit", {"name": "debug", "input_size": 8, "in_channels": 3,
                                                     "support_dim": DIM, "patch_size": 4, "cross_attn": "none",
                                                     "use_support_tokens": False})

    def build_method(self):
        return Flow()

    def init_params(self, net, key):
        from raygen.jaxgen.fsdit import init_params

        return init_params(net, key, {"x": (1, 8, 8, 3), "pooled": (1, SHOTS, DIM)})

    def preview(self, net, key):
        return np.zeros((1, 3, 8, 8), np.float32)

    def batches(self, position, rank, world, device):
        import jax

        Path(self.out, f"rank{rank}.json").write_text(json.dumps({
            "process_count": jax.process_count(), "process_index": jax.process_index(),
            "device_count": jax.device_count(), "platform": jax.devices()[0].platform,
            "jax_platforms": os.environ.get("JAX_PLATFORMS")}))
        bs, step = self.cfg.train.batch_size, position.batch
        while True:
            rng = np.random.default_rng(step)
            x = rng.uniform(-1, 1, (bs, 8, 8, 3)).astype(np.float32)
            pooled = rng.normal(size=(bs, SHOTS, DIM)).astype(np.float32)
            step += 1
            sl = slice(rank * bs // world, (rank + 1) * bs // world)
            yield DataPosition(0, step), {"x": x[sl], "pooled": pooled[sl]}


def main(out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from raygen.train.driver import fit

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    env = {"TPU_NAME": "slice-A", "TPU_ACCELERATOR_TYPE": "v4-16", "TPU_TOPOLOGY": "2x2x2", "JAX_PLATFORMS": "cpu"}
    for worker_id in (0, 1):
        labels = {"ray.io/tpu-slice-name": "slice-A", "ray.io/tpu-worker-id": str(worker_id),
                  "ray.io/tpu-pod-type": "v4-16"}
        resources = {"TPU": 4, "accelerator_type:TPU-V4": 1, **({"TPU-v4-16-head": 1} if worker_id == 0 else {})}
        cluster.add_node(num_cpus=1, resources=resources, env_vars={**env, "TPU_WORKER_ID": str(worker_id)},
                         labels=labels)
    ray.init(address=cluster.address)
    tc = TrainConfig(steps=4, batch_size=4, num_workers=2, use_tpu=True, topology="2x2x2",
                     accelerator_type="TPU-V4", log_every=2, ckpt_every=4, sample_every=100)
    result = fit(SliceTask(Cfg(train=tc), out), Path(out) / "run")
    Path(out, "result.json").write_text(json.dumps({
        "error": None if result.error is None else repr(result.error),
        "checkpoint": None if result.checkpoint is None else result.checkpoint.path}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
