"""FSDiT recipe: few-shot generation (docs/methods/fsdit.md). Given K support images of a class never
seen in training, a flow-matching DiT in JAX (raygen.jaxgen.fsdit) generates new images of it,
conditioned on the supports' SigLIP embeddings: the mean pooled vector through adaLN and the tokens
through a Perceiver and cross-attention.

A run is four stages, each a Ray job whose output is kept and reused by later runs:
  1. the episodes (jobs/prepare_fewshot.py): a disjoint class split and per-split episode tables of
     listing positions (`stage.episodes`, or prepared from `data`);
  2. the support embeddings: every image encoded once by SigLIP into a store (`stage.supports`, or
     encoded with `stage.siglip`); training gathers them by index, never re-encoding;
  3. the targets: a pixel store of the same listing (made when unset), or `stage.latents`, an SD-VAE
     latent store (the original 28x28x4 latents of 224x224 images);
  4. training under Ray Train's JaxTrainer (raygen.train.jax_backend), then the few-shot evaluation
     on the unseen test classes (docs/methods/fsdit-evaluation.md).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from raygen.config import ConfigError
from raygen.core.contracts import NetSpec, Task
from raygen.data.sources import SourceConfig
from raygen.methods.flow_matching import FlowMatching, FlowMatchingConfig
from raygen.recipes import Recipe, register
from raygen.recipes.common import RunSection
from raygen.train.config import LOOP_METRICS, DebugConfig, LogConfig, OptimConfig, TrainConfig
from raygen.train.state import DataPosition

NAME = "fsdit"
SIZES = ("debug", "tiny", "big", "large", "xlarge")


@dataclass
class FewShotDataConfig:
    source: SourceConfig = field(default_factory=lambda: SourceConfig(kind="fewshot", resolution=16))
    split: str = "60/16/20"  # train/val/test classes (disjoint)
    split_seed: int = 42  # the class split and the episode draws
    sets: int = 100  # draws of shots+1 images per class; each gives shots+1 episodes
    shots: int = 5  # supports per episode
    resolution: int = 16  # pixel targets: the stored image size
    hflip: bool = True  # random horizontal flips of the targets


@dataclass
class StageConfig:
    space: Literal["pixel", "latent"] = "pixel"  # latent: the preset needs stage.latents
    episodes: Optional[str] = None  # a jobs/prepare_fewshot.py directory; unset: prepared from `data`
    supports: Optional[str] = None  # a SigLIP store of data.source (jobs/encode_siglip.py); unset: encoded here
    siglip: str = "raygen/tiny-siglip"  # the encoder of stage 2 when stage.supports is unset
    latents: Optional[str] = None  # an SD-VAE latent store of data.source: train in latent space
    pixels: Optional[str] = None  # a pixel store of data.source; unset (and no latents): made here


@dataclass
class ModelConfig:
    size: Literal["debug", "tiny", "big", "large", "xlarge"] = "tiny"
    cross_attn: Literal["all", "cls", "none"] = "all"  # which tokens read the supports' tokens; cls = the original
    use_support_tokens: bool = True  # false: the pooled vector only (then cross_attn must be none)
    perceiver_latents: int = 0  # 0 = one per patch
    hidden_size: Optional[int] = None  # overrides of the named size
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None

    def validate(self):
        if self.cross_attn != "none" and not self.use_support_tokens:
            raise ConfigError(f"model.cross_attn={self.cross_attn} reads the support tokens; with "
                              "model.use_support_tokens=false set model.cross_attn=none")


@dataclass
class FewShotEvalConfig:
    enabled: bool = True
    split: Literal["test", "val"] = "test"  # the unseen classes evaluated
    episodes_per_class: int = 8  # episodes of `shots` supports per unseen class
    samples_per_episode: int = 4  # generations per episode
    reference_per_class: int = 30  # held-out real images per class: the FID reference, never supports
    judge_per_class: int = 20  # real images per class the accuracy classifier trains on, never supports
    settings: dict[str, Any] = field(default_factory=dict)  # sampler settings (steps, cfg_scale); unset: method's
    preview: dict[str, Any] = field(default_factory=dict)  # sampler settings of the training-time grids
    classifier_steps: int = 600  # the evaluation classifier and the feature network
    pr_k: int = 3
    seed: int = 1234
    cpus: int = 0  # 0 = every free CPU

    def validate(self):
        if min(self.episodes_per_class, self.samples_per_episode, self.judge_per_class) < 1 \
                or self.reference_per_class < 2:
            raise ConfigError("eval.episodes_per_class and eval.samples_per_episode must be >= 1 and "
                              "eval.judge_per_class >= 1, eval.reference_per_class >= 2 (FID needs a covariance)")
        for section in ("settings", "preview"):
            for key in getattr(self, section):
                if key not in FlowMatching.sampler_settings:
                    raise ConfigError(f"eval.{section}.{key}: the flow-matching sampler has no setting {key!r}; it "
                                      f"takes {', '.join(FlowMatching.sampler_settings)}")


@dataclass
class FSDiTConfig:
    run: RunSection = field(default_factory=RunSection)
    data: FewShotDataConfig = field(default_factory=FewShotDataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self):
        if self.stage.latents and self.stage.pixels:
            raise ConfigError("stage.latents and stage.pixels both name the targets; give one")
        if self.stage.space == "latent" and not self.stage.latents:
            raise ConfigError("this preset trains in latent space: set stage.latents=<SD-VAE latent store> (python "
                              "jobs/encode_latents.py source.path=...) and stage.supports=<SigLIP store> (python "
                              "jobs/encode_siglip.py source.path=...) of the same source")


# ---- the data a worker reads -------------------------------------------------------------------------

class EpisodeData:
    """Targets and support embeddings of one prepared run, addressed by listing position: the episode
    tables index the listing; each store holds the listing's items (less any it skipped) in order."""

    def __init__(self, cfg: FSDiTConfig, in_memory: bool = True):
        from raygen.data.fewshot_prep import load_split
        from raygen.data.store import Store

        st = cfg.stage
        self.split = load_split(st.episodes)
        self.supports = Store(st.supports)
        self.targets = Store(st.latents or st.pixels)
        self.latent = bool(st.latents)
        digest = self.split["listing"]["listing_sha256"]
        for store in (self.supports, self.targets):
            stamp = json.loads((store.path / "ingest.json").read_text())
            if stamp["listing_sha256"] != digest:
                raise ConfigError(f"{store.path} was made from a different listing than the episodes in "
                                  f"{st.episodes}; encode the same source.* the episodes were prepared from")
        load = (lambda a: np.asarray(a)) if in_memory else (lambda a: a)
        self.pooled = load(self.supports.array("pooled"))
        self.tokens = load(self.supports.array("tokens")) if cfg.model.use_support_tokens else None
        self.images = load(self.targets.array("latent" if self.latent else "image"))
        self._pos_s = self._positions(self.supports)
        self._pos_t = self._positions(self.targets)

    @staticmethod
    def _positions(store) -> np.ndarray:
        """listing position -> store position (-1 where the ingest skipped the item)."""
        n = int(json.loads((store.path / "ingest.json").read_text())["num_items"])
        out = np.full(n, -1, np.int64)
        out[store.listing_index] = np.arange(len(store))
        return out

    def target_positions(self, listing_idx) -> np.ndarray:
        pos = self._pos_t[np.asarray(listing_idx)]
        if (pos < 0).any():
            raise ConfigError(f"{self.targets.path} lacks listing items {np.asarray(listing_idx)[pos < 0][:5]} that "
                              "episodes use (the ingest skipped them); re-prepare the episodes from the same source")
        return pos

    def support_positions(self, listing_idx) -> np.ndarray:
        pos = self._pos_s[np.asarray(listing_idx)]
        if (pos < 0).any():
            raise ConfigError(f"{self.supports.path} lacks listing items the episodes use; re-prepare the episodes")
        return pos

    def x(self, listing_idx) -> np.ndarray:
        """Targets as float32 NHWC: pixels in [-1, 1], or the store's (already scaled) latents."""
        a = np.asarray(self.images[self.target_positions(listing_idx)], np.float32)
        if not self.latent:
            a = a / 127.5 - 1.0
        return a.transpose(0, 2, 3, 1)

    def cond(self, supports) -> dict:
        """Support embeddings of [B, K] listing positions: pooled [B, K, D] and tokens [B, K, T, D]."""
        s = np.asarray(supports)
        pos = self.support_positions(s.reshape(-1))
        out = {"pooled": np.asarray(self.pooled[pos], np.float32).reshape(*s.shape, -1)}
        if self.tokens is not None:
            tok = np.asarray(self.tokens[pos], np.float32)
            out["tokens"] = tok.reshape(*s.shape, *tok.shape[1:])
        return out

    @property
    def support_dim(self) -> int:
        return int(self.pooled.shape[-1])

    @property
    def target_shape(self) -> tuple:  # (H, W, C)
        c, h, w = self.images.shape[1:]
        return (h, w, c)


