"""Frozen encoders as callable classes for `Dataset.map_batches` on an actor pool: each actor loads
its model once (hub id or local path, through the model's own library) and encodes batches.

Every batch carries an `error` column: rows that failed to decode ("" = fine) pass through with
zeros and are not encoded, so skipped items reach the writer and are recorded, never dropped.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from raygen.config import ConfigError


@dataclass
class EncoderConfig:
    # hub id (stabilityai/sd-vae-ft-ema, google/siglip2-base-patch16-224) or a local directory
    model: str = "stabilityai/sd-vae-ft-ema"
    subfolder: Optional[str] = None  # e.g. "vae" for a full Stable Diffusion repo
    posterior: Literal["mean", "sample"] = "sample"  # VAE: posterior mean, or one draw (seeded per image)
    normalize_pooled: bool = True  # SigLIP: L2-normalise the pooled vector (as SigLIP's own contrastive head does)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    batch_size: int = 64  # images per encoder call
    actors: int = 0  # encoder actors (one model copy each); 0 = auto: one per GPU, else half the CPUs
    gpus_per_actor: Optional[float] = None  # None = auto: 1 when the cluster has GPUs, else 0 (CPU actors)
    cpus_per_actor: float = 1.0  # also the torch thread count of a CPU actor
    # VAE convolutions in channels-last layout: None = auto (on GPU). On CPU it encodes 1.4x faster but
    # oneDNN's kernels then differ from float64 by ~6e-4 (vs 6e-7 contiguous) on flat images: opt in
    channels_last: Optional[bool] = None
    seed: int = 0  # posterior samples: image i uses seed (seed, i) -> same latents on every re-run

    def validate(self):
        if self.batch_size < 1 or self.actors < 0:
            raise ConfigError("encoder.batch_size must be >= 1 and encoder.actors >= 0 (0 = auto)")
        if (self.gpus_per_actor or 0) < 0 or self.cpus_per_actor <= 0:
            raise ConfigError("encoder.gpus_per_actor must be >= 0 and encoder.cpus_per_actor > 0")


PASSTHROUGH = ("index", "label", "key", "error")


def passthrough(batch: dict) -> dict:
    """The bookkeeping columns every stage carries to the writer."""
    return {k: batch[k] for k in PASSTHROUGH if k in batch}


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _device(gpus) -> torch.device:
    return torch.device("cuda") if (gpus or 0) > 0 and torch.cuda.is_available() else torch.device("cpu")


def _set_threads(cfg: EncoderConfig, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))


def load_vae(model: str, subfolder: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """An `AutoencoderKL` from a hub id or a local path; a clear error names the key otherwise."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(model, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"encoder.model={model!r}: cannot load an AutoencoderKL ({str(e).splitlines()[0]}); "
                          "give a hub id like stabilityai/sd-vae-ft-ema or a directory made by save_pretrained") from None


@functools.lru_cache(maxsize=2)
def _vae(model: str, subfolder: Optional[str], device: str):
    return load_vae(model, subfolder).to(device).eval().requires_grad_(False)


def decode_latents(meta: dict, latents, batch: int = 64) -> torch.Tensor:
    """Latents of a store -> images in [-1, 1] on the latents' device, inverting the store's own
    (shift, scale): x = D(z / scaling_factor + shift_factor)."""
    enc = meta["encoder"]
    z_all = torch.as_tensor(np.asarray(latents, np.float32)) if not torch.is_tensor(latents) else latents.float()
    vae = _vae(enc["model"], enc.get("subfolder"), str(z_all.device))
    out = []
    with torch.inference_mode():
        for i in range(0, len(z_all), batch):
            z = z_all[i:i + batch]
            out.append(vae.decode(z / enc["scaling_factor"] + enc["shift_factor"]).sample.clamp(-1, 1))
    return torch.cat(out)


def vae_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's own config: z = (mean_or_sample - shift) * scale."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def _sample_noise(indices: np.ndarray, shape, seed: int) -> torch.Tensor:
    """Per-image noise seeded by (seed, listing index): a re-run or a different batching gives the
    same latents."""
    out = torch.empty((len(indices), *shape))
    for row, i in enumerate(indices):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
        out[row] = torch.randn(shape, generator=g)
    return out


class VAEEncoder:
    """Batch {index, image: float32 [N,3,H,W] in [-1,1], error} -> {index, latent[, latent_flip], error}.

    `latent = (posterior_mean_or_sample - shift) * scaling_factor`, with the factors read from the VAE's
    config (0.18215 for SD 1.x/2.x VAEs). With `flip_copies` the horizontally flipped image is encoded
    too (`latent_flip`), as the drifting release caches both and picks one per load.
    """

    def __init__(self, cfg: EncoderConfig, flip_copies: bool = False, store_dtype: str = "float16"):
        self.cfg, self.flip, self.store_dtype = cfg, flip_copies, np.dtype(store_dtype)
        self.device = _device(cfg.gpus_per_actor)
        _set_threads(cfg, self.device)
        self.dtype = torch_dtype(cfg.dtype, self.device)
        cl = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self.layout = torch.channels_last if cl else torch.contiguous_format
        self.vae = load_vae(cfg.model, cfg.subfolder, self.dtype).to(self.device, memory_format=self.layout)
        self.vae.eval().requires_grad_(False)
        self.scale, self.shift = vae_factors(self.vae)

    @torch.inference_mode()
    def _encode(self, x: torch.Tensor, indices: np.ndarray, salt: int) -> np.ndarray:
        post = self.vae.encode(x.to(self.device, self.dtype, memory_format=self.layout)).latent_dist
        z = post.mean.float()
        if self.cfg.posterior == "sample":
            noise = _sample_noise(indices, z.shape[1:], self.cfg.seed + salt).to(self.device)
            z = z + post.std.float() * noise
        return ((z - self.shift) * self.scale).contiguous().cpu().numpy().astype(self.store_dtype)

    def __call__(self, batch: dict) -> dict:
        # failed rows hold zeros from the decoder: encoding them too keeps one code path; they are
        # zeroed here and recorded as skipped by the writer
        failed = batch["error"] != ""
        x = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        out = passthrough(batch)
        out["latent"] = self._encode(x, batch["index"], salt=0)
        if self.flip:
            out["latent_flip"] = self._encode(x.flip(-1), batch["index"], salt=1)
        for name in ("latent", "latent_flip") if self.flip else ("latent",):
            out[name][failed] = 0
        return out


