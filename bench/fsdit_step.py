"""FSDiT training step, two comparisons in one run, with the FSDiT default preset's model, batch and
optimizer and the JAX backend's own jitted step (`make_train_step`):

1. supports: the step fed by gathering the supports' cached SigLIP embeddings (pooled, tokens) from the
   SigLIP store by index (what raygen does), against the original FSDiT design: the B x K support
   images of every batch read from the pixel store and encoded by the same SigLIP (its image
   processor, then the vision tower in torch on CPU, inference mode; pooled = the L2-normalised
   pooler_output, tokens = last_hidden_state) before the same step. Every step ends with
   `block_until_ready`, so the encoder never overlaps a running step; windows of the two sides alternate, so a drift of the
   machine hits both.
2. loop: raygen's loop (`driver.fit`: JaxTrainer, 1 worker, metrics.jsonl, TensorBoard and W&B as
   the preset says, a checkpoint at the last step only, no preview grid but the one the loop always
   draws at the last step) against a plain JAX loop over the same jitted step and the same data stream
   (`task.batches`), run before and after the raygen run. The plain loop waits for the device only at
   the end of each timing window; raygen's steps/s come from its metrics.jsonl windows.

Every JAX measurement outside Ray runs in a child process set up as the JAX worker sets itself up:
JAX_PLATFORMS=cpu, the CPU affinity of `pin_cpus` applied before JAX is imported (JAX sizes its thread
pools from it) and OMP_NUM_THREADS as Ray sets it in a worker of train.cpus_per_worker CPUs; so the
plain loop and raygen's worker run on the same cores. Steady-state steps/s are medians of windows
after the warm-up (which holds the compile).

Also printed, labelled as an estimate: FLOP counts (never timings) of the supports' encoding against
the train step, here and at the original scale (SigLIP B/16 at 224, 128 x K images per step; an
FSDiT-big step on 28x28x4 latents, lowered by XLA from shapes alone). --diagnose adds plain-loop windows
that read each step's `finite` flag on the host right after the step (raygen's loop reads it one step
later, while the next step runs), to tell the cost of a per-step host sync apart.

The stages (episodes, SigLIP store, pixel store) are found or made under --runs-root, as the fsdit job
makes them, and reused by later runs; making them is not part of any timing. The default flags take
about 6 minutes on 2 quiet cores once the stages exist.

    python bench/fsdit_step.py [--steps 200] [--warmup 25] [--window 25] [--diagnose] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the real-scale estimate: FLOP counts of models built from their configs, never timed here
REAL_BATCH = 128
REAL_LATENT = (28, 28, 4)  # SD-VAE latents of 224x224 images
REAL_SIZE = "big"  # DiT-B/2


# ---- helpers of the parent and the children (no JAX imported at module level) --------------------------

def load(overrides: list[str]):
    from raygen.config import load_config
    from raygen.core.job import preset_dir
    from raygen.recipes.fsdit import FSDiTConfig

    cfg, _ = load_config(FSDiTConfig, preset="default", preset_dir=preset_dir("fsdit"), overrides=overrides)
    return cfg


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_rates(rates):
    return f"{median(rates):.3f} steps/s (windows {', '.join(f'{r:.2f}' for r in rates)})"


# ---- the children ---------------------------------------------------------------------------------------

def worker_like_setup(cpus_per_worker: int) -> list[int]:
    """What `train_loop_per_worker` does before JAX starts on a CPU worker (the only worker on this node),
    plus the OMP_NUM_THREADS Ray sets in a worker process of `cpus_per_worker` CPUs."""
    if "jax" in sys.modules:
        raise RuntimeError("JAX was imported before the affinity was set; it would size its threads wrongly")
    from raygen.train.jax_backend import pin_cpus

    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus_per_worker)))
    return pin_cpus(0, 1)


class Stepper:
    """The backend's jitted step on a one-process mesh, fed as `train_loop_per_worker` feeds it."""

    def __init__(self, task):
        import jax
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        from raygen.train.jax_backend import build_optimizer, initial_state, make_train_step, replicate

        self.jax, self.np = jax, np
        self.tc = tc = task.cfg.train
        mesh = Mesh(np.array(jax.devices()), ("data",))
        self.batch_sharding = NamedSharding(mesh, P("data"))
        net, method = task.build_net(), task.build_method()
        opt = build_optimizer(task.cfg.optim, tc.steps)
        state_host = initial_state(task, net, opt, tc.seed)
        self.num_params = int(sum(np.size(p) for p in jax.tree.leaves(state_host["params"])))
        self.state = replicate(state_host, NamedSharding(mesh, P()))
        self.train_step = make_train_step(net, method, opt, tc)
        self.n, self.one = 0, np.float32(1.0)

    def device_batch(self, local: dict) -> dict:
        return {k: self.jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def __call__(self, local: dict, wait: bool = False):
        from raygen.train.state import ema_decay

        decay = self.np.float32(ema_decay(self.tc, self.n))
        self.state, out = self.train_step(self.state, self.device_batch(local), decay, self.one)
        self.n += 1
        if wait:
            self.sync()
        return out

    def sync(self):
        self.jax.block_until_ready(self.state)

    def flops(self, local: dict) -> float | None:
        """XLA's FLOP count of one step (from the lowered program; nothing runs)."""
        lowered = self.train_step.lower(self.state, self.device_batch(local), self.np.float32(0.5), self.one)
        return xla_flops(lowered)


def xla_flops(lowered) -> float | None:
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # an accounting aid, never worth failing the benchmark for
        return None


def timed_windows(step_fn, sync, steps: int, window: int) -> list[float]:
    """Steps/s of each `window` steps (the device waited for at the end of each)."""
    rates = []
    for start in range(0, steps, window):
        n = min(window, steps - start)
        t0 = time.perf_counter()
        for _ in range(n):
            step_fn()
        sync()
        rates.append(n / (time.perf_counter() - t0))
    return rates


def warm(step_fn, sync, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    return time.perf_counter() - t0


def child_plain(cfg, a) -> dict:
    """The plain JAX loop: the data stream and the jitted step, nothing else. With --diagnose, windows
    that also read each step's `finite` flag on the host right after it (a per-step sync raygen's loop
    avoids by reading it one step late) alternate with the plain ones."""
    from raygen.recipes.fsdit import FSDiTTask
    from raygen.train.state import DataPosition

    t0 = time.perf_counter()
    task = FSDiTTask(cfg)
    stepper = Stepper(task)
    stream = task.batches(DataPosition(), 0, 1, None)
    startup = time.perf_counter() - t0
    plain = lambda: stepper(next(stream)[1])  # noqa: E731
    warm_s = warm(plain, stepper.sync, a.warmup)
    if not a.diagnose:
        return {"rates": timed_windows(plain, stepper.sync, a.steps, a.window), "startup_s": startup,
                "warmup_s": warm_s}
    synced = lambda: bool(stepper(next(stream)[1])["finite"])  # noqa: E731
    rates, rates_synced = [], []
    for _ in range(0, a.steps, a.window):
        rates += timed_windows(plain, stepper.sync, a.window, a.window)
        rates_synced += timed_windows(synced, stepper.sync, a.window, a.window)
    return {"rates": rates, "rates_finite_read": rates_synced, "startup_s": startup, "warmup_s": warm_s}


class SupportEncoder:
    """The original design: the supports' pixels (uint8, from the pixel store) -> the checkpoint's image
    processor -> SigLIP's vision tower (torch, CPU, inference mode) -> pooled (the L2-normalised
    pooler_output) [B, K, D] and tokens (last_hidden_state) [B, K, T, D]. Times each part."""

    def __init__(self, model: str, data):
        import torch

        from raygen.data.encoders import load_processor, load_siglip

        self.torch, self.data = torch, data
        self.processor = load_processor(model)
        self.model = load_siglip(model).float().eval().requires_grad_(False)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.times = {"read": [], "processor": [], "model": []}

    def reset(self):
        for v in self.times.values():
            v.clear()

    def inputs(self, supports):
        import numpy as np

        s = np.asarray(supports)
        u8 = np.asarray(self.data.images[self.data.target_positions(s.reshape(-1))])  # [N, C, H, W]
        return s.shape, list(u8.transpose(0, 2, 3, 1))  # HWC uint8 images, as the SigLIP ingest gives them

    def __call__(self, supports) -> dict:
        torch = self.torch
        t0 = time.perf_counter()
        shape, images = self.inputs(supports)
        t1 = time.perf_counter()
        inputs = self.processor(images=images, return_tensors="pt")
        t2 = time.perf_counter()
        with torch.inference_mode():
            o = self.model(**inputs)
            pooled = torch.nn.functional.normalize(o.pooler_output.float(), dim=-1).numpy()
            tokens = o.last_hidden_state.float().numpy()
        t3 = time.perf_counter()
        for k, dt in zip(self.times, (t1 - t0, t2 - t1, t3 - t2)):
            self.times[k].append(dt)
        out = {"pooled": pooled.reshape(*shape, -1)}
        if self.data.tokens is not None:  # as `EpisodeData.cond`: tokens only when the model reads them
            out["tokens"] = tokens.reshape(*shape, *tokens.shape[1:])
        return out

    def flops_per_image(self, supports) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        _, images = self.inputs(supports[:1, :1])
        with FlopCounterMode(display=False) as fc, self.torch.inference_mode():
            self.model(**self.processor(images=images, return_tensors="pt"))
        return float(fc.get_total_flops())


def episode_stream(task, encode):
    """The episodes of `task.batches` (one worker: the same order and flips), the supports' embeddings
    computed by `encode` instead of gathered from the store."""
    import numpy as np

    from raygen.data.fewshot_prep import load_episodes

    tc, data = task.cfg.train, task.data
    table = load_episodes(task.cfg.stage.episodes, "train")
    n = len(table["target"])
    per_epoch, epoch = n // tc.batch_size, 0
    while True:
        rng = np.random.default_rng([tc.seed, epoch])
        order, flips = rng.permutation(n), rng.random(n) < 0.5
        for b in range(per_epoch):
            sel = order[b * tc.batch_size:(b + 1) * tc.batch_size]
            x = data.x(table["target"][sel])
            if task.cfg.data.hflip and not data.latent:
                x[flips[sel]] = x[flips[sel], :, ::-1]
            yield {"x": x, **encode(table["supports"][sel])}
        epoch += 1


def child_supports(cfg, a) -> dict:
    import numpy as np
    import torch

    from raygen.data.fewshot_prep import load_episodes
    from raygen.data.tiny_models import resolve_model
    from raygen.recipes.fsdit import FSDiTTask
    from raygen.train.state import DataPosition

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    torch.set_num_threads(len(cores))  # the encoder gets every core of the worker, not Ray's OMP_NUM_THREADS
    task = FSDiTTask(cfg)
    # the very model the store was encoded with (its meta records the resolved path or hub id)
    encoder = SupportEncoder(task.data.supports.meta["encoder"].get("model") or resolve_model(cfg.stage.siglip),
                             task.data)
    stepper = Stepper(task)
    cached = task.batches(DataPosition(), 0, 1, None)  # raygen's own stream
    encoded = episode_stream(task, encoder)

    # both sides must feed the step the same thing: the first batch of each, against each other
    ref, enc = next(task.batches(DataPosition(), 0, 1, None))[1], next(episode_stream(task, encoder))
    agree = {k: float(np.abs(ref[k] - enc[k]).max()) for k in ref}
    first = load_episodes(cfg.stage.episodes, "train")["supports"][: cfg.train.batch_size]
    shots = int(first.shape[1])

    # the encoder alone (no step running), then the step fed by each side, alternating windows
    encoder.reset()
    for _ in range(a.encode_repeats):
        encoder(first)
    alone = {k: median(v) for k, v in encoder.times.items()}
    step_cached = lambda: stepper(next(cached)[1], wait=True)  # noqa: E731
    step_encoded = lambda: stepper(next(encoded), wait=True)  # noqa: E731
    warm_c = warm(step_cached, stepper.sync, a.warmup)  # holds the compile
    warm_e = warm(step_encoded, stepper.sync, max(2, a.warmup // 5))
    encoder.reset()
    rc, re_ = [], []
    for _ in range(0, a.steps, a.window):
        rc += timed_windows(step_cached, stepper.sync, a.window, a.window)
        re_ += timed_windows(step_encoded, stepper.sync, a.window, a.window)
    in_loop = {k: median(v) for k, v in encoder.times.items()}

    t0 = time.perf_counter()
    counts = {"tiny_train_step_flops": stepper.flops(ref),
              "tiny_siglip_flops_per_image": encoder.flops_per_image(first)}
    counts.update(real_scale_counts(task, shots))
    counts["seconds"] = time.perf_counter() - t0
    sig = encoder.model.config
    return {
        "cached_rates": rc, "encoded_rates": re_, "warmup_cached_s": warm_c, "warmup_encoded_s": warm_e,
        "encode_s_in_loop": in_loop, "encode_s_alone": alone, "agreement_max_abs": agree, "counts": counts,
        "fsdit_params": stepper.num_params, "fsdit_net": task.net_spec().kwargs, "shots": shots,
        "images_per_step": int(cfg.train.batch_size * shots),
        "siglip": {"model": cfg.stage.siglip, "params": int(encoder.num_params),
                   "processor": type(encoder.processor).__name__, "image_size": int(sig.image_size),
                   "patch_size": int(sig.patch_size), "hidden_size": int(sig.hidden_size),
                   "layers": int(sig.num_hidden_layers),
                   "tokens": int(ref["tokens"].shape[2]) if "tokens" in ref else 0,
                   "torch_threads": torch.get_num_threads()},
    }


def real_scale_counts(task, shots: int) -> dict:
    """FLOP counts (no timing) at the original scale: SigLIP B/16 at 224 (the vision tower SigLIP2
    B/16 at 224 shares) per image, and the FSDiT train step at batch 128 on 28x28x4 latents with 768-d
    supports of 196 tokens, lowered by XLA from shapes alone (nothing is allocated)."""
    out = {}
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        from transformers import SiglipVisionConfig, SiglipVisionModel

        vcfg = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16)
        with torch.device("meta"):
            model = SiglipVisionModel(vcfg).eval()
            x = torch.zeros(1, 3, 224, 224)
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            model(pixel_values=x)
        out["real_siglip_flops_per_image"] = float(fc.get_total_flops())
        out["real_siglip_params"] = int(sum(p.numel() for p in model.parameters()))
        tokens, dim = (224 // 16) ** 2, 768
    except Exception as e:  # noqa: BLE001
        out["real_siglip_error"] = repr(e)
        tokens, dim = 196, 768
    try:
        import jax
        import jax.numpy as jnp

        from raygen.jaxgen.fsdit import fsdit, init_params
        from raygen.train.jax_backend import build_optimizer, make_train_step

        kw = {k: v for k, v in task.net_spec().kwargs.items()
              if k not in ("name", "input_size", "in_channels", "support_dim", "hidden_size", "depth", "num_heads",
                           "patch_size")}
        h, w, c = REAL_LATENT
        net = fsdit(REAL_SIZE, input_size=h, in_channels=c, support_dim=dim, **kw)
        shapes = {"x": (1, h, w, c), "pooled": (1, shots, dim),
                  "tokens": (1, shots, tokens, dim) if net.has_context else None}
        params = jax.eval_shape(lambda k: init_params(net, k, shapes), jax.random.key(0))
        opt = build_optimizer(task.cfg.optim, task.cfg.train.steps)
        sds = jax.ShapeDtypeStruct
        state = {"params": params, "ema": params, "opt_state": jax.eval_shape(opt.init, params),
                 "step": sds((), jnp.int32), "key": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
        batch = {"x": sds((REAL_BATCH, h, w, c), jnp.float32), "pooled": sds((REAL_BATCH, shots, dim), jnp.float32)}
        if net.has_context:
            batch["tokens"] = sds((REAL_BATCH, shots, tokens, dim), jnp.float32)
        step = make_train_step(net, task.build_method(), opt, task.cfg.train)
        out["real_train_step_flops"] = xla_flops(step.lower(state, batch, jnp.float32(0.5), jnp.float32(1.0)))
        out["real_fsdit_params"] = int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))
        out["real_fsdit"] = {"size": REAL_SIZE, "latent": list(REAL_LATENT), "support_dim": dim,
                             "support_tokens": tokens, **kw}
    except Exception as e:  # noqa: BLE001
        out["real_fsdit_error"] = repr(e)
    return out


def child_main(role: str, out: str, a):
    cfg = load(a.overrides)
    cores = worker_like_setup(cfg.train.cpus_per_worker)
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)
    result = child_plain(cfg, a) if role == "plain" else child_supports(cfg, a)
    import jax

    result.update(cores=cores, jax=jax.__version__, omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    Path(out).write_text(json.dumps(result))


def run_child(role: str, a, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fsdit_step-") as d:
        out = Path(d) / "result.json"
        env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--window", str(a.window), "--encode-repeats", str(a.encode_repeats), "--_child", role,
               "--_out", str(out), *(["--diagnose"] if a.diagnose else []), "--", *overrides]
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


# ---- raygen's loop (in the Ray worker) -----------------------------------------------------------------

def raygen_loop(cfg, a) -> dict:
    """`fit` for warmup + steps + one more window, which is left out: the loop draws a preview grid at
    its last step before it closes that window's timing."""
    from raygen.recipes.fsdit import FSDiTTask
    from raygen.train.driver import fit
    from raygen.train.logging import read_metrics

    task = FSDiTTask(cfg)
    with tempfile.TemporaryDirectory(prefix="fsdit_step-run-") as d:
        run_dir = Path(d) / "fsdit" / "bench"
        run_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        result = fit(task, run_dir)
        total = time.perf_counter() - t0
        if result.error is not None:
            raise result.error
        records = read_metrics(run_dir)
        checkpoints = sum(p.is_dir() for p in (run_dir / "checkpoints").glob("checkpoint_*"))
        previews = len(list((run_dir / "samples").glob("*.png")))
    timed = [r for r in records if a.warmup < r["step"] <= a.warmup + a.steps]
    rates = [r["steps_per_s"] for r in timed]
    return {"rates": rates, "total_s": total, "other_s": total - a.steps / median(rates),
            "windows_end": [r["step"] for r in timed], "checkpoints": checkpoints, "previews": previews}


# ---- the driver -----------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="timed steps of each side (rounded up to whole windows)")
    p.add_argument("--warmup", type=int, default=25, help="untimed steps first, the compile among them "
                                                          "(rounded up to whole windows)")
    p.add_argument("--window", type=int, default=25, help="steps per timing window (raygen's train.log_every)")
    p.add_argument("--encode-repeats", type=int, default=10, help="batches of supports encoded alone, timed")
    p.add_argument("--diagnose", action="store_true",
                   help="the plain loop also runs windows that read each step's `finite` flag right after the step")
    p.add_argument("--runs-root", default=os.environ.get("RAYGEN_RUNS", str(ROOT / "runs")),
                   help="where the stages are found or made (default: ./runs or $RAYGEN_RUNS, as the jobs)")
    p.add_argument("--_child", choices=("plain", "supports"), help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the FSDiT default preset")
    a = p.parse_args()
    a.window = max(1, a.window)
    a.steps = max(a.window, -(-a.steps // a.window) * a.window)
    a.warmup = max(a.window, -(-a.warmup // a.window) * a.window)  # raygen's windows start on a multiple
    a.encode_repeats = max(1, a.encode_repeats)
    if a._child:
        return child_main(a._child, a._out, a)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    total_steps = a.warmup + a.steps + a.window
    bench = [f"train.steps={total_steps}", f"train.log_every={a.window}", f"train.ckpt_every={total_steps}",
             f"train.sample_every={10 * total_steps}", "train.num_workers=1", "eval.enabled=false"]
    cfg = load([*bench, *a.overrides])
    if cfg.stage.latents:
        raise SystemExit("stage.latents is set: this benchmark encodes the supports from a pixel store; unset it")
    from raygen.core.job import init_ray
    from raygen.recipes.fsdit import prepare_stages

    init_ray()
    cfg = prepare_stages(cfg, Path(a.runs_root).expanduser().resolve())
    overrides = [*bench, *a.overrides,
                 *(f"stage.{k}={getattr(cfg.stage, k)}" for k in ("episodes", "supports", "pixels"))]

    phases, t_all = {}, time.perf_counter()

    def phase(name, fn, *args):
        print(f"-- {name} ...", flush=True)
        t0 = time.perf_counter()
        out = fn(*args)
        phases[name] = round(time.perf_counter() - t0, 1)
        return out

    sup = phase("supports: cached vs encoded every step", run_child, "supports", a, overrides)
    before = phase("plain JAX loop (before)", run_child, "plain", a, overrides)
    ray_out = phase("raygen loop (JaxTrainer)", raygen_loop, cfg, a)
    after = phase("plain JAX loop (after)", run_child, "plain", a, overrides)
    wall = time.perf_counter() - t_all

    cached, encoded = median(sup["cached_rates"]), median(sup["encoded_rates"])
    speedup = cached / encoded
    plain = median(before["rates"] + after["rates"])
    ray_rate = median(ray_out["rates"])
    ratio = ray_rate / plain
    sig, B, K = sup["siglip"], cfg.train.batch_size, sup["shots"]
    enc_loop, enc_alone = sup["encode_s_in_loop"], sup["encode_s_alone"]
    counts = sup["counts"]
    tiny_enc = (counts.get("tiny_siglip_flops_per_image") or 0) * B * K
    tiny_step = counts.get("tiny_train_step_flops") or 0
    real_img = counts.get("real_siglip_flops_per_image") or 0
    real_enc = real_img * REAL_BATCH * K
    real_step = counts.get("real_train_step_flops") or 0

    print()
    print(f"FSDiT {cfg.model.size}: {sup['fsdit_params'] / 1e6:.2f} M params {sup['fsdit_net']}; batch {B} x {K} "
          f"supports; JAX {sup['jax']} on cores {sup['cores']} of {os.cpu_count()}")
    print(f"[1] supports: {B * K} images per step through {sig['model']} ({sig['params'] / 1e6:.3f} M params, "
          f"{sig['image_size']}x{sig['image_size']}/{sig['patch_size']}, {sig['tokens']} tokens, {sig['processor']}, "
          f"torch {sig['torch_threads']} threads); every step waited for")
    print(f"  cached, gathered by index : {fmt_rates(sup['cached_rates'])}")
    print(f"  SigLIP-encoded every step : {fmt_rates(sup['encoded_rates'])}")
    print(f"  SigLIP encode per step: {1e3 * sum(enc_loop.values()):.1f} ms in the loop (read "
          f"{1e3 * enc_loop['read']:.1f}, processor {1e3 * enc_loop['processor']:.1f}, model "
          f"{1e3 * enc_loop['model']:.1f}); {1e3 * sum(enc_alone.values()):.1f} ms alone")
    print(f"  encoded vs stored (float16) embeddings, first batch, max abs diff: "
          + ", ".join(f"{k} {v:.2g}" for k, v in sup["agreement_max_abs"].items()))
    print(f"  speed-up (cached / encoded every step): {speedup:.2f}x")
    if tiny_step and tiny_enc:
        print(f"  FLOP counts here (not timings): SigLIP {tiny_enc / 1e9:.2f} GFLOPs per step = "
              f"{tiny_enc / tiny_step:.2f}x the train step's {tiny_step / 1e9:.2f} GFLOPs")
    if real_img and real_step:
        print(f"  ESTIMATE at real scale, from FLOP counts, NOT a measurement: SigLIP(2) B/16 at 224 is "
              f"{real_img / 1e9:.1f} GFLOPs per image; {K} supports x batch {REAL_BATCH} = {REAL_BATCH * K} images = "
              f"{real_enc / 1e12:.1f} TFLOPs per step, {real_enc / real_step:.2f}x the {real_step / 1e12:.1f} TFLOPs "
              f"of an FSDiT-{REAL_SIZE} train step on {REAL_LATENT[0]}x{REAL_LATENT[1]}x{REAL_LATENT[2]} latents "
              f"(here: {tiny_enc / tiny_step:.2f}x). At equal FLOP rates every step would take ~"
              f"{1 + real_enc / real_step:.1f}x as long, before the processor's work on {REAL_BATCH * K} images of "
              f"224x224 per step")
    print(f"[2] loop: logging tensorboard={cfg.log.tensorboard}, wandb={cfg.log.wandb} (system stats "
          f"{cfg.log.wandb_system_stats}), progress={cfg.log.progress}, as the default preset says; plain loop "
          f"in a child process pinned as the worker pins itself (cores {before['cores']}, OMP_NUM_THREADS "
          f"{before['omp_num_threads']})")
    print(f"  plain JAX loop   : {plain:.3f} steps/s (before {fmt_rates(before['rates'])}; after "
          f"{fmt_rates(after['rates'])}; start-up {before['startup_s']:.1f} s, warm-up {before['warmup_s']:.1f} s)")
    if a.diagnose:
        synced = before["rates_finite_read"] + after["rates_finite_read"]
        print(f"  plain + read `finite` every step: {median(synced):.3f} steps/s (diagnostic)")
    print(f"  raygen JaxTrainer: {fmt_rates(ray_out['rates'])} (total {ray_out['total_s']:.1f} s, of which "
          f"{ray_out['other_s']:.1f} s start-up, compile, last preview and checkpoint)")
    print(f"  ratio (raygen / plain, steady state): {ratio:.3f} (goal >= 0.90)")
    print(f"supports speed-up {speedup:.2f}x | loop ratio {ratio:.3f} | wall {wall:.0f} s")

    r4 = lambda v: round(v, 4)  # noqa: E731
    ms = lambda d: {k: round(1e3 * v, 2) for k, v in d.items()}  # noqa: E731
    out = ROOT / "bench" / "results" / "fsdit_step.json"
    out.write_text(json.dumps({
        "supports_speedup": r4(speedup),
        "loop_ratio": r4(ratio),
        "supports": {
            "cached_steps_per_s": r4(cached), "encoded_steps_per_s": r4(encoded),
            "cached_windows": [r4(r) for r in sup["cached_rates"]],
            "encoded_windows": [r4(r) for r in sup["encoded_rates"]],
            "step_waited_for": "every step (block_until_ready)",
            "siglip_encode_ms_per_step_in_loop": {**ms(enc_loop), "total": round(1e3 * sum(enc_loop.values()), 2)},
            "siglip_encode_ms_per_step_alone": {**ms(enc_alone), "total": round(1e3 * sum(enc_alone.values()), 2)},
            "images_encoded_per_step": sup["images_per_step"],
            "encoded_vs_stored_max_abs_diff": sup["agreement_max_abs"],
            "siglip": sig,
            "warmup_s": {"cached": round(sup["warmup_cached_s"], 2), "encoded": round(sup["warmup_encoded_s"], 2)},
            "flop_counts_not_timings": {
                "tiny_train_step_flops": tiny_step, "tiny_siglip_flops_per_step": tiny_enc,
                "real_scale_estimate": {
                    "siglip": "SigLIP B/16 vision tower at 224 (as SigLIP2 B/16 at 224)",
                    "siglip_flops_per_image": real_img, "siglip_params": counts.get("real_siglip_params"),
                    "batch": REAL_BATCH, "images_per_step": REAL_BATCH * K, "siglip_flops_per_step": real_enc,
                    "fsdit_train_step_flops": real_step, "fsdit": counts.get("real_fsdit"),
                    "fsdit_params": counts.get("real_fsdit_params"),
                    "encode_over_step": r4(real_enc / real_step) if real_step else None,
                    **{k: v for k, v in counts.items() if k.endswith("_error")}},
            },
        },
        "loop": {
            "raygen_steps_per_s": r4(ray_rate), "plain_steps_per_s": r4(plain),
            "plain_before_steps_per_s": r4(median(before["rates"])),
            "plain_after_steps_per_s": r4(median(after["rates"])),
            "raygen_windows": [r4(r) for r in ray_out["rates"]],
            "plain_windows_before": [r4(r) for r in before["rates"]],
            "plain_windows_after": [r4(r) for r in after["rates"]],
            **({"plain_finite_read_steps_per_s": r4(median(before["rates_finite_read"] + after["rates_finite_read"]))}
               if a.diagnose else {}),
            "raygen_total_s": round(ray_out["total_s"], 2), "raygen_other_s": round(ray_out["other_s"], 2),
            "plain_startup_s": round(before["startup_s"], 2), "plain_warmup_s": round(before["warmup_s"], 2),
            "plain_loop_process": "child process: JAX_PLATFORMS=cpu, pin_cpus(0, 1) before jax is imported, "
                                  "OMP_NUM_THREADS as Ray sets it for a worker; device waited for per window",
            "affinity_cores": before["cores"], "omp_num_threads": before["omp_num_threads"],
            "logging": {"tensorboard": cfg.log.tensorboard, "wandb": cfg.log.wandb,
                        "wandb_system_stats": cfg.log.wandb_system_stats, "jsonl": True, "progress": cfg.log.progress},
            "checkpoints": f"{ray_out['checkpoints']}, at the last step",
            "previews": f"{ray_out['previews']}, at the last step; its window is not timed",
        },
        "steps_timed": a.steps, "warmup_steps": a.warmup, "window": a.window,
        "model": {"params": sup["fsdit_params"], **sup["fsdit_net"]},
        "batch_size": B, "shots": K, "data": f"{cfg.data.source.kind} {cfg.data.resolution}x{cfg.data.resolution}",
        "optim": {"kind": cfg.optim.kind, "lr": cfg.optim.lr, "grad_clip": cfg.optim.grad_clip},
        "overrides": a.overrides, "phases_s": phases, "wall_s": round(wall, 1),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(), "jax": sup["jax"], "date": time.strftime("%Y-%m-%d"),
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