# ---- the task ------------------------------------------------------------------------------------------

class FSDiTTask(Task):
    recipe = NAME
    backend = "jax"
    num_classes = 0  # conditioned on supports, not labels
    preview_upscale = 4

    def __init__(self, cfg: FSDiTConfig):
        from raygen.data.fewshot_prep import load_episodes

        self.cfg = cfg
        self._data = None
        meta = _store_meta(cfg)
        self.support_dim, self.support_tokens = meta["support_dim"], meta["support_tokens"]
        self.target_shape = meta["target_shape"]
        self.sample_shape = self.target_shape
        self.shots = int(json.loads((Path(cfg.stage.episodes) / "split.json").read_text())["shots"])
        # the preview: 8 unseen (val) classes, one fixed episode each, in columns
        val = load_episodes(cfg.stage.episodes, "val")
        pick = _first_per_class(val["label"], 8) if len(val["label"]) else np.zeros(0, np.int64)
        self.preview_supports = val["supports"][pick]
        self.preview_columns = max(1, len(pick))

    @property
    def data(self) -> EpisodeData:
        if self._data is None:
            self._data = EpisodeData(self.cfg)
        return self._data

    def __getstate__(self):  # workers load the arrays themselves
        return {**self.__dict__, "_data": None}

    def net_spec(self) -> NetSpec:
        m = self.cfg.model
        overrides = {k: v for k in ("hidden_size", "depth", "num_heads", "patch_size")
                     if (v := getattr(m, k)) is not None}
        h, _, c = self.target_shape
        use_tokens = m.use_support_tokens and self.support_tokens > 0
        return NetSpec("raygen.jaxgen.fsdit:fsdit", {
            "name": m.size, "input_size": h, "in_channels": c, "support_dim": self.support_dim,
            "cross_attn": m.cross_attn if use_tokens else "none", "use_support_tokens": use_tokens,
            "perceiver_latents": m.perceiver_latents, **overrides})

    def build_method(self) -> FlowMatching:
        return FlowMatching(self.cfg.method)

    def init_params(self, net, key):
        from raygen.jaxgen.fsdit import init_params

        h, w, c = self.target_shape
        shapes = {"x": (1, h, w, c), "pooled": (1, self.shots, self.support_dim),
                  "tokens": (1, self.shots, self.support_tokens, self.support_dim) if net.has_context else None}
        return init_params(net, key, shapes)

    def batches(self, position: DataPosition, rank: int, world: int, device=None):
        """The global batch of every step is a function of (seed, epoch, batch): a permutation of the
        train episodes per epoch, random flips from the same seed; each rank takes its slice, so any
        number of workers sees the same global batches and a resumed run continues where it stopped."""
        from raygen.data.fewshot_prep import load_episodes

        tc = self.cfg.train
        table = load_episodes(self.cfg.stage.episodes, "train")
        n = len(table["target"])
        per_epoch = n // tc.batch_size
        if per_epoch == 0:
            raise ConfigError(f"the train split has {n} episodes, fewer than train.batch_size={tc.batch_size}; "
                              "raise data.sets or lower train.batch_size")
        local = tc.batch_size // world
        epoch, b = position.epoch, position.batch
        data = self.data
        while True:
            rng = np.random.default_rng([tc.seed, epoch])
            order = rng.permutation(n)
            flips = rng.random(n) < 0.5
            while b < per_epoch:
                sel = order[b * tc.batch_size:(b + 1) * tc.batch_size][rank * local:(rank + 1) * local]
                b += 1
                x = data.x(table["target"][sel])
                if self.cfg.data.hflip and not data.latent:
                    f = flips[sel]
                    x[f] = x[f, :, ::-1]
                yield DataPosition(epoch, b), {"x": x, **data.cond(table["supports"][sel])}
            epoch, b = epoch + 1, 0

    def preview(self, net, key):
        """One row per preview setting: generations for 8 unseen (val) classes from fixed supports."""
        import jax

        if not len(self.preview_supports):
            return np.zeros((1, self.target_shape[2], *self.target_shape[:2]), np.float32)
        cond = self.data.cond(self.preview_supports)
        rows = 4
        cond = {k: np.repeat(v[None], rows, 0).reshape(-1, *v.shape[1:]) for k, v in cond.items()}
        noise = jax.random.normal(key, (len(cond["pooled"]), *self.target_shape))
        x = self.build_method().sample(net, noise, cond, None, **self.cfg.eval.preview)
        return self.to_pixels(np.asarray(x))

    def to_pixels(self, x) -> np.ndarray:
        """NHWC samples -> NCHW images in [-1, 1] (latents decoded by the store's VAE)."""
        import torch

        x = np.asarray(x, np.float32).transpose(0, 3, 1, 2)
        if not self.cfg.stage.latents:
            return np.clip(x, -1, 1)
        from raygen.data.encoders import decode_latents
        from raygen.data.store import Store

        return decode_latents(Store(self.cfg.stage.latents).meta, torch.from_numpy(x)).numpy()


