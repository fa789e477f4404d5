"""Drifting recipe (Deng et al., arXiv 2602.04770): a one-step class-conditional generator trained
by regressing frozen latent-MAE features of its samples onto drifted targets.

Stages of `jobs/drifting.py`, each resumable:
  1. the feature MAE (raygen.recipes.latent_mae), unless `stage.mae_ckpt` names a trained one;
  2. the generator (raygen.nets.drift_dit) with the drifting loss (raygen.methods.drifting), batches
     of `nc` classes x (G generated, P positives, U unconditional negatives) per step;
  3. one-step generation for every omega in `eval.omegas`, FID / class accuracy per omega.
Pixel space for the embedded digits; `stage.latents=<store>` trains in SD-VAE latent space.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from raygen.config import ConfigError
from raygen.data import images as image_data
from raygen.methods.drifting import DriftConfig, check_feasible, drifting_loss, sample_omega
from raygen.recipes.common import ImageTask, RunSection, run_evaluation
from raygen.recipes.latent_mae import MAEModelConfig
from raygen.train.loop import DebugConfig, LogConfig, OptimConfig, TrainConfig
from raygen.train.state import DataPosition

NAME = "drifting"


@dataclass
class StageConfig:
    space: Literal["pixel", "latent"] = "pixel"  # latent: the preset needs stage.latents
    latents: Optional[str] = None  # a latent store (jobs/encode_latents.py): train in its latent space
    mae_ckpt: Optional[str] = None  # a trained MAE (mae.pt or its run dir); unset: stage 1 trains one


@dataclass
class MAEStageConfig:
    """Stage 1, used when stage.mae_ckpt is unset: the MAE's network and its own training schedule."""

    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-3, weight_decay=0.01, betas=(0.9, 0.95),
                                                                   warmup_steps=4000))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=30000, batch_size=8192, ema_decay=0.9995))


@dataclass
class GeneratorConfig:
    arch: str = "DriftDiT-B/2"  # DriftDiT-{T,S,B,L}/{2,4,16}
    hidden_size: Optional[int] = None  # overrides of the named size
    depth: Optional[int] = None
    num_heads: Optional[int] = None


@dataclass
class FeatureConfig:
    """Which MAE features span the drift problems (spec 2.2: 12 maps x 7 keys + 2 input keys)."""

    maps: Optional[list[str]] = None  # MAE maps (conv1, layer1..4, layer<k>_blk<j>); null = all
    patch_sizes: list[int] = field(default_factory=lambda: [2, 4])
    input_keys: bool = True  # x_norm and x_global: the raw sample itself (the "vanilla" drift)
    # real samples' features are stop-grad and the MAE is frozen: for an in-memory data set, compute them
    # once per worker and gather them by index (exact; skipped when they would exceed cache_max_mb)
    cache_real: bool = True
    cache_max_mb: int = 2048


@dataclass
class BatchConfig:
    """Per optimizer step (spec 2.1): nc classes x (G generated, P positives, U uncond negatives)."""

    nc: int = 64  # classes per step, counted over all workers
    gen: int = 64  # G
    pos: int = 64  # P, drawn from the class (or its queue)
    uncond: int = 16  # U, drawn from the whole data set (or the global queue)
    # uniform: nc distinct classes, positives and negatives drawn from the whole (memory-mapped) data;
    # queue: the release's memory bank (paper A.8): `push_per_step` random items pushed per step into
    # per-class queues (`class_queue`) and a global one (`global_queue`), classes = labels of the pushed batch
    sampler: Literal["uniform", "queue"] = "uniform"
    push_per_step: int = 64
    class_queue: int = 128
    global_queue: int = 1000
    distinct_classes: bool = True  # uniform: the nc classes of a step are distinct (when nc <= number of classes)
    omega_min: float = 1.0  # omega ~ p(omega) proportional to omega^-power on [omega_min, omega_max]
    omega_max: float = 4.0
    omega_power: float = 3.0
    no_cfg_frac: float = 0.0  # fraction of classes trained at omega = 1 (SOTA-L: 0.5)
    flips: Literal["random", "plain"] = "random"  # latent stores with flipped copies: pick one at random

    def validate(self):
        for k in ("nc", "gen", "pos", "uncond"):
            if getattr(self, k) < 1:
                raise ConfigError(f"batch.{k} must be >= 1, got {getattr(self, k)}")
        if self.gen < 2:
            raise ConfigError("batch.gen must be >= 2: generated samples repel each other")
        if not 1.0 <= self.omega_min <= self.omega_max:
            raise ConfigError(f"need 1 <= batch.omega_min <= batch.omega_max, got {self.omega_min}, {self.omega_max}")
        if not 0.0 <= self.no_cfg_frac <= 1.0:
            raise ConfigError(f"batch.no_cfg_frac must be in [0, 1], got {self.no_cfg_frac}")
        if self.sampler == "queue" and self.push_per_step < self.nc:
            raise ConfigError(f"batch.sampler=queue takes the step's classes from the pushed batch: batch.push_per_step="
                              f"{self.push_per_step} must be >= batch.nc={self.nc}")
        if min(self.push_per_step, self.class_queue, self.global_queue) < 1:
            raise ConfigError("batch.push_per_step, batch.class_queue and batch.global_queue must be >= 1")