def load_siglip(model: str, subfolder: Optional[str] = None):
    """The vision tower of a SigLIP or SigLIP2 checkpoint (a full two-tower repo or a vision-only one)."""
    from transformers import AutoConfig

    try:
        kind = AutoConfig.from_pretrained(model, subfolder=subfolder or "").model_type
    except (OSError, ValueError) as e:
        raise ConfigError(f"encoder.model={model!r}: cannot read a transformers config ({str(e).splitlines()[0]})") from None
    if kind.startswith("siglip2"):
        from transformers import Siglip2VisionModel as cls
    elif kind.startswith("siglip"):
        from transformers import SiglipVisionModel as cls
    else:
        raise ConfigError(f"encoder.model={model!r} is a {kind!r} model; encode_siglip needs a SigLIP or SigLIP2 checkpoint")
    return cls.from_pretrained(model, subfolder=subfolder or "")


def load_processor(model: str, subfolder: Optional[str] = None):
    """The checkpoint's own image processor (resize, rescale, normalise; SigLIP2 also patchifies)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model, subfolder=subfolder or "")
    except (OSError, ValueError) as e:
        raise ConfigError(f"encoder.model={model!r}: no image processor config next to the model "
                          f"({str(e).splitlines()[0]}); save one with processor.save_pretrained") from None


def processor_summary(proc) -> dict:
    """What the processor does to pixels, for meta.json (the FSDiT seed fed [0,1] in one path and
    [-1,1] in another; recording it makes such a mismatch visible)."""
    keys = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "patch_size", "max_num_patches", "do_convert_rgb")
    out = {"class": type(proc).__name__}
    for k in keys:
        v = getattr(proc, k, None)
        if v is None:
            continue
        if isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, int) and hasattr(v, "name"):  # PIL's Resampling enum -> "BICUBIC"
            v = v.name
        elif not isinstance(v, (int, float, bool, str, list)):  # e.g. transformers' SizeDict
            v = {a: b for a, b in vars(v).items() if b is not None} if hasattr(v, "__dict__") else str(v)
        out[k] = v
    if out.get("do_rescale") and out.get("do_normalize"):
        lo = [(0 - m) / s for m, s in zip(out["image_mean"], out["image_std"])]
        hi = [(out["rescale_factor"] * 255 - m) / s for m, s in zip(out["image_mean"], out["image_std"])]
        out["pixel_range"] = [min(lo), max(hi)]
    return out


class SigLIPEncoder:
    """Batch {index, processor outputs (pixel_values[, pixel_attention_mask, spatial_shapes]), error}
    -> {index, pooled [N,D], tokens [N,T,D][, token_mask [N,T]], error}.

    `tokens` is `last_hidden_state`: the output of the last transformer block after the final
    LayerNorm (big_vision's `img/encoded`), not the patch embeddings the FSDiT seed stored by mistake.
    `pooled` is the attention-pooled head output, L2-normalised unless normalize_pooled=false.
    """

    inputs = ("pixel_values", "pixel_attention_mask", "spatial_shapes")

    def __init__(self, cfg: EncoderConfig, store_dtype: str = "float16"):
        self.cfg, self.store_dtype = cfg, np.dtype(store_dtype)
        self.device = _device(cfg.gpus_per_actor)
        _set_threads(cfg, self.device)
        self.dtype = torch_dtype(cfg.dtype, self.device)
        self.model = load_siglip(cfg.model, cfg.subfolder).to(self.device, self.dtype).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        failed = batch["error"] != ""
        kw = {k: torch.from_numpy(np.ascontiguousarray(batch[k])).to(self.device) for k in self.inputs if k in batch}
        kw["pixel_values"] = kw["pixel_values"].to(self.dtype)
        o = self.model(**kw)
        pooled = o.pooler_output.float()
        if self.cfg.normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out = {**passthrough(batch),
               "pooled": pooled.cpu().numpy().astype(self.store_dtype),
               "tokens": o.last_hidden_state.float().cpu().numpy().astype(self.store_dtype)}
        if "pixel_attention_mask" in kw:
            out["token_mask"] = batch["pixel_attention_mask"].astype(bool)
        for name in out:
            if name not in PASSTHROUGH:
                out[name][failed] = 0
        return out


def describe_model(model: str) -> str:
    """A short name for directory defaults: a hub id's last part or a local directory's name."""
    return Path(model.rstrip("/")).name or "model"