def _first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Row indices of the first episode of each of the first n classes in a table."""
    _, first = np.unique(labels, return_index=True)
    return np.sort(first)[:n]


def _store_meta(cfg: FSDiTConfig) -> dict:
    """Shapes from the stores' own files (no array is read): support dim, tokens per image, target HWC."""
    from raygen.data.store import Store

    sup = Store(cfg.stage.supports)
    tgt = Store(cfg.stage.latents or cfg.stage.pixels)
    pooled, tokens = sup.array("pooled"), sup.array("tokens")
    images = tgt.array("latent" if cfg.stage.latents else "image")
    c, h, w = images.shape[1:]
    return {"support_dim": int(pooled.shape[-1]), "support_tokens": int(tokens.shape[1]), "target_shape": (h, w, c)}


# ---- the stages ----------------------------------------------------------------------------------------

def prepare_stages(cfg: FSDiTConfig, runs_root: Path) -> FSDiTConfig:
    """Stages 1-3: the episodes, the SigLIP store and the target store of `data.source`, made unless the
    config names them; made ones go under <runs-root>/fewshot and <runs-root>/stores and are reused."""
    from raygen.core.job import lock_run
    from raygen.data import fewshot_prep, ingest
    from raygen.data.encoders import EncoderConfig
    from raygen.data.transforms import TransformConfig

    st, d = cfg.stage, cfg.data
    updates = {}
    given = st.supports or st.latents or st.pixels
    source = source_of(given) if given else d.source  # the episodes must index the given stores' listing
    if not st.episodes:
        prep = fewshot_prep.FewshotPrepConfig(source=source, split=d.split, seed=d.split_seed, sets=d.sets,
                                              shots=d.shots)
        out = fewshot_prep.default_dir(prep, str(runs_root))
        if not (out / "split.json").is_file():
            print(f"stage 1: episodes into {out}", flush=True)
            lock_run(out.parent, f"fewshot-{out.name}", f"a prepare_fewshot into {out}")
            fewshot_prep.prepare_fewshot(prep, out)
        updates["episodes"] = str(out)
    if not st.supports:
        enc = ingest.IngestConfig(source=source, transform=TransformConfig(kind="none"),
                                  encoder=EncoderConfig(model=st.siglip, batch_size=256))
        out = ingest.default_store_path(enc, str(runs_root), "siglip")
        if not (out / "meta.json").is_file():
            from raygen.data.tiny_models import resolve_model

            print(f"stage 2: support embeddings ({st.siglip}) into {out}", flush=True)
            enc.encoder.model = resolve_model(st.siglip)
            lock_run(out.parent, f"store-{out.name}", f"an ingest into {out}")
            ingest.run_ingest(enc, out, "siglip")
        updates["supports"] = str(out)
    if not st.latents and not st.pixels:
        pix = ingest.PixelIngestConfig(source=source,
                                       transform=TransformConfig(kind="resize_center_crop", resolution=d.resolution))
        out = ingest.default_store_path(pix, str(runs_root), "pixels")
        if not (out / "meta.json").is_file():
            print(f"stage 3: target images into {out}", flush=True)
            lock_run(out.parent, f"store-{out.name}", f"an ingest into {out}")
            ingest.run_ingest(pix, out, "pixels")
        updates["pixels"] = str(out)
    return dataclasses.replace(cfg, stage=dataclasses.replace(st, **updates)) if updates else cfg