@dataclass
class DriftEvalConfig:
    enabled: bool = True
    omegas: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    extractor: Literal["auto", "digits", "inception", "none"] = "auto"  # auto: digits on digits, else inception if weights given
    inception_weights: Optional[str] = None  # local path or URL of inception-2015-12-05.pt (TorchScript)
    num_samples: int = 1000  # per omega, class-balanced
    batch_size: int = 500
    untrained_baseline: bool = True  # FID of the untrained generator under the same protocol
    preview_omega: float = 1.5  # omega of the training-time sample grids
    seed: int = 1234
    cpus: int = 0  # CPUs for the evaluation task; 0 = every CPU of the local node

    def validate(self):
        if not self.omegas or min(self.omegas) < 1.0:
            raise ConfigError(f"eval.omegas must be a non-empty list of values >= 1, got {self.omegas}")
        if self.num_samples < 2:
            raise ConfigError("eval.num_samples must be >= 2 (FID needs a covariance)")
        if self.extractor == "inception" and not self.inception_weights:
            raise ConfigError("eval.extractor=inception needs eval.inception_weights=<path or URL of "
                              "inception-2015-12-05.pt>")


@dataclass
class DriftTrainConfig(TrainConfig):
    batch_size: int = 0  # set from batch.nc x batch.gen (generated samples per step); not set by hand


@dataclass
class DriftingConfig:
    run: RunSection = field(default_factory=RunSection)
    stage: StageConfig = field(default_factory=StageConfig)
    data: image_data.ImageDataConfig = field(default_factory=image_data.ImageDataConfig)
    mae: MAEStageConfig = field(default_factory=MAEStageConfig)
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.01, betas=(0.9, 0.95),
                                                                   warmup_steps=5000, grad_clip=2.0))
    train: DriftTrainConfig = field(default_factory=lambda: DriftTrainConfig(steps=30000))
    eval: DriftEvalConfig = field(default_factory=DriftEvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self):
        from raygen.nets.drift_dit import DRIFT_DIT_PATCHES, DRIFT_DIT_SIZES

        if self.stage.space == "latent" and not self.stage.latents and self.data.source != "latents":
            raise ConfigError("this preset trains in latent space: set stage.latents=<store directory> (make one "
                              "with `python jobs/encode_latents.py source.path=...`)")
        if self.stage.latents:
            if self.data.source != "latents" or self.data.path != self.stage.latents:
                self.data = image_data.ImageDataConfig(source="latents", path=self.stage.latents,
                                                       latent_flips=self.data.latent_flips)
                self.data.validate()
        if self.data.source == "image_folder":
            raise ConfigError("data.source=image_folder: the drifting recipe reads class-indexed random batches; "
                              "encode the folder into a store first (jobs/encode_latents.py) and pass stage.latents")
        size, _, patch = self.model.arch.removeprefix("DriftDiT-").partition("/")
        if size not in DRIFT_DIT_SIZES or not patch.isdigit() or int(patch) not in DRIFT_DIT_PATCHES:
            raise ConfigError(f"model.arch={self.model.arch!r} is not a generator size; use DriftDiT-<"
                              f"{'|'.join(DRIFT_DIT_SIZES)}>/<{'|'.join(map(str, DRIFT_DIT_PATCHES))}>")
        patch = int(patch)
        if self.data.resolution % patch:
            raise ConfigError(f"data.resolution={self.data.resolution} is not divisible by the patch size {patch} "
                              f"of model.arch={self.model.arch}")
        t = self.train
        if self.batch.nc % (t.num_workers * t.grad_accum):
            raise ConfigError(
                f"batch.nc={self.batch.nc} classes per step is not divisible by train.num_workers x train.grad_accum "
                f"= {t.num_workers * t.grad_accum}; every worker takes whole classes, so pick a multiple")
        num_classes = len(image_data.class_names(self.data))
        if self.batch.sampler == "uniform" and self.batch.distinct_classes and self.batch.nc > num_classes:
            raise ConfigError(f"batch.nc={self.batch.nc} distinct classes per step, but the data has {num_classes}; "
                              f"lower batch.nc or set batch.distinct_classes=false")
        t.batch_size = self.batch.nc * self.batch.gen  # generated samples per step (throughput metrics)
        check_feasible(self.drift, self.batch.omega_min if self.batch.no_cfg_frac == 0 else 1.0)


