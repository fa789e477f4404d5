"""Ray Data ingest: source listing -> CPU decode actors (read, RGB, crop) -> encoder actors (VAE or
SigLIP, GPU when there is one) -> shard writers -> `meta.json`. One pipeline for both encoders; it
streams, so memory stays bounded at any dataset size, and decode overlaps encode.

    listing (driver)  ->  Decoder x decode_actors  ->  VAEEncoder | SigLIPEncoder x actors  ->  write_shard tasks

A pixel store (`jobs/encode_pixels.py`) is the same pipeline without the encoder stage: the decode
actors' cropped images are written as uint8 `image` [C,H,W] arrays, for training in pixel space
(e.g. EDM, arXiv:2206.00364) at memory-map speed.

    listing (driver)  ->  Decoder x decode_actors (uint8 [C,H,W])  ->  write_shard tasks

Resume: the listing is deterministic and every shard records its listing indices, so a re-run
encodes only the indices no complete shard holds (nothing duplicated, nothing missing).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from raygen.config import ConfigError, to_dict
from raygen.data import store as store_io
from raygen.data.encoders import EncoderConfig, describe_model
from raygen.data.sources import DEFAULT_MAX_PIXELS, EMBEDDED_KINDS, ItemReader, Listing, SourceConfig, list_source
from raygen.data.transforms import ItemError, TransformConfig, apply


class IngestError(RuntimeError):
    """on_error=fail met a bad item; the message names it."""


@dataclass
class StoreConfig:
    path: str | None = None  # default: <runs-root>/stores/<source>-<split>-<model>-<resolution>
    shard_size: int = 1024  # items per shard file
    dtype: Literal["float16", "float32"] = "float16"
    flip_copies: bool = False  # also store the encoding of the horizontally flipped image (`<array>_flip`)

    def validate(self):
        if self.shard_size < 1:
            raise ConfigError(f"store.shard_size must be >= 1, got {self.shard_size}")


@dataclass
class PipelineConfig:
    decode_actors: int = 0  # 0 = auto: the CPUs the encoders leave free (at least 1)
    decode_batch_size: int = 32
    cpus_per_decoder: float = 1.0
    on_error: Literal["skip", "fail"] = "skip"  # skip: listed in skipped.jsonl + counted; fail: stop naming the file
    # decode inside the encoder actors: None = auto (yes for CPU encoders, which compete with decoding
    # for the same cores; no for GPU encoders, which CPU decode actors must keep fed)
    fuse_decode: bool | None = None
    crash_after_shards: int = 0  # testing: raise after this many shards exist (0 = never)

    def validate(self):
        if self.decode_actors < 0 or self.decode_batch_size < 1:
            raise ConfigError("ingest.decode_actors must be >= 0 and ingest.decode_batch_size >= 1")


@dataclass
class IngestConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ingest: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass
class PixelStoreConfig:
    path: str | None = None  # default: <runs-root>/stores/<source>-<split>-pixels-<resolution>
    shard_size: int = 1024  # items per shard file
    # gray: one channel (the mean of R, G, B; exact for grayscale sources such as CT slices), [1,H,W]
    channels: Literal["rgb", "gray"] = "rgb"

    def validate(self):
        if self.shard_size < 1:
            raise ConfigError(f"store.shard_size must be >= 1, got {self.shard_size}")


@dataclass
class PixelIngestConfig:
    """`jobs/encode_pixels.py`: the latent ingest's source, transform and pipeline sections, no encoder.
    Items are stored as uint8 [C,H,W] RGB after the transform (crop, resize, optional augmentation)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    store: PixelStoreConfig = field(default_factory=PixelStoreConfig)
    ingest: PipelineConfig = field(default_factory=PipelineConfig)
    seed: int = 0  # random crops/flips of item i draw from (seed, i): identical on any re-run

    def validate(self):
        if self.transform.kind == "none":
            raise ConfigError("transform.kind=none keeps every image's size, but a pixel store holds one size; "
                              "use transform.kind=center_crop_adm (or resize_center_crop, random_resized_crop)")


def item_seed(cfg) -> int:
    """The seed of per-item augmentation draws: `encoder.seed` (latent/SigLIP ingest) or `seed` (pixels)."""
    return cfg.seed if isinstance(cfg, PixelIngestConfig) else cfg.encoder.seed


