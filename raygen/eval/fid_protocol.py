"""EDM's FID protocol (Karras et al., arXiv 2206.00364, Sec. 5 and its `fid.py`) as `jobs/fid.py`:

    python jobs/fid.py ref  --data <zip|folder|store|npz> --dest stats.npz
    python jobs/fid.py calc --images <folder|npz> --ref stats.npz [--num 50000] [--seeds 3] [--allow-small]

Features are 2048-d Inception-v3 pool features (the NVlabs TorchScript export, `raygen.eval.fid`) or, offline,
the shipped digits classifier's. The statistics of a set are its feature count, sum and sum of outer products
accumulated in float64 (they add across batches and workers exactly), giving the mean and the unbiased
(n - 1) covariance; `ref` writes them as an npz with EDM's keys `mu` and `sigma`. `calc` orders the images by
seed (their file names), splits them into `--seeds` consecutive ranges of `--num` images (the paper's seeds
0-49999, 50000-99999, 100000-149999), scores every range against the reference and reports the minimum.
docs/generate-and-fid.md has the protocol, the file layouts and how to compare with EDM's reference files.
"""
from __future__ import annotations

import abc
import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from raygen.config import ConfigError

DEFAULT_NUM = 50_000  # images per FID (EDM's fid.py refuses fewer)
DIGITS_RESOLUTIONS = (16, 32)  # resolutions the shipped digits classifier has weights for
INCEPTION_INPUTS = ("edm", "clean")


# ------------------------------------------------------------------------------------------- seeds


