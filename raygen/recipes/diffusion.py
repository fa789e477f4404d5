"""What the U-Net diffusion recipes (EDM, Beta diffusion / SDD) share: the config sections (an EDM-family
U-Net, raygen.nets.unet; the optional raw-file `source` that is encoded once into a pixel store), the
checks, and the task that pairs a U-Net with a method. A recipe module (raygen.recipes.edm,
raygen.recipes.sdd) adds only its method: the `method` section, `method_cls` and its registry record.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from raygen.config import ConfigError
from raygen.core.contracts import NetSpec
from raygen.data import images as image_data
from raygen.data.ingest import PixelStoreConfig
from raygen.data.sources import SourceConfig
from raygen.eval.evaluate import EvalConfig
from raygen.recipes.common import ImageTask, RunSection
from raygen.train.config import DebugConfig, LogConfig, OptimConfig, TrainConfig

UNET_ARCHS = ("ddpmpp", "ncsnpp", "adm")


@dataclass
class RawSourceConfig(SourceConfig):
    """The `source` section: how the raw files of `data.source=files` are read (EDM dataset_tool zip, image
    folder, .npy/.nii volumes with `npy_axis` and one `intensity` window; the keys of jobs/encode_pixels.py's
    source section, docs/data.md). Unused by the other data sources."""

    kind: Literal["auto", "class_folders", "folder", "zip", "npy"] = "auto"

    def validate(self):
        if self.path is not None:
            super().validate()


@dataclass
class UNetConfig:
    """`arch` names EDM's configuration (ddpmpp / ncsnpp: SongUNet; adm: DhariwalUNet); every other key
    left null keeps that configuration's value (docs/methods/unet.md)."""

    arch: Literal["ddpmpp", "ncsnpp", "adm"] = "ddpmpp"
    model_channels: Optional[int] = None
    channel_mult: Optional[list[int]] = None
    num_blocks: Optional[int] = None
    attn_resolutions: Optional[list[int]] = None
    dropout: Optional[float] = None
    augment_dim: int = 0  # 9 with EDM's augmentation (method.augment_p > 0)

    def validate(self):
        if self.model_channels is not None and self.model_channels < 4:
            raise ConfigError(f"model.model_channels must be >= 4, got {self.model_channels}")
        if self.channel_mult is not None and (not self.channel_mult or min(self.channel_mult) < 1):
            raise ConfigError(f"model.channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.augment_dim not in (0, 9):
            raise ConfigError(f"model.augment_dim is 0 (no augmentation conditioning) or 9 (EDM's), got "
                              f"{self.augment_dim}")

    def overrides(self) -> dict:
        keys = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
        return {k: (tuple(v) if isinstance(v, list) else v) for k in keys if (v := getattr(self, k)) is not None}

    def levels(self) -> int:
        if self.channel_mult is not None:
            return len(self.channel_mult)
        return {"ddpmpp": 3, "ncsnpp": 3, "adm": 4}[self.arch]


@dataclass
class UNetRecipeConfig:
    """The sections of a U-Net recipe; a recipe's subclass gives `method` its type (it keeps its place)."""

    run: RunSection = field(default_factory=RunSection)
    data: image_data.ImageDataConfig = field(default_factory=image_data.ImageDataConfig)
    source: RawSourceConfig = field(default_factory=RawSourceConfig)  # how data.source=files is read
    store: PixelStoreConfig = field(default_factory=PixelStoreConfig)  # where data.source=files is encoded
    model: UNetConfig = field(default_factory=UNetConfig)
    method: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def check_unet_fits(model: UNetConfig, resolution: int, augment_p: float) -> None:
    """The checks that need the data: the U-Net halves the image levels-1 times, and augmentation needs its
    conditioning input."""
    down = 2 ** (model.levels() - 1)
    if resolution % down:
        raise ConfigError(f"data.resolution={resolution} is not divisible by 2^(levels-1)={down} of the U-Net "
                          f"(model.channel_mult has {model.levels()} levels); change model.channel_mult or the "
                          "resolution")
    if augment_p > 0 and model.augment_dim != 9:
        raise ConfigError(f"method.augment_p={augment_p} conditions the network on the augmentation: set "
                          "model.augment_dim=9 (or method.augment_p=0)")


def resolve_common(cfg):
    """The data, then the U-Net/data checks. `data.source=files`: the raw files are named by `data.path` or
    `source.path` (either; the other is set to match) and encoded later, by `prepare_pixel_store` in the
    run, at `data.resolution`. Other sources: a store's resolution and kind come from its files."""
    data, source = cfg.data, cfg.source
    if data.source == "files":
        raw = data.path or source.path
        if raw is None:
            raise ConfigError("data.source=files needs the raw files: data.path=<EDM zip, image folder or directory "
                              "of .npy/.nii volumes> (or source.path=...)")
        if data.path and source.path and Path(data.path).resolve() != Path(source.path).resolve():
            raise ConfigError(f"data.path={data.path!r} and source.path={source.path!r} differ; name the raw files once")
        source = dataclasses.replace(source, path=raw)
        source.validate()
        data = dataclasses.replace(data, path=raw)
    else:
        if source.path is not None:
            raise ConfigError(f"source.path={source.path!r} is read only with data.source=files (raw files encoded "
                              f"into a pixel store), not data.source={data.source}; set data.source=files or drop "
                              "source.path")
        data = image_data.resolve_data(data)
        if image_data.is_latent_store(data):
            raise ConfigError(f"data.path={data.path!r} is a latent store; the U-Net recipes train in pixel space: "
                              "give a pixel store (jobs/encode_pixels.py) or raw files with data.source=files")
    check_unet_fits(cfg.model, data.resolution, cfg.method.augment_p)
    return dataclasses.replace(cfg, data=data, source=source)


def prepare_pixel_store(cfg, runs_root: Path):
    """`data.source=files`: the raw files (an EDM dataset_tool zip, an image folder, .npy/.nii volumes)
    -> a pixel store at `data.resolution` under <runs-root>/stores (or `store.path`), made once and reused
    (the ingest resumes, and refuses a store made from other settings). Returns the config reading it."""
    if cfg.data.source != "files":
        return cfg
    from raygen.core.job import lock_run
    from raygen.data import ingest
    from raygen.data.transforms import TransformConfig

    source = SourceConfig(**{f.name: getattr(cfg.source, f.name) for f in dataclasses.fields(SourceConfig)})
    pix = ingest.PixelIngestConfig(source=source, store=cfg.store,
                                   transform=TransformConfig(kind="resize_center_crop", resolution=cfg.data.resolution,
                                                             allow_upscale=True))
    out = Path(cfg.store.path) if cfg.store.path else ingest.default_store_path(pix, str(runs_root), "pixels")
    if not (out / "meta.json").is_file():
        print(f"stage 1: {source.path} -> pixel store {out}", flush=True)
        lock_run(out.parent, f"store-{out.name}", f"an ingest into {out}")
        ingest.run_ingest(pix, out, "pixels")
    data = image_data.resolve_data(dataclasses.replace(cfg.data, source="store", path=str(out)))
    return dataclasses.replace(cfg, data=data)


class UNetTask(ImageTask):
    """An EDM-family U-Net (raygen.nets.unet) trained by a pixel-space diffusion method."""

    def net_spec(self) -> NetSpec:
        m = self.cfg.model
        c = self.sample_shape[0]
        return NetSpec("raygen.nets.unet:unet", {"arch": m.arch, "img_resolution": self.cfg.data.resolution,
                                                 "in_channels": c, "out_channels": c,
                                                 "num_classes": self.num_classes, "augment_dim": m.augment_dim,
                                                 **m.overrides()})