# ---------------------------------------------------------------- stages


class Decoder:
    """{index, key, label} -> {index, key, label, error, <model input>}: read the item, convert to
    RGB, crop (transform config), and prepare the encoder's input. A bad item becomes a row with
    `error` set and a zero placeholder (on_error=skip) or stops the pipeline naming the file."""

    def __init__(self, cfg: IngestConfig | PixelIngestConfig, listing_kind: str, info: dict, encoder_kind: str):
        self.cfg, self.kind = cfg, encoder_kind
        self.reader = ItemReader(listing_kind, info, cfg.source)
        self.processor = None
        if encoder_kind == "siglip":
            from raygen.data.encoders import load_processor

            self.processor = load_processor(cfg.encoder.model, cfg.encoder.subfolder)

    def _prepare(self, images: list[np.ndarray]) -> dict:
        if self.kind == "pixels":  # the store's array itself: uint8 [C,H,W], channel-first like the latents
            x = np.stack(images)
            if self.cfg.store.channels == "gray":
                x = x.mean(axis=-1, keepdims=True)
            u8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
            return {"image": np.ascontiguousarray(u8.transpose(0, 3, 1, 2))}
        if self.kind == "vae":  # VAE input: NCHW in [-1, 1]
            x = np.stack(images).transpose(0, 3, 1, 2) * 2.0 - 1.0
            return {"image": np.ascontiguousarray(x, dtype=np.float32)}
        # SigLIP: the checkpoint's own processor on 8-bit RGB, exactly what it was trained with
        u8 = [np.clip(np.rint(im * 255.0), 0, 255).astype(np.uint8) for im in images]
        return dict(self.processor(images=u8, return_tensors="np"))

    def __call__(self, batch: dict) -> dict:
        tcfg, seed = self.cfg.transform, item_seed(self.cfg)
        images, errors = [], []
        for index, key in zip(batch["index"], batch["key"]):
            try:
                img = self.reader.read(str(key))
                # augmentation randomness is per item (seed, index): identical on any re-run
                images.append(apply(tcfg, img, np.random.default_rng([seed, int(index)])))
                errors.append("")
            except ItemError as e:
                if self.cfg.ingest.on_error == "fail":
                    raise IngestError(f"{key}: {e} (set ingest.on_error=skip to skip and record such files)") from None
                images.append(None)
                errors.append(str(e))
        out = {"index": batch["index"], "key": batch["key"], "label": batch["label"],
               "error": np.array(errors, dtype=object)}
        good = [im for im in images if im is not None]
        blank = np.zeros_like(good[0]) if good else np.zeros((tcfg.resolution, tcfg.resolution, 3), np.float32)
        out.update(self._prepare([blank if im is None else im for im in images]))
        return out


class DecodeEncode:
    """Decoder and encoder in one actor (the CPU path): no idle decode reservation, no hand-off."""

    def __init__(self, cfg: IngestConfig, listing_kind: str, info: dict, encoder_kind: str):
        self.decode = Decoder(cfg, listing_kind, info, encoder_kind)
        cls, args = _encoder(cfg, encoder_kind)
        self.encode = cls(*args)

    def __call__(self, batch: dict) -> dict:
        return self.encode(self.decode(batch))


# ---------------------------------------------------------------- driver


def fingerprint(cfg: IngestConfig | PixelIngestConfig) -> str:
    """What determines the store's content (not its speed): a re-run must match it to resume."""
    d = to_dict(cfg)
    for k in ("batch_size", "actors", "gpus_per_actor", "cpus_per_actor", "channels_last"):
        d.get("encoder", {}).pop(k, None)
    d.pop("ingest")
    if d["source"].get("max_pixels") == DEFAULT_MAX_PIXELS:  # stores made before the key existed still resume
        d["source"].pop("max_pixels")
    if d["source"].get("per_class") == 100:  # likewise for stores made before source.per_class existed
        d["source"].pop("per_class")
    d["store"] = {k: d["store"][k] for k in ("dtype", "flip_copies") if k in d["store"]} | (
        {"channels": "gray"} if d["store"].get("channels") == "gray" else {})  # rgb stores made before still resume
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_store_path(cfg: IngestConfig | PixelIngestConfig, runs_root: str, encoder_kind: str) -> Path:
    src = cfg.source
    name = src.kind if src.kind in EMBEDDED_KINDS else Path(str(src.path).rstrip("/")).stem
    parts = [name, src.split, "pixels" if encoder_kind == "pixels" else describe_model(cfg.encoder.model),
             str(cfg.transform.resolution) if cfg.transform.kind != "none" else None]
    return Path(runs_root).expanduser().resolve() / "stores" / "-".join(p for p in parts if p)