def source_of(store_path) -> SourceConfig:
    """The source config a store was made from (its meta.json), so stages made here list the same items."""
    from raygen.data.store import Store

    meta = dict(Store(store_path).meta["source"])
    meta["kind"] = meta.pop("resolved_kind", meta.get("kind"))
    fields = {f.name for f in dataclasses.fields(SourceConfig)}
    return SourceConfig(**{k: v for k, v in meta.items() if k in fields})


def run(cfg: FSDiTConfig, run_dir, callbacks=()) -> dict:
    from raygen.train.driver import train

    run_dir = Path(run_dir)
    cfg = prepare_stages(cfg, run_dir.parent.parent)  # <runs-root>/fsdit/<run> -> stages in <runs-root>
    task = FSDiTTask(cfg)
    print(f"stage 4: training {cfg.model.size} FSDiT ({task.net_spec().kwargs}) under JaxTrainer", flush=True)
    ema = train(task, run_dir, callbacks)
    if not cfg.eval.enabled:
        return {}
    return run_fewshot_evaluation(task, ema, run_dir)


def run_fewshot_evaluation(task: FSDiTTask, ema_params, run_dir) -> dict:
    """The evaluation as a Ray task (every free CPU, or eval.cpus) after training released its workers."""
    import ray

    from raygen.recipes.fsdit_eval import evaluate_fewshot

    cpus = task.cfg.eval.cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=cpus, runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})(evaluate_fewshot)
    return ray.get(remote.options(scheduling_strategy="DEFAULT").remote(task, ema_params, str(run_dir)))