def parse_seeds(spec) -> list[int]:
    """EDM's seed lists: `0-49999`, `0,5,10-20` (ranges inclusive), in the order given. Seeds are
    non-negative and each appears once; anything else is a ConfigError naming the bad part."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"seeds={spec!r}: write seeds as EDM does, e.g. seeds=0-49999 or seeds=0,5,10-20")
    seeds: list[int] = []
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ConfigError(f"seeds={spec!r}: {part!r} is neither a seed nor a range a-b of non-negative integers")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise ConfigError(f"seeds={spec!r}: the range {part} ends before it starts; write it as {hi}-{lo}")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        dup = next(s for i, s in enumerate(seeds) if s in seeds[:i])  # only reached on a bad spec
        raise ConfigError(f"seeds={spec!r} lists seed {dup} more than once; every seed is one image")
    return seeds


def seeds_text(seeds: Sequence[int]) -> str:
    """The shortest EDM-style spelling of a seed list, keeping its order (`0-49999`, `3,7-9`)."""
    parts, i = [], 0
    seeds = [int(s) for s in seeds]
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def seed_ranges(count: int, ranges: int, num: int, allow_small: bool) -> list[range]:
    """Positions (in seed order) of the `ranges` consecutive sets of `num` images FID is computed on.

    Fewer than ranges * num images is an error unless `allow_small`; then the images are split into
    `ranges` equal consecutive sets of count // ranges (the remainder is left out). Extra images beyond
    ranges * num are left out (the protocol scores the first seeds)."""
    if ranges < 1 or num < 2:
        raise ConfigError(f"--seeds must be >= 1 and --num >= 2 (a covariance needs two images), got --seeds "
                          f"{ranges} --num {num}")
    need = ranges * num
    if count < need:
        if not allow_small:
            raise ConfigError(f"found {count} images, but --num {num} x --seeds {ranges} needs {need} (EDM's "
                              f"protocol scores {DEFAULT_NUM} images per seed range); generate more, lower --num, or "
                              f"pass --allow-small to split the {count} images into {ranges} equal range(s)")
        num = count // ranges
        if num < 2:
            raise ConfigError(f"{count} images cannot be split into --seeds {ranges} ranges of >= 2 images")
    return [range(k * num, (k + 1) * num) for k in range(ranges)]


# ------------------------------------------------------------------------------------ statistics


@dataclass
class Moments:
    """Running float64 sums of a feature set: count, sum and sum of outer products. They add across batches
    and workers exactly (EDM's fid.py all-reduces the same three), and give the mean and the unbiased
    covariance (sum f f^T - n mu mu^T) / (n - 1)."""

    n: int
    total: np.ndarray  # [d]
    outer: np.ndarray  # [d, d]

    @classmethod
    def zeros(cls, dim: int) -> "Moments":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        self.n += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.total + other.total, self.outer + other.outer)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


# ------------------------------------------------------------------------------------ image sets


def as_hwc(img: Image.Image) -> np.ndarray:
    """A decoded image as uint8 [H, W, C] with C = 1 (grayscale) or 3 (RGB), as EDM's loader sees it."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
    a = np.asarray(img, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def seed_of(key: str) -> Optional[int]:
    """The seed a generated image's file name holds (`000123.png` -> 123), else None."""
    stem = Path(key).stem
    return int(stem) if stem.isdigit() else None


class ImageSet(abc.ABC):
    """Images by position, in seed order when every name holds a seed (`seeds`), else in key order.
    Picklable, so a Ray task can read its own positions."""

    path: str
    keys: list[str]
    seeds: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.keys)

    @abc.abstractmethod
    def read(self, positions: Sequence[int]) -> np.ndarray:
        """uint8 [n, H, W, C] of these positions."""

    def order_by_seed(self) -> None:
        seeds = [seed_of(k) for k in self.keys]
        if self.keys and all(s is not None for s in seeds):
            order = np.argsort(np.asarray(seeds, np.int64), kind="stable")
            self.keys = [self.keys[i] for i in order]
            self.seeds = np.asarray(seeds, np.int64)[order]
            repeated = self.seeds[1:][np.diff(self.seeds) == 0]
            if len(repeated):
                raise ConfigError(f"{self.path}: seed {repeated[0]} is there twice (two files with its name); "
                                  "remove one")
        else:
            self.seeds = None


class FileImages(ImageSet):
    """An image folder (any tree, an EDM dataset folder, generate.py's <seed//1000>/<seed>.png) or an EDM
    dataset_tool zip, listed and decoded by raygen.data.sources."""

    def __init__(self, path: Path):
        from raygen.data.sources import IMAGE_EXTENSIONS, ItemReader, SourceConfig, list_source

        self.path = str(path)
        cfg = SourceConfig(kind="auto", path=str(path), labels="none")
        listing = list_source(cfg)
        if listing.kind not in ("folder", "class_folders", "zip"):
            raise ConfigError(f"{path} holds {listing.kind} arrays, not images; give an image folder, an EDM zip, a "
                              "pixel store or an .npz of samples")
        self.keys = [k for k in listing.keys if Path(k).suffix.lower() in IMAGE_EXTENSIONS]
        if not self.keys:
            raise ConfigError(f"{path} holds no image files")
        self.reader = ItemReader(listing.kind, listing.info, cfg)
        self.order_by_seed()

    def read(self, positions) -> np.ndarray:
        return stack_images([as_hwc(self.reader.read(self.keys[int(p)])) for p in positions],
                            [self.keys[int(p)] for p in positions], self.path)


class StoreImages(ImageSet):
    """A pixel store (jobs/encode_pixels.py): its uint8 [C, H, W] `image` array in listing order."""

    def __init__(self, path: Path):
        self.path = str(path)
        store = self.store()
        if store.meta.get("kind") != "pixels":
            raise ConfigError(f"{path} is a store of {store.meta.get('kind')}, not pixels; give a pixel store "
                              "(jobs/encode_pixels.py) or the images themselves")
        self.keys = [str(k) for k in store.keys()]
        self.seeds = None

    def store(self):
        from raygen.data.store import Store

        if getattr(self, "_store", None) is None:
            self._store = Store(self.path)
        return self._store

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_store"}

    def read(self, positions) -> np.ndarray:
        images = self.store().array("image")[np.asarray(positions, np.int64)]
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


class NpzImages(ImageSet):
    """An npz of samples (generate.py's `samples.npz`: `images` uint8 [N, H, W, C], `seeds`), in seed order."""

    def __init__(self, path: Path):
        self.path = str(path)
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ConfigError(f"{path} has no 'images' array (uint8 [N, H, W, C]); it has {', '.join(z.files)}")
            images = z["images"]
            seeds = z["seeds"].astype(np.int64) if "seeds" in z.files else None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(f"{path}: 'images' must be uint8 [N, H, W, C] with C = 1 or 3, got {images.dtype} "
                              f"{list(images.shape)}")
        self._images = images  # dropped when pickled for a Ray task, which reads the file itself
        order = np.argsort(seeds, kind="stable") if seeds is not None else np.arange(len(images))
        self.order = order
        self.seeds = seeds[order] if seeds is not None else None
        self.keys = [f"#{i}" for i in order]
        if self.seeds is not None and np.any(np.diff(self.seeds) == 0):
            raise ConfigError(f"{path}: seed {self.seeds[1:][np.diff(self.seeds) == 0][0]} appears twice")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_images"} | {"_images": None}

    def read(self, positions) -> np.ndarray:
        if self._images is None:
            with np.load(self.path, allow_pickle=False) as z:
                self._images = z["images"]
        return self._images[self.order[np.asarray(positions, np.int64)]]


def stack_images(images: list[np.ndarray], keys: list[str], where: str) -> np.ndarray:
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        first = images[0].shape
        bad = next(k for k, a in zip(keys, images) if a.shape != first)
        raise ConfigError(f"{where}: images differ in size or channels ({keys[0]}: {list(first)}, {bad}: "
                          f"{list(next(a.shape for a in images if a.shape != first))}); FID compares one image size")
    return np.stack(images)


def open_images(path) -> ImageSet:
    """An image folder, an EDM dataset zip, a pixel store (a directory with meta.json) or an npz of samples."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{path} does not exist; give an image folder, an EDM zip, a pixel store or an .npz")
    if p.is_dir() and (p / "meta.json").is_file():
        return StoreImages(p)
    if p.is_file() and p.suffix.lower() == ".npz":
        return NpzImages(p)
    return FileImages(p)


# ---------------------------------------------------------------------------------- feature spaces


class FeatureSpace(abc.ABC):
    """uint8 images [N, H, W, C] -> float64 features [N, dim]; `name` is recorded with every statistic."""

    name: str
    dim: int

    @abc.abstractmethod
    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def grayscale(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 1|3] -> [N, H, W, 1]; RGB through PIL's ITU-R 601 luma ("L"), the usual conversion."""
    if images.shape[-1] == 1:
        return images
    return np.stack([np.asarray(Image.fromarray(im).convert("L"))[..., None] for im in images])


def nchw(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [N, C, H, W], copied to canonical strides (numpy and torch count a view with C = 1 as
    contiguous and would keep its channels-last strides)."""
    return np.array(images.transpose(0, 3, 1, 2), order="C", copy=True)


class DigitsFeatures(FeatureSpace):
    """The shipped digits classifier's 128-d penultimate features (raygen.eval.digits_classifier): the offline
    feature space, for 16x16 or 32x32 grayscale (or RGB, converted) images."""

    def __init__(self, resolution: int):
        from raygen.eval.digits_classifier import DigitsClassifier

        if resolution not in DIGITS_RESOLUTIONS:
            raise ConfigError(f"the digits feature space takes {' or '.join(f'{r}x{r}' for r in DIGITS_RESOLUTIONS)} "
                              f"images, these are {resolution}x{resolution}; score them with --features inception "
                              "--inception-weights <path or URL of inception-2015-12-05.pt>")
        self.resolution = resolution
        self.net = DigitsClassifier(resolution)
        self.dim = self.net.dim
        self.name = f"digits-r{resolution}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1:3] != (self.resolution, self.resolution):
            raise ConfigError(f"the digits feature space was set up for {self.resolution}x{self.resolution} images, "
                              f"got {images.shape[1]}x{images.shape[2]}")
        # NCHW strides, as the evaluator's batches: a permuted NHWC view with C = 1 also reads as channels-last
        # (torch's `contiguous()` keeps it), which takes another conv kernel with other float32 rounding (~1e-5)
        x = torch.from_numpy(nchw(grayscale(images))).float().div(127.5).sub(1)
        return np.asarray(self.net(x), np.float64)


class InceptionFeatures(FeatureSpace):
    """Inception-v3 pool features of the NVlabs TorchScript export (raygen.eval.fid.InceptionExtractor loads it).

    `edm`: uint8 images at their own size, grayscale repeated to RGB, fed to the network as EDM's fid.py
    (and StyleGAN's metrics) feed it; the network resizes to 299 itself. This is how EDM's published
    reference statistics were made, so only this input is comparable with them.
    `clean`: clean-fid's PIL-bicubic resize in float (raygen's in-training evaluator, docs/evaluation.md)."""

    def __init__(self, weights: str, inception_input: str = "edm", device: str | torch.device = "cpu"):
        from raygen.eval.fid import InceptionExtractor

        if inception_input not in INCEPTION_INPUTS:
            raise ConfigError(f"--inception-input must be one of {', '.join(INCEPTION_INPUTS)}, got "
                              f"{inception_input!r}")
        try:
            self.extractor = InceptionExtractor(weights, device=device)
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(str(e)) from None
        self.input = inception_input
        self.dim = self.extractor.dim
        self.name = f"inception-v3-{inception_input}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(nchw(images))  # uint8 NCHW, as EDM's loader gives them
        if self.input == "clean":
            return np.asarray(self.extractor(x.float().div(127.5).sub(1)), np.float64)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out = self.extractor.model(x.to(self.extractor.device), return_features=True)
        return out.reshape(len(x), -1).to(torch.float64).cpu().numpy()


@dataclass(frozen=True)
class FeatureSpec:
    """Which feature space, as plain values: a Ray task builds its own from this."""

    kind: str  # digits | inception
    resolution: int = 0
    weights: Optional[str] = None
    inception_input: str = "edm"

    def build(self, device=None) -> FeatureSpace:
        if self.kind == "digits":
            return DigitsFeatures(self.resolution)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return InceptionFeatures(self.weights, self.inception_input, device)


def feature_spec(kind: Optional[str], weights: Optional[str], inception_input: str, image_shape) -> FeatureSpec:
    """--features left unset: Inception when weights are given, else the offline digits space."""
    kind = kind or ("inception" if weights else "digits")
    if kind == "inception" and not weights:
        raise ConfigError("--features inception needs --inception-weights <path or URL of inception-2015-12-05.pt> "
                          f"(download it from {inception_url()})")
    if kind == "digits":
        h, w, c = image_shape
        if h != w or h not in DIGITS_RESOLUTIONS:
            raise ConfigError(f"the digits feature space (the offline default) takes 16x16 or 32x32 images, these are "
                              f"{h}x{w}; pass --features inception --inception-weights <path or URL of "
                              "inception-2015-12-05.pt>")
        return FeatureSpec("digits", resolution=h)
    return FeatureSpec("inception", weights=str(weights), inception_input=inception_input)


def inception_url() -> str:
    from raygen.eval.fid import INCEPTION_PT_URL

    return INCEPTION_PT_URL


# ------------------------------------------------------------------------------------ accumulation


def accumulate(images: ImageSet, positions: Sequence[int], features: FeatureSpace, batch: int,
               progress=None) -> Moments:
    """Moments of the features of `images` at `positions`, `batch` images at a time."""
    m = Moments.zeros(features.dim)
    positions = list(positions)
    for i in range(0, len(positions), batch):
        m.add(features(images.read(positions[i:i + batch])))
        if progress is not None:
            progress(len(positions[i:i + batch]))
    return m


def accumulate_remote(images: ImageSet, positions: list[int], spec: FeatureSpec, batch: int, threads: int) -> Moments:
    """One Ray task's share: builds the feature space in the worker, returns its moments."""
    if threads:
        torch.set_num_threads(threads)
    return accumulate(images, positions, spec.build(), batch)


def range_moments(images: ImageSet, ranges: list[range], spec: FeatureSpec, batch: int, workers: int) -> list[Moments]:
    """Moments of every range. One worker: in this process, with a progress line every 10 s. More: Ray
    tasks (one GPU each on a GPU cluster, else an equal share of the free CPUs) over equal chunks of every
    range, whose moments add up per range."""
    from raygen.core.progress import Progress

    total = sum(len(r) for r in ranges)
    if workers <= 1:
        features = spec.build()
        bar = Progress(total, 0, f"features ({features.name})", unit="img")
        done = [0]

        def tick(n):
            done[0] += n
            bar.update(done[0], force=done[0] == total)

        return [accumulate(images, r, features, batch, tick) for r in ranges]

    import ray

    from raygen.core.job import init_ray

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    if gpus:
        task = ray.remote(num_gpus=1, num_cpus=1)(accumulate_remote)
        threads = 0
    else:
        threads = max(1, cpus // workers)
        task = ray.remote(num_cpus=threads)(accumulate_remote)
    shared = ray.put(images)  # one copy of the listing for every task
    pending = {}
    for k, r in enumerate(ranges):
        step = math.ceil(len(r) / workers)
        for i in range(0, len(r), step):
            chunk = list(r[i:i + step])
            pending[task.remote(shared, chunk, spec, batch, threads)] = (k, len(chunk))
    bar = Progress(total, 0, f"features ({spec_name(spec)}, {workers} workers)", unit="img")
    out: list = [None] * len(ranges)
    done = 0
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        k, n = pending.pop(ref)
        m = ray.get(ref)
        out[k] = m if out[k] is None else out[k] + m
        done += n
        bar.update(done, force=not pending)
    return out


# ------------------------------------------------------------------------------------ the two commands


def reference(data: str, dest: str, features: Optional[str], weights: Optional[str], inception_input: str,
              batch: int, workers: int) -> dict:
    """`ref`: the statistics of every image of `data`, written to `dest` (mu, sigma + metadata)."""
    from raygen.eval.fid import save_stats

    images = open_images(data)
    shape = images.read([0]).shape[1:]
    spec = feature_spec(features, weights, inception_input, shape)
    (m,) = range_moments(images, [range(len(images))], spec, batch, workers)
    mu, sigma = m.stats()
    name = spec_name(spec)
    save_stats(dest, mu, sigma, extractor=name, count=m.n, resolution=int(shape[0]), channels=int(shape[2]),
               data=str(Path(data).expanduser().resolve()))
    return {"dest": str(Path(dest).resolve()), "count": m.n, "extractor": name}


def spec_name(spec: FeatureSpec) -> str:
    """The recorded name of a feature space, without loading it."""
    return f"digits-r{spec.resolution}" if spec.kind == "digits" else f"inception-v3-{spec.inception_input}"


def load_reference(path: str, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, metadata) of a reference file, checked against the feature space in use. A file without
    raygen's metadata (an NVlabs reference, e.g. cifar10-32x32.npz) is taken as EDM-input Inception."""
    from raygen.eval.fid import load_stats

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--ref {path} does not exist; make it with `python jobs/fid.py ref --data <dataset> "
                          f"--dest {path}`")
    try:
        mu, sigma, meta = load_stats(p)
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f"--ref {path} is not a statistics npz with mu and sigma ({e})") from None
    recorded = meta.get("extractor", "inception-v3-edm")  # NVlabs' files carry only mu and sigma
    name = spec_name(spec)
    if recorded != name:
        kind = "digits" if recorded.startswith("digits") else "inception"
        fix = "--features digits" if kind == "digits" else (
            f"--features inception --inception-input {recorded.rsplit('-', 1)[-1]} --inception-weights <...>")
        raise ConfigError(f"--ref {path} holds statistics in the {recorded!r} feature space, but these images are "
                          f"scored in {name!r}; pass {fix}, or make the reference again in this space")
    return mu, sigma, meta


def calc(images_path: str, ref: str, num: int, seeds: int, allow_small: bool, features: Optional[str],
         weights: Optional[str], inception_input: str, batch: int, workers: int,
         dest_json: Optional[str] = None) -> dict:
    """`calc`: FID of every seed range of `images_path` against `ref`, and their minimum; written to a json."""
    from raygen.core.files import write_json
    from raygen.eval.fid import frechet_distance

    images = open_images(images_path)
    ranges = seed_ranges(len(images), seeds, num, allow_small)
    spec = feature_spec(features, weights, inception_input, images.read([0]).shape[1:])
    mu_ref, sigma_ref, ref_meta = load_reference(ref, spec)
    moments = range_moments(images, ranges, spec, batch, workers)
    rows = []
    for r, m in zip(ranges, moments):
        mu, sigma = m.stats()
        if mu.shape != mu_ref.shape:
            raise ConfigError(f"--ref {ref} has {mu_ref.shape[0]}-d statistics, the features are {mu.shape[0]}-d")
        first, last = (int(images.seeds[r[0]]), int(images.seeds[r[-1]])) if images.seeds is not None else (None, None)
        rows.append({"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "count": m.n, "first_seed": first,
                     "last_seed": last, "positions": [r[0], r[-1]]})
    result = {"fid": min(row["fid"] for row in rows), "ranges": rows, "num": len(ranges[0]), "seeds": seeds,
              "images": str(Path(images_path).expanduser().resolve()), "found": len(images),
              "ref": str(Path(ref).expanduser().resolve()), "ref_count": ref_meta.get("count"),
              "features": spec_name(spec), "allow_small": allow_small}
    dest = Path(dest_json) if dest_json else default_json(Path(images_path).expanduser())
    write_json(dest, result)
    result["json"] = str(dest.resolve())
    return result


def default_json(images: Path) -> Path:
    """The result next to the images: <folder>/fid.json, or <name>.fid.json beside an npz or zip."""
    return images / "fid.json" if images.is_dir() else images.with_name(images.stem + ".fid.json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/fid.py", description="EDM's FID protocol: reference statistics (ref) and "
                                "FID of generated images over seed ranges (calc); docs/generate-and-fid.md")
    sub = p.add_subparsers(dest="command", required=True)

    def common(s):
        s.add_argument("--features", choices=("inception", "digits"),
                       help="feature space (default: inception when --inception-weights is given, else digits)")
        s.add_argument("--inception-weights", metavar="PATH|URL", help="inception-2015-12-05.pt (TorchScript)")
        s.add_argument("--inception-input", choices=INCEPTION_INPUTS, default="edm",
                       help="edm: uint8 at native size, as EDM/StyleGAN (comparable with NVlabs' reference files; "
                            "default); clean: clean-fid's bicubic resize, as raygen's in-training evaluator")
        s.add_argument("--batch", type=int, default=250, help="images per feature batch (default 250)")
        s.add_argument("--workers", type=int, default=1,
                       help="1: this process (default); N > 1: N Ray tasks (one GPU each on a GPU cluster)")

    r = sub.add_parser("ref", help="reference statistics of a dataset")
    r.add_argument("--data", required=True, metavar="ZIP|FOLDER|STORE|NPZ", help="the dataset (every image is used)")
    r.add_argument("--dest", required=True, metavar="NPZ", help="where the statistics go (mu, sigma, metadata)")
    common(r)
    c = sub.add_parser("calc", help="FID of generated images against reference statistics")
    c.add_argument("--images", required=True, metavar="FOLDER|NPZ", help="generated images, named by seed")
    c.add_argument("--ref", required=True, metavar="NPZ", help="reference statistics (jobs/fid.py ref, or NVlabs')")
    c.add_argument("--num", type=int, default=DEFAULT_NUM, help=f"images per seed range (default {DEFAULT_NUM})")
    c.add_argument("--seeds", type=int, default=1, help="number of consecutive seed ranges; the minimum FID is "
                   "reported (EDM's paper: 3)")
    c.add_argument("--allow-small", action="store_true",
                   help="fewer than --num x --seeds images: split them into --seeds equal ranges instead of failing")
    c.add_argument("--dest-json", metavar="JSON", help="result file (default: fid.json in the folder, "
                   "<name>.fid.json beside an npz)")
    common(c)
    return p


def main(argv=None) -> dict:
    """`jobs/fid.py`: the last line is `fid: <value>` (calc) or `ref: <path>` (ref)."""
    from raygen.core.job import fail, stop_ray

    args = parser().parse_args(argv)
    if args.batch < 1 or args.workers < 1:
        fail("--batch and --workers must be >= 1")
    try:
        if args.command == "ref":
            out = reference(args.data, args.dest, args.features, args.inception_weights, args.inception_input,
                            args.batch, args.workers)
            print(f"reference statistics of {out['count']} images ({out['extractor']})")
            stop_ray()
            print(f"ref: {out['dest']}", flush=True)
            return out
        out = calc(args.images, args.ref, args.num, args.seeds, args.allow_small, args.features,
                   args.inception_weights, args.inception_input, args.batch, args.workers, args.dest_json)
    except Exception as e:  # a Ray task's ConfigError (e.g. an image of another size) arrives wrapped
        cause = getattr(e, "cause", None) or e
        if not isinstance(cause, ConfigError):
            raise
        fail(str(cause))
    for k, row in enumerate(out["ranges"]):
        where = (f"seeds {row['first_seed']}-{row['last_seed']}" if row["first_seed"] is not None
                 else f"images {row['positions'][0]}-{row['positions'][1]}")
        print(f"range {k}: {where} ({row['count']} images): fid {row['fid']:.6g}")
    if len(out["ranges"]) > 1:
        print(f"minimum over {len(out['ranges'])} seed ranges")
    print(f"  json: {out['json']}")
    stop_ray()
    print(f"fid: {out['fid']:g}", flush=True)
    return out