def free_cpus() -> int:
    """The CPUs an ingest sizes its actor pools from when not told: those free now, not the cluster's
    total, so an ingest started next to a training run takes what training left (at least one) instead
    of asking for actors that could never be placed."""
    import ray

    return max(1, int(ray.available_resources().get("CPU", 0)))


def resolve_resources(cfg: IngestConfig) -> tuple[int, float, int, bool]:
    """(encoder actors, GPUs per encoder actor, decode actors, fused) for this cluster. GPUs: one
    encoder actor per GPU, fed by CPU decode actors. CPUs only: decode runs inside the encoder actors
    (fused), one actor per `encoder.cpus_per_actor` CPUs."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), free_cpus()
    e, p = cfg.encoder, cfg.ingest
    gpa = e.gpus_per_actor if e.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpa > gpus:
        raise ConfigError(f"encoder.gpus_per_actor={gpa:g} but the cluster has {gpus:g} GPUs; "
                          "set encoder.gpus_per_actor=0 to encode on CPUs")
    fused = p.fuse_decode if p.fuse_decode is not None else gpa == 0
    if fused:
        actors = e.actors or max(1, int(cpus // e.cpus_per_actor))
        return actors, gpa, 0, True
    actors = e.actors or (int(gpus // gpa) if gpa else max(1, cpus // 2))
    enc_cpus = actors * (e.cpus_per_actor if gpa == 0 else 1)
    if enc_cpus + p.cpus_per_decoder > cpus + 1e-9:
        raise ConfigError(f"{actors} encoder actors x {e.cpus_per_actor:g} CPUs leave no CPU for decoding on a "
                          f"cluster with {cpus} free CPUs; lower encoder.actors or encoder.cpus_per_actor")
    decoders = p.decode_actors or max(1, int((cpus - enc_cpus) // p.cpus_per_decoder))
    return actors, gpa, decoders, False


def run_ingest(cfg: IngestConfig | PixelIngestConfig, store_dir: Path,
               encoder_kind: Literal["vae", "siglip", "pixels"]) -> dict:
    """Encode (or, for pixels, only decode and crop) every listed item not yet in a shard, then write
    meta.json and skipped.jsonl."""
    import ray.data

    from raygen.core.progress import Progress

    store_dir = Path(store_dir)
    pixels = encoder_kind == "pixels"
    if cfg.transform.kind == "none" and encoder_kind in ("vae", "pixels"):
        what = "a pixel store holds one size" if pixels else "VAE batches need one size"
        raise ConfigError(f"transform.kind=none keeps every image's size, but {what}; "
                          "use transform.kind=center_crop_adm (or resize_center_crop, random_resized_crop)")
    # loads the model on the driver: a bad id fails here, clearly
    encoder_meta = _pixels_meta(cfg) if pixels else _encoder_meta(cfg, encoder_kind)
    listing = list_source(cfg.source, on_error=cfg.ingest.on_error)
    if len(listing.keys) == 0:
        raise ConfigError(f"source {cfg.source.path or cfg.source.kind!r} lists no items; check source.path and source.split")
    _check_resume(cfg, store_dir, listing)
    store_io.remove_temp_shards(store_dir)
    done = store_io.done_indices(store_dir)
    todo = np.setdiff1d(np.arange(len(listing.keys)), done)
    if pixels:
        actors, gpa, decoders, fused = 0, 0.0, resolve_decoders(cfg), False
        arrays = ["image"]
        layout = f"{decoders} decode actors writing uint8 [C,H,W] images"
    else:
        actors, gpa, decoders, fused = resolve_resources(cfg)
        arrays = {"vae": ["latent"] + (["latent_flip"] if cfg.store.flip_copies else []),
                  "siglip": ["pooled", "tokens"]}[encoder_kind]
        layout = (f"{actors} actors decoding + encoding on CPU" if fused else
                  f"{decoders} decode actors -> {actors} encoder actors" + (f" x {gpa:g} GPU" if gpa else " on CPU"))
    verb = "decode" if pixels else "encode"
    print(f"ingest: {len(listing.keys)} items listed, {len(done)} already in {store_dir}, {len(todo)} to {verb} "
          f"({layout})", file=sys.stderr, flush=True)
    if "max_num_patches" in encoder_meta.get("processor", {}):
        arrays.append("token_mask")  # SigLIP2 pads a variable number of patches: the mask says which are real
    t0 = time.perf_counter()
    if len(todo):
        keys = np.asarray(listing.keys, dtype=object)
        items = [{"index": int(i), "key": str(keys[i]), "label": int(listing.labels[i])} for i in todo]
        per_block = cfg.ingest.decode_batch_size if pixels else cfg.encoder.batch_size
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(todo) // per_block, 256)))
        stage_args = (cfg, listing.kind, listing.info, encoder_kind)
        if pixels:  # no encoder: the decode stage's output is what the shards hold
            ds = ds.map_batches(Decoder, fn_constructor_args=stage_args, batch_size=cfg.ingest.decode_batch_size,
                                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=decoders),
                                num_cpus=cfg.ingest.cpus_per_decoder)
        elif fused:
            ds = ds.map_batches(DecodeEncode, fn_constructor_args=stage_args, batch_size=cfg.encoder.batch_size,
                                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                num_cpus=cfg.encoder.cpus_per_actor)
        else:
            ds = ds.map_batches(Decoder, fn_constructor_args=stage_args, batch_size=cfg.ingest.decode_batch_size,
                                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=decoders),
                                num_cpus=cfg.ingest.cpus_per_decoder)
            enc_cls, enc_args = _encoder(cfg, encoder_kind)
            ds = ds.map_batches(enc_cls, fn_constructor_args=enc_args, batch_size=cfg.encoder.batch_size,
                                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                num_gpus=gpa, num_cpus=cfg.encoder.cpus_per_actor if gpa == 0 else 1)
        ds = ds.map_batches(store_io.write_rows, fn_kwargs={"store_dir": str(store_dir), "arrays": arrays,
                                                           "crash_after": cfg.ingest.crash_after_shards},
                            batch_size=cfg.store.shard_size, batch_format="numpy", num_cpus=0)
        bar = Progress(len(todo), 0, verb, unit="img")
        n = 0
        ctx = ray.data.DataContext.get_current()
        keep_order, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, False
        try:  # shards carry their indices, so arrival order does not matter here
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n += int(b["written"].sum() + b["skipped"].sum())
                bar.update(n, force=n == len(todo))
        finally:
            ctx.execution_options.preserve_order = keep_order
    kind = "pixels" if pixels else ("latents" if encoder_kind == "vae" else "siglip")
    return finalize(cfg, store_dir, listing, encoder_meta, arrays, seconds=time.perf_counter() - t0, kind=kind)


def resolve_decoders(cfg: PixelIngestConfig) -> int:
    """Decode actors of a pixel ingest: `ingest.decode_actors`, or every free CPU of the cluster (the shard
    writers take no CPU reservation)."""
    import ray

    cpus = free_cpus()
    p = cfg.ingest
    if p.cpus_per_decoder > cpus:
        raise ConfigError(f"ingest.cpus_per_decoder={p.cpus_per_decoder:g} but the cluster has {cpus} CPUs; lower it")
    return p.decode_actors or max(1, int(cpus // p.cpus_per_decoder))


def _encoder(cfg: IngestConfig, kind: str):
    from raygen.data.encoders import SigLIPEncoder, VAEEncoder

    if kind == "vae":
        return VAEEncoder, (cfg.encoder, cfg.store.flip_copies, cfg.store.dtype)
    return SigLIPEncoder, (cfg.encoder, cfg.store.dtype)


def _check_resume(cfg: IngestConfig, store_dir: Path, listing: Listing) -> None:
    """A store directory belongs to one config and one listing; a different one must not mix in (and
    must not overwrite the store's config.yaml)."""
    from raygen.core.files import atomic_write
    from raygen.config import dump_yaml

    fp = fingerprint(cfg)
    digest = hashlib.sha256("\n".join(f"{k}\t{lab}" for k, lab in zip(listing.keys, listing.labels)).encode()).hexdigest()
    stamp = store_dir / "ingest.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old["fingerprint"] != fp:
            raise ConfigError(f"{store_dir} holds a store made with a different config (source, transform, encoder "
                              f"or store.dtype/flip_copies differ); pass store.path=<new dir> or delete it")
        if old["listing_sha256"] != digest:
            raise ConfigError(f"{store_dir}: the source now lists {len(listing.keys)} items (files or labels changed "
                              f"since the store was started with {old['num_items']}); pass store.path=<new dir>")
    else:
        store_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(store_dir / store_io.LISTING) as f:
            np.savez(f, keys=np.asarray(listing.keys, dtype=str), labels=listing.labels)
        store_io.write_text(stamp, json.dumps({"fingerprint": fp, "num_items": len(listing.keys),
                                               "listing_sha256": digest}))
    dump_yaml(cfg, store_dir / "config.yaml")


def finalize(cfg, store_dir: Path, listing: Listing, encoder_meta: dict, arrays: list[str], seconds: float,
             kind: str | None = None) -> dict:
    """meta.json + skipped.jsonl from the shards (the source of truth) and the listing's problems."""
    skipped = listing.problems + store_io.collect_skipped(store_dir)
    store_io.write_skipped(store_dir, skipped)
    shards = store_io.shard_dirs(store_dir)
    stored = sum(len(np.load(d / "index.npy", mmap_mode="r")) for d in shards)
    shapes = {}
    for name in arrays:
        for d in shards:
            a = np.load(d / f"{name}.npy", mmap_mode="r")
            if len(a):
                shapes[name] = {"shape": list(a.shape[1:]), "dtype": str(a.dtype)}
                break
    reasons: dict[str, int] = {}
    for s in skipped:
        head = s["reason"].split(":")[0].split(" (")[0]
        reasons[head] = reasons.get(head, 0) + 1
    if kind is None:
        kind = "latents" if "scaling_factor" in encoder_meta else "siglip"
    meta = {
        "format": "raygen-store/1 (NPY shards)",
        "kind": kind,
        # a pixel store has no encoder: its `pixels` section says how the uint8 arrays map to model input
        ("pixels" if kind == "pixels" else "encoder"): encoder_meta,
        "source": {**to_dict(cfg.source), "resolved_kind": listing.kind, "info": listing.info},
        "preprocessing": to_dict(cfg.transform),
        "class_names": listing.class_names,
        "arrays": shapes,
        "counts": {"listed": len(listing.keys), "stored": stored, "skipped": len(skipped),
                   "listing_problems": len(listing.problems), "skipped_by_reason": reasons,
                   "shards": len(shards)},
        "seconds_last_run": round(seconds, 2),
    }
    store_io.write_meta(store_dir, meta)
    return meta


def _pixels_meta(cfg: PixelIngestConfig) -> dict:
    return {"layout": "CHW", "dtype": "uint8", "channels": "L" if cfg.store.channels == "gray" else "RGB",
            "value_range": [0, 255],
            "model_input": "image / 127.5 - 1 (float32 in [-1, 1])", "seed": cfg.seed}


def _encoder_meta(cfg, kind: str) -> dict:
    e = cfg.encoder
    out = {"model": e.model, "subfolder": e.subfolder, "store_dtype": cfg.store.dtype,
           "flip_copies": cfg.store.flip_copies}
    if kind == "vae":
        from raygen.data.encoders import load_vae, vae_factors

        vae = load_vae(e.model, e.subfolder)
        scale, shift = vae_factors(vae)
        out.update(library="diffusers.AutoencoderKL", scaling_factor=scale, shift_factor=shift,
                   posterior=e.posterior, seed=e.seed, input_range=[-1.0, 1.0],
                   formula="latent = (posterior_" + e.posterior + " - shift_factor) * scaling_factor",
                   latent_channels=vae.config.latent_channels,
                   downsample=2 ** (len(vae.config.block_out_channels) - 1))
    else:
        from raygen.data.encoders import load_processor, load_siglip, processor_summary

        out.update(library="transformers (Siglip/Siglip2 VisionModel)", processor=processor_summary(
            load_processor(e.model, e.subfolder)), vision_model=type(load_siglip(e.model, e.subfolder)).__name__,
            normalize_pooled=e.normalize_pooled,
            tokens="last_hidden_state (output of the last transformer block after the final LayerNorm)",
            pooled="pooler_output (attention-pooling head)" + (", L2-normalised" if e.normalize_pooled else ""))
    return out


def main(recipe: str, encoder_kind: Literal["vae", "siglip", "pixels"], argv=None) -> Path:
    """`jobs/encode_latents.py` / `jobs/encode_siglip.py` / `jobs/encode_pixels.py`: the store directory
    is the run directory, named by the source, split, model (or `pixels`) and resolution unless
    store.path is set, so the same command run again resumes the same store."""
    from raygen.core.job import fail, init_ray, interrupts, lock_run, parse_args, preset_dir, prepare_run_dir
    from raygen.config import load_config
    from raygen.data.tiny_models import resolve_model

    config_cls = PixelIngestConfig if encoder_kind == "pixels" else IngestConfig
    args = parse_args(recipe, config_cls, argv)
    try:
        cfg, _ = load_config(config_cls, preset=args.preset, preset_dir=preset_dir(recipe),
                             config_file=args.config, overrides=args.overrides)
        store_dir = Path(cfg.store.path).expanduser().resolve() if cfg.store.path else \
            default_store_path(cfg, args.runs_root, encoder_kind)
        if encoder_kind != "pixels":
            cfg.encoder.model = resolve_model(cfg.encoder.model)
        lock_run(store_dir.parent, f"store-{store_dir.name}", f"an ingest into {store_dir}")
        prepare_run_dir(store_dir)
        with interrupts(lambda: interrupted(recipe, argv, store_dir)):
            init_ray()
            meta = run_ingest(cfg, store_dir, encoder_kind)
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # a bad item under on_error=fail, or a full disk, arrives wrapped by Ray Data
        cause = _find(e, IngestError) or _find(e, store_io.StoreWriteError)
        if cause is None:
            raise
        fail(f"ingest stopped: {cause}\n  store: {store_dir}\n  finished shards are kept; the same command "
             "resumes after the file is fixed or removed", code=1)
    c = meta["counts"]
    print(f"stored {c['stored']} of {c['listed']} items in {c['shards']} shards; skipped {c['skipped']}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in c['skipped_by_reason'].items())}; see skipped.jsonl)"
             if c["skipped"] else ""))
    for name, a in meta["arrays"].items():
        print(f"  {name:<12} {a['shape']} {a['dtype']}")
    print(f"run_dir: {store_dir}", flush=True)
    return store_dir