def evaluate(cfg: FSDiTConfig, run_dir, trained_run) -> dict:
    """The EMA weights exported by `trained_run`, sampled and scored with this config's eval settings."""
    from raygen.train.jax_backend import load_exported_jax

    _, ema, _ = load_exported_jax(trained_run)
    cfg = prepare_stages(cfg, Path(run_dir).parent.parent)
    return run_fewshot_evaluation(FSDiTTask(cfg), ema, run_dir)


def resolve(cfg: FSDiTConfig) -> FSDiTConfig:
    from raygen.data.fewshot_prep import parse_split

    try:
        parse_split(cfg.data.split)
    except ConfigError as e:  # the recipe's key is data.split
        raise ConfigError(f"data.{e}") from None
    if cfg.model.size not in SIZES:
        raise ConfigError(f"model.size={cfg.model.size!r}; choose one of {', '.join(SIZES)}")
    return cfg


def reported_metrics(cfg: FSDiTConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    from raygen.recipes.fsdit_eval import REPORTED

    train = [] if eval_only else list(LOOP_METRICS)
    if during_training or not cfg.eval.enabled:
        return train
    return train + list(REPORTED)


RECIPE = register(Recipe(name=NAME, config=FSDiTConfig, task=FSDiTTask, run=run, reported_metrics=reported_metrics,
                         evaluate=evaluate, resolve=resolve,
                         description="few-shot flow-matching DiT in JAX, conditioned on SigLIP support embeddings"))
