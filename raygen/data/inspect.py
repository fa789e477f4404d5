"""`jobs/inspect_latents.py`: decode random latents of a store (or of the store a DiT run trained on)
back to pixels through the store's own VAE and save a PNG grid, optionally each next to its
original image read and cropped exactly as the ingest did."""
from __future__ import annotations


from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from raygen.config import ConfigError
from raygen.data.encoders import decode_latents


@dataclass
class InspectConfig:
    run_or_store: Optional[str] = None  # a store directory (meta.json) or a run whose config.yaml names one
    num: int = 64
    seed: int = 0
    originals: bool = True  # pair every decoded latent with its source image
    array: str = "latent"  # or latent_flip
    out: Optional[str] = None  # default: <store>/inspect/latents_<num>.png

    def validate(self):
        if not self.run_or_store:
            raise ConfigError("run_or_store=<store dir or run dir> is required")
        if self.num < 1:
            raise ConfigError(f"num must be >= 1, got {self.num}")


def find_store(path: str) -> Path:
    p = Path(path).expanduser().resolve()
    if (p / "meta.json").is_file():
        return p
    cfg = p / "config.yaml"
    if cfg.is_file():
        import yaml

        data = (yaml.safe_load(cfg.read_text()) or {}).get("data", {})
        if data.get("source") in ("latents", "store") and data.get("path"):
            return find_store(data["path"])
    raise ConfigError(f"run_or_store={path!r} is neither a store (no meta.json) nor a run trained on a latent store")


def original_images(store, positions) -> torch.Tensor:
    """The source images of store positions, cropped as the ingest cropped them (augmentations
    re-drawn with the same per-item seed), in [-1, 1]."""
    from raygen.config import from_dict
    from raygen.data.sources import ItemReader, SourceConfig
    from raygen.data.transforms import TransformConfig, apply

    meta = store.meta
    src = from_dict(SourceConfig, {k: v for k, v in meta["source"].items() if k not in ("resolved_kind", "info")})
    tcfg = from_dict(TransformConfig, meta["preprocessing"])
    reader = ItemReader(meta["source"]["resolved_kind"], meta["source"]["info"], src)
    seed = meta["encoder"].get("seed", 0)
    imgs = []
    for key, index in zip(store.keys(positions), store.listing_index[positions]):
        imgs.append(apply(tcfg, reader.read(str(key)), np.random.default_rng([seed, int(index)])))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) * 2 - 1


def inspect(cfg: InspectConfig) -> Path:
    from raygen.data.store import Store
    from raygen.core.grid import save_grid

    store = Store(find_store(cfg.run_or_store))
    if store.meta["kind"] != "latents":
        raise ConfigError(f"{store.path} holds {store.meta['kind']} embeddings, not VAE latents; nothing to decode")
    rng = np.random.default_rng(cfg.seed)
    pos = np.sort(rng.choice(len(store), size=min(cfg.num, len(store)), replace=False))
    decoded = decode_latents(store.meta, store.array(cfg.array)[pos])
    if cfg.originals:
        orig = original_images(store, pos)
        if cfg.array.endswith("_flip"):
            orig = orig.flip(-1)
        # pairs side by side: original, decoded, original, decoded, ...
        grid = torch.stack([orig, decoded], 1).flatten(0, 1)
        nrow = 2 * int(np.ceil(np.sqrt(len(pos))))
        mse = float(((orig - decoded) ** 2).mean())
    else:
        grid, nrow, mse = decoded, int(np.ceil(np.sqrt(len(pos)))), None
    out = Path(cfg.out) if cfg.out else store.path / "inspect" / f"{cfg.array}_{len(pos)}.png"
    save_grid(grid, out, nrow=nrow, upscale=max(1, 64 // decoded.shape[-1]))
    if mse is not None:
        print(f"decoded vs original: mse {mse:.4f} over {len(pos)} images (pixels in [-1, 1])")
    return out


def main(argv=None) -> Path:
    import argparse

    from raygen.core.job import fail
    from raygen.config import all_keys, load_config

    p = argparse.ArgumentParser(prog="jobs/inspect_latents.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="keys: " + ", ".join(all_keys(InspectConfig)))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        cfg, _ = load_config(InspectConfig, preset=None, preset_dir=Path(__file__).parent, overrides=args.overrides)
        out = inspect(cfg)
    except ConfigError as e:
        fail(str(e))
    except ValueError as e:  # StoreError: not finished, inconsistent
        fail(str(e))
    print(f"grid: {out}", flush=True)
    return out