def interrupted(job: str, argv, store_dir: Path) -> str:
    """The one line a Ctrl-C or SIGTERM ends an ingest with: the store, the finished shards, the command."""
    from raygen.core.job import resume_command

    shards = store_io.shard_dirs(store_dir) if store_dir.is_dir() else []
    items = len(store_io.done_indices(store_dir)) if shards else 0
    return (f"interrupted: {job} into {store_dir}; {len(shards)} finished shard(s) with {items} items are kept; "
            f"resume with the same command: {resume_command(job, argv)}")


def encode_latents(argv=None) -> Path:
    return main("encode_latents", "vae", argv)


def encode_siglip(argv=None) -> Path:
    return main("encode_siglip", "siglip", argv)


def encode_pixels(argv=None) -> Path:
    return main("encode_pixels", "pixels", argv)


def _find(e: BaseException, cls):
    """The `cls` exception behind a Ray Data failure: Ray wraps a UDF's exception in
    RayTaskError(UserCodeException) and may keep only its text; recover the one line either way."""
    seen, text = set(), str(e)
    while e is not None and id(e) not in seen:
        if isinstance(e, cls):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    marker = f"{cls.__name__}: "
    for line in text.splitlines():
        if marker in line:
            return cls(line.split(marker, 1)[1].strip())
    return None