# ------------------------------------------------------------------------------------------------
class ClassIndexedData:
    """Random access to the training set by class: the embedded images in memory, or a latent store
    memory-mapped (positions of each class from its label index, rows read on demand)."""

    def __init__(self, data_cfg: image_data.ImageDataConfig, flips: str = "random"):
        self.cfg, self.flips = data_cfg, flips
        self._store = self.images = None
        if data_cfg.source == "latents":
            from raygen.data.store import Store

            self._store = Store(data_cfg.path)
            self.labels = self._store.labels
            self._arrays = [self._store.array("latent")]
            if flips == "random" and "latent_flip" in self._store.array_names:
                self._arrays.append(self._store.array("latent_flip"))
            self.num_classes = len(self._store.class_names)
        else:
            images, self.labels = image_data.arrays(data_cfg, "train")
            self.images = image_data.to_model_input({"image": images, "label": self.labels})["image"]
            self.num_classes = len(image_data.class_names(data_cfg))
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
        self.by_class = [order[bounds[c]:bounds[c + 1]] for c in range(self.num_classes)]
        empty = [c for c in range(self.num_classes) if len(self.by_class[c]) == 0]
        if empty:
            raise ConfigError(f"{data_cfg.path or data_cfg.source}: class(es) {empty} have no training items; the "
                              f"drifting loss needs positives for every class it trains")

    def rows(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        flat = idx.reshape(-1)
        if self.images is not None:
            out = self.images[flat]
        else:
            # memmap reads in sorted order (fancy indexing sorts per shard anyway), one copy per row
            out = np.empty((len(flat), *self._arrays[0][flat[:1]].shape[1:]), np.float32)
            pick = rng.integers(0, len(self._arrays), len(flat))
            for k, arr in enumerate(self._arrays):
                sel = np.flatnonzero(pick == k)
                if len(sel):
                    out[sel] = arr[flat[sel]]
        return out.reshape(*idx.shape, *out.shape[1:])

    def sample(self, classes: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
        """[len(classes), per_class] positions, without replacement where the class is large enough."""
        out = np.empty((len(classes), per_class), np.int64)
        for row, c in enumerate(classes):
            pool = self.by_class[int(c)]
            out[row] = rng.choice(pool, per_class, replace=len(pool) < per_class)
        return out


class MemoryBank:
    """The release's queues (paper A.8) as a function of the step: micro-step i pushes `push` random
    items drawn from a generator seeded by (seed, i); class c's queue holds the last `class_size` pushed
    items of class c, the global queue the last `global_size`. `at(i)` replays the pushes up to step i
    (integers only), so a resumed run has exactly the queues it had. Before step 0 the bank is
    pre-filled with ceil(global_size / push) pushes."""

    def __init__(self, labels: np.ndarray, num_classes: int, push: int, class_size: int, global_size: int,
                 seed: int):
        from collections import deque

        self.labels, self.push, self.seed = labels, push, seed
        self.per_class = [deque(maxlen=class_size) for _ in range(num_classes)]
        self.everything = deque(maxlen=global_size)
        self.next = -math.ceil(global_size / push)  # the pre-fill: steps -ceil(global_size / push) .. -1
        self.last = np.zeros(0, np.int64)

    def pushed(self, step: int) -> np.ndarray:
        # seed entropy must be non-negative: the pre-fill steps are negative
        return np.random.default_rng([self.seed, 0x9E3779B9, step + (1 << 40)]).integers(0, len(self.labels), self.push)

    def at(self, step: int) -> "MemoryBank":
        """The bank after the push of micro-step `step`."""
        while self.next <= step:
            items = self.pushed(self.next)
            for i in items:
                self.per_class[self.labels[i]].append(i)
            self.everything.extend(items)
            self.last, self.next = items, self.next + 1
        return self

    def positives(self, c: int, n: int, rng: np.random.Generator, fallback: np.ndarray) -> np.ndarray:
        """n items of class c from its queue (with replacement when it holds fewer; from the whole
        class while its queue is still empty)."""
        pool = np.fromiter(self.per_class[c], np.int64) if self.per_class[c] else fallback
        return rng.choice(pool, n, replace=len(pool) < n)

    def negatives(self, shape, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.fromiter(self.everything, np.int64), shape)


def _prefetch(iterator, depth: int = 2):
    """Run a batch iterator in a thread, `depth` batches ahead (memmap reads off the training thread)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surfaces in the training thread
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class Drifting:
    """The method: draw omega per class, generate G samples per class in one step, take MAE
    features of generated (with grad) and real (no grad) samples, and regress onto the drift."""

    def __init__(self, cfg: DriftingConfig, mae_state: dict, sample_shape: tuple,
                 real_images: Optional[np.ndarray] = None):
        self.cfg, self._mae_state, self._mae, self.sample_shape = cfg, mae_state, None, tuple(sample_shape)
        self._real_images, self._cache = real_images, None  # real_images: cache the features of these

    def mae(self, device):
        if self._mae is None:
            from raygen.recipes.latent_mae import build_mae

            net = build_mae(self._mae_state["model_args"])
            net.load_state_dict(self._mae_state["ema"])
            self._mae = net.requires_grad_(False).eval().to(device)
        return self._mae

    def features(self, x: torch.Tensor) -> dict:
        f = self.cfg.features
        return self.mae(x.device).features(x, layers=f.maps, patch_sizes=tuple(f.patch_sizes),
                                           include_input=f.input_keys)

    def real_features(self, batch: dict) -> dict:
        """Features of the positives and negatives, [nc*P + nc*U] rows: from the cache, or computed."""
        if "pos_idx" not in batch:
            with torch.no_grad():
                return self.features(torch.cat([batch["pos"].flatten(0, 1), batch["uncond"].flatten(0, 1)]))
        idx = torch.cat([batch["pos_idx"].flatten(), batch["uncond_idx"].flatten()])
        if self._cache is None:
            device = idx.device
            with torch.no_grad():
                parts = [self.features(torch.from_numpy(self._real_images[i:i + 256]).to(device))
                         for i in range(0, len(self._real_images), 256)]
            self._cache = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v[idx] for k, v in self._cache.items()}

    def log_metrics(self) -> dict:
        """Diagnostics of the last step: per temperature the mean over keys of theta_R (the RMS of the
        unnormalised drift, in sigma units: it shrinks as generated and real features match), and the
        mean omega drawn."""
        from raygen.methods.drifting import stats_to_floats

        if getattr(self, "last_stats", None) is None:
            return {}
        stats = stats_to_floats(self.last_stats)
        out = {}
        for R in self.cfg.drift.temperatures:
            vals = [v for k, v in stats.items() if k.endswith(f"/theta_{R:g}")]
            out[f"drift_theta_{R:g}"] = sum(vals) / max(1, len(vals))
        out["omega_mean"] = float(self.last_omega)
        return out

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        b = self.cfg.batch
        return sample_omega(n, generator, lo=b.omega_min, hi=b.omega_max, power=b.omega_power,
                            no_cfg_frac=b.no_cfg_frac)

    def loss(self, net, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from raygen.nets.drift_dit import draw_style

        b = self.cfg.batch
        labels = batch["label"]
        nc, g, p, u = len(labels), b.gen, b.pos, b.uncond
        omega = self.draw(nc, generator).to(labels.device)
        self.last_omega = omega.mean().detach()  # read at log time only (no device sync per step)
        noise = torch.randn((nc * g, *self.sample_shape), generator=generator, device=generator.device)
        style = draw_style(nc * g, generator).to(labels.device)
        x = net(noise.to(labels.device), labels.repeat_interleave(g), omega.repeat_interleave(g), style)
        gen = {k: v.unflatten(0, (nc, g)) for k, v in self.features(x).items()}
        real = self.real_features(batch)
        pos_f = {k: v[:nc * p].unflatten(0, (nc, p)) for k, v in real.items()}
        unc_f = {k: v[nc * p:].unflatten(0, (nc, u)) for k, v in real.items()}
        loss, self.last_stats = drifting_loss(gen, pos_f, unc_f, omega, self.cfg.drift)
        return loss


class DriftingTask(ImageTask):
    """What the generic loop and the evaluator need: networks, method, batches, previews."""

    recipe = NAME

    def __init__(self, cfg: DriftingConfig, mae_state: Optional[dict] = None):
        super().__init__(cfg)
        self.mae_state = mae_state

    def build_net(self) -> torch.nn.Module:
        from raygen.nets.drift_dit import drift_dit

        m = self.cfg.model
        overrides = {k: v for k in ("hidden_size", "depth", "num_heads") if (v := getattr(m, k)) is not None}
        return drift_dit(m.arch, input_size=self.cfg.data.resolution, in_channels=self.image_shape[0],
                         num_classes=self.num_classes, **overrides)

    def build_method(self) -> Drifting:
        real = ClassIndexedData(self.cfg.data).images if self.cache_real() else None
        return Drifting(self.cfg, self.mae_state, self.image_shape, real)

    def cache_real(self) -> bool:
        """Whether the real samples' features are computed once and gathered by index (FeatureConfig)."""
        f = self.cfg.features
        if not f.cache_real or self.cfg.data.source == "latents" or self.mae_state is None:
            return False
        from raygen.recipes.latent_mae import build_mae

        with torch.device("meta"):
            keys = build_mae(self.mae_state["model_args"]).feature_keys(f.maps, tuple(f.patch_sizes), f.input_keys)
        per_item = sum(L * C for L, C in keys.values()) * 4
        n = len(image_data.arrays(self.cfg.data, "train")[1])
        return per_item * n <= f.cache_max_mb * 2**20

    def generate(self, method, net, labels: torch.Tensor, generator: torch.Generator, omega: float = 1.0):
        """One network evaluation per sample; images in [-1, 1]; all randomness from `generator`."""
        from raygen.nets.drift_dit import draw_style

        device = next(net.parameters()).device
        n = len(labels)
        noise = torch.randn((n, *self.image_shape), generator=generator, device=generator.device)
        style = draw_style(n, generator)
        omegas = torch.full((n,), float(omega))
        with torch.no_grad():
            x = net(noise.to(device), labels.to(device), omegas.to(device), style.to(device))
        return self.to_pixels(x)

    def preview(self, net, generator: torch.Generator, per_class: int = 8) -> torch.Tensor:
        labels = torch.arange(self.num_classes).repeat(per_class)
        return self.generate(None, net, labels, generator, omega=self.cfg.eval.preview_omega)

    def batch_stream(self, position: DataPosition, rank: int, world: int, device):
        """Endless (position, batch) stream. Micro-batch i draws its classes from a generator seeded by
        (seed, i), the same on every worker, and each worker takes its slice of them; positives and
        negatives come from a generator seeded by (seed, i, rank). The stream is a pure function of
        the position, so a resumed run continues it exactly."""
        b, tc = self.cfg.batch, self.cfg.train
        data = ClassIndexedData(self.cfg.data, b.flips)
        by_index = self.cache_real()  # the method gathers cached features by index
        per_micro = b.nc // tc.grad_accum  # global classes per micro-batch
        local = per_micro // world

        bank = (MemoryBank(data.labels, data.num_classes, b.push_per_step, b.class_queue, b.global_queue, tc.seed)
                if b.sampler == "queue" else None)

        def batches():
            i = position.batch
            while True:
                if bank is not None:  # the release: classes of the pushed batch, positives from their queues
                    bank.at(i)
                    classes = data.labels[bank.last[:per_micro]][rank * local:(rank + 1) * local]
                    rng = np.random.default_rng([tc.seed, i, rank])
                    pos = np.stack([bank.positives(int(c), b.pos, rng, data.by_class[int(c)]) for c in classes])
                    unc = bank.negatives((len(classes), b.uncond), rng)
                else:
                    rng = np.random.default_rng([tc.seed, i])
                    classes = rng.choice(data.num_classes, per_micro,
                                         replace=not b.distinct_classes or per_micro > data.num_classes)
                    classes = classes[rank * local:(rank + 1) * local]
                    rng = np.random.default_rng([tc.seed, i, rank])
                    pos = data.sample(classes, b.pos, rng)
                    unc = rng.integers(0, len(data.labels), (len(classes), b.uncond))
                batch = {"label": torch.from_numpy(classes.astype(np.int64))}
                if by_index:
                    batch.update(pos_idx=torch.from_numpy(pos), uncond_idx=torch.from_numpy(unc))
                else:
                    batch.update(pos=torch.from_numpy(data.rows(pos, rng)), uncond=torch.from_numpy(data.rows(unc, rng)))
                i += 1
                yield i, batch

        for i, batch in _prefetch(batches()):
            yield DataPosition(0, i), {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
def evaluate_omegas(task: DriftingTask, ema_state: dict, run_dir, cpus: int = 0) -> dict:
    """eval/omega_sweep.{json,csv,png}, eval/samples_omega<w>.png per omega, eval/metrics.json (the best
    omega by FID, and the untrained generator's FID under the same protocol)."""
    import time

    from raygen.eval.evaluate import Evaluator, _write_json, write_sweep
    from raygen.core.grid import save_grid

    if cpus:
        torch.set_num_threads(cpus)
    cfg = task.cfg.eval
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = task.build_net().to(device).eval()
    net.load_state_dict(ema_state)
    ev = Evaluator(task, cfg, device)
    per_class = min(10, max(1, cfg.num_samples // task.num_classes))
    rows = []
    for omega in cfg.omegas:
        t0 = time.perf_counter()
        images, labels = ev.sample(None, net, cfg.num_samples, omega=omega)
        rows.append({"omega": omega, **ev.score(images, labels), "num_samples": cfg.num_samples,
                     "seconds": round(time.perf_counter() - t0, 2)})
        save_grid(images[: per_class * task.num_classes], out / f"samples_omega{omega:g}.png",
                  nrow=task.num_classes, upscale=task.preview_upscale)
    write_sweep(rows, out / "omega_sweep", x="omega", title=f"one-step generation vs CFG omega "
                f"({cfg.num_samples} samples each)", xscale="linear")
    metrics: dict = {"fid_features": getattr(ev.extractor, "name", None), "num_samples": cfg.num_samples,
                     "nfe": 1, "weights": "ema", "omegas": list(cfg.omegas)}
    if ev.extractor is not None:
        best = min(rows, key=lambda r: r["fid"])
        metrics.update({"best_omega": best["omega"], "fid": best["fid"]})
        if "class_accuracy" in best:
            metrics["class_accuracy"] = best["class_accuracy"]
        if hasattr(ev.extractor, "test_accuracy"):
            metrics["classifier_test_accuracy"] = ev.extractor.test_accuracy()
        if cfg.untrained_baseline:
            torch.manual_seed(cfg.seed)
            untrained = task.build_net().to(device).eval()
            u = ev.score(*ev.sample(None, untrained, cfg.num_samples, omega=best["omega"]))
            metrics["fid_untrained"] = u["fid"]
            metrics["fid_untrained_over_fid"] = u["fid"] / max(best["fid"], 1e-12)
            if "class_accuracy" in u:
                metrics["class_accuracy_untrained"] = u["class_accuracy"]
    for r in rows:  # every omega's scores, for sweeps that compare trials at one omega
        metrics.update({f"{k}@omega={r['omega']:g}": r[k] for k in ("fid", "class_accuracy") if k in r})
    _write_json(out / "metrics.json", metrics)
    return metrics


def mae_stage(cfg: DriftingConfig, run_dir: Path) -> Path:
    """Stage 1: the MAE named by stage.mae_ckpt, or one trained into <run_dir>/mae (kept on resume)."""
    from raygen.config import dump_yaml
    from raygen.recipes import latent_mae

    if cfg.stage.mae_ckpt:
        return Path(cfg.stage.mae_ckpt)
    mae_dir = Path(run_dir) / "mae"
    if (mae_dir / latent_mae.MAE_FILE).is_file():
        print(f"stage 1: using the MAE already trained in {mae_dir}", flush=True)
        return mae_dir
    mae_cfg = latent_mae.LatentMAEConfig(data=cfg.data, model=cfg.mae.model, optim=cfg.mae.optim,
                                         train=cfg.mae.train, log=cfg.log)
    mae_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(mae_cfg, mae_dir / "config.yaml")
    print(f"stage 1: training the feature MAE into {mae_dir}", flush=True)
    latent_mae.run(mae_cfg, mae_dir)
    return mae_dir


def run(cfg: DriftingConfig, run_dir) -> dict:

    from raygen.recipes.latent_mae import load_mae
    from raygen.train.loop import final_state, fit, plot_metrics

    run_dir = Path(run_dir)
    mae_path = mae_stage(cfg, run_dir)
    _, mae_state = load_mae(mae_path)
    check_mae(mae_state, cfg)
    print("stage 2: training the one-step generator", flush=True)
    task = DriftingTask(cfg, mae_state)
    result = fit(task, run_dir, {})
    plot_metrics(run_dir, keys=("loss", "lr", "grad_norm", "steps_per_s",
                                *(f"drift_theta_{R:g}" for R in cfg.drift.temperatures)))
    if not cfg.eval.enabled:
        return {}
    print(f"stage 3: one-step generation and evaluation at omega = {cfg.eval.omegas}", flush=True)
    ema = final_state(result)["ema"]
    return run_evaluation(evaluate_omegas, task, ema, run_dir)


def shared_stage(cfg: DriftingConfig, shared_dir: Path, swept_keys: list[str]) -> dict:
    """A sweep that varies no MAE key trains its MAE once: every trial then measures the same feature space."""
    if cfg.stage.mae_ckpt or any(k.startswith("mae.") for k in swept_keys):
        return {}
    return {"stage.mae_ckpt": str(mae_stage(cfg, Path(shared_dir)))}


def reported_metrics(cfg: DriftingConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    """What a run reports to a sweep: the loop's metrics and the drift diagnostics while training, and
    the evaluation's at the end (when there is a FID extractor)."""
    from raygen.eval.evaluate import scored_metrics
    from raygen.train.loop import LOOP_METRICS

    train = [*LOOP_METRICS, *(f"drift_theta_{R:g}" for R in cfg.drift.temperatures), "omega_mean"]
    if during_training or not cfg.eval.enabled:
        return train
    scored = scored_metrics(cfg.eval, image_data.pixel_source(cfg.data))
    evaluated = ["best_omega", "nfe", "num_samples", *scored,
                 *(f"{m}@omega={w:g}" for w in cfg.eval.omegas for m in scored)]
    if scored and cfg.eval.untrained_baseline:
        evaluated += ["fid_untrained", "fid_untrained_over_fid"]
    return train + evaluated


def check_mae(mae_state: dict, cfg: DriftingConfig) -> None:
    """The MAE must have been trained on samples shaped like the generator's output."""
    args = mae_state["model_args"]
    want = (image_data.channels(cfg.data), cfg.data.resolution)
    if (args["in_channels"], args["input_size"]) != want:
        raise ConfigError(f"stage.mae_ckpt: the MAE takes {args['in_channels']}x{args['input_size']}² inputs but the "
                          f"generator makes {want[0]}x{want[1]}² samples; train the MAE on the same data")


def main(argv=None):
    """The `jobs/drifting.py` entry point; returns the run directory."""
    from raygen.cli import guarded, init_ray, report, setup_job

    cfg, run_dir, _ = setup_job(NAME, DriftingConfig, argv)
    init_ray()
    report(run_dir, guarded(run, cfg, run_dir))
    return run_dir
