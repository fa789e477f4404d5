"""Ingest throughput: decode + crop + VAE encode of a generated JPEG class-folder tree through raygen's
Ray Data pipeline (`run_ingest`) vs a single-process loop and vs a `torch.utils.data.DataLoader`
with worker processes, in one run, on the CPU. All three do the identical work and are timed end to end:

    list the folder (list_source) -> read + decode each JPEG (ItemReader.read) -> transforms.apply
    (center_crop_adm to --resolution) -> [-1, 1] NCHW float32 -> VAE encode, posterior mean x scaling
    factor, --batch images per call -> fp16 -> written to disk

  single      one process, torch threads = --cpus; writes one .npy
  dataloader  DataLoader(num_workers=--loader-workers, batch_size=--batch): the workers read + crop +
              convert (torch sets 1 thread in each), the main process encodes with torch threads = --cpus;
              writes one .npy
  raygen      ray.init(num_cpus=--cpus) + raygen.cli.init_ray() BEFORE timing (a user's cluster is
              already up; its start-up is reported as ray_init_s), then run_ingest(cfg, store, "vae")
              timed end to end: listing, actor start-up (worker processes import torch/diffusers), model
              load, decode actors, encoder actors (torch threads = int(encoder.cpus_per_actor)), shard
              writes, meta.json. The pipeline knobs are flags; 0 / unset = raygen's own defaults.

Each contender loads the same random-weight tiny VAE (`tiny_vae_config()`) with from_pretrained from a
temp dir. The bench asserts that raygen's store (read back in listing order) and the DataLoader's
latents match the single-process latents to fp16 tolerance.

    python bench/ingest.py                        # 2048 JPEGs 160x144 -> 64x64 crop -> bench/results/ingest.json
    python bench/ingest.py --encoder-actors 2 --cpus-per-actor 0.75 --cpus-per-decoder 0.5   # tune raygen
    python bench/ingest.py --device cuda          # GPU: sd-vae-ft-ema-architecture encoder, 256x256 fp16
                                                  #   -> bench/results/ingest_<gpu>.json

GPU section (--device cuda): an AutoencoderKL with the sd-vae-ft-ema architecture (block_out_channels
(128,256,512,512), layers_per_block 2, 4 latent channels, sample_size 256) and random weights, fp16.
It times (a) `vae.encode(x).latent_dist.mean` on a device-resident batch and (b) raygen's `VAEEncoder`
actor class called on a host numpy batch as the pipeline hands it (H2D copy, encode, D2H, fp16 cast),
after warm-up, with torch.cuda.synchronize. `ratio_to_flop_bound` = img/s / (peak dense fp16 TFLOP/s /
270.6 GFLOP per image); the peak comes from PEAK_FP16_TFLOPS by device name (or --peak-tflops).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raygen.core.files import write_text  # noqa: E402
from raygen.data import embedded  # noqa: E402
from raygen.data.encoders import EncoderConfig  # noqa: E402
from raygen.data.ingest import IngestConfig, PipelineConfig, StoreConfig  # noqa: E402
from raygen.data.sources import ItemReader, SourceConfig, list_source, write_image_folder  # noqa: E402
from raygen.data.transforms import TransformConfig, apply  # noqa: E402
from raygen.data.tiny_models import tiny_vae_config  # noqa: E402

# dense (no sparsity) fp16/bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; first match wins
PEAK_FP16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
SD_VAE_ENCODER_GFLOP = 270.6  # per 256x256 image (the figure; FlopCounterMode counts ~272.7)
SD_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                     norm_num_groups=32, sample_size=256)  # stabilityai/sd-vae-ft-ema's config.json


def parse_args(argv=None):
    d_enc, d_pipe, d_store = EncoderConfig(), PipelineConfig(), StoreConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2048, help="JPEGs to generate")
    p.add_argument("--src-size", default="160x144", help="WxH of the generated JPEGs (larger than the crop)")
    p.add_argument("--resolution", type=int, default=64, help="center_crop_adm output size")
    p.add_argument("--batch", type=int, default=64, help="images per VAE call (all contenders)")
    p.add_argument("--cpus", type=int, default=2, help="ray num_cpus, torch threads of single/dataloader main")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader num_workers")
    p.add_argument("--decode-actors", type=int, default=d_pipe.decode_actors, help="raygen ingest.decode_actors (0 = auto)")
    p.add_argument("--decode-batch", type=int, default=d_pipe.decode_batch_size, help="raygen ingest.decode_batch_size")
    p.add_argument("--cpus-per-decoder", type=float, default=d_pipe.cpus_per_decoder, help="raygen ingest.cpus_per_decoder")
    p.add_argument("--encoder-actors", type=int, default=d_enc.actors, help="raygen encoder.actors (0 = auto)")
    p.add_argument("--cpus-per-actor", type=float, default=d_enc.cpus_per_actor,
                   help="raygen encoder.cpus_per_actor (also the actor's torch threads, int())")
    p.add_argument("--fuse-decode", choices=("auto", "yes", "no"), default="auto",
                   help="raygen ingest.fuse_decode (auto: decode inside the encoder actors on CPU)")
    p.add_argument("--channels-last", action="store_true",
                   help="raygen encoder.channels_last=true (1.4x faster CPU convs, ~6e-4 abs deviation from float64)")
    p.add_argument("--shard-size", type=int, default=d_store.shard_size, help="raygen store.shard_size")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait after ray.init before timing")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (images, VAE, outputs)")
    p.add_argument("--device", default="cpu", help="cpu: the ingest comparison; cuda: the GPU encoder section")
    # GPU section
    p.add_argument("--gpu-resolution", type=int, default=256)
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--gpu-iters", type=int, default=10, help="encoder calls per timed block")
    p.add_argument("--gpu-repeats", type=int, default=5, help="timed blocks (median)")
    p.add_argument("--gpu-warmup", type=int, default=3)
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark (raygen leaves it off)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense fp16 peak")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/ingest[_<gpu>].json)")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def machine() -> dict:
    import diffusers
    import PIL
    import ray

    return {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "diffusers": diffusers.__version__, "pillow": PIL.__version__}


def write_json(out: Path, result: dict) -> None:
    write_text(out, json.dumps(result, indent=2) + "\n")  # temp file + os.replace
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


# ---------------------------------------------------------------- data + model


def make_images(root: Path, num: int, size: str) -> Path:
    """Procedural shapes as a class-folder tree of JPEGs, W x H (non-square, so the crop resizes)."""
    w, h = (int(v) for v in size.lower().split("x"))
    images, labels = embedded.shapes(max(w, h), num, seed=0)
    return write_image_folder(images[:, :h, :w], labels, embedded.shapes_class_names(), root / "images")


def make_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(path)  # random weights: the cost is what is measured
    return path


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32, low_cpu_mem_usage=False).eval().requires_grad_(False)
    return vae, float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.inference_mode()
def encode(vae, scale: float, shift: float, x: torch.Tensor) -> np.ndarray:
    z = vae.encode(x).latent_dist.mean.float()
    return ((z - shift) * scale).numpy().astype(np.float16)


def to_input(images: list[np.ndarray]) -> np.ndarray:
    """HWC float32 in [0, 1] -> NCHW float32 in [-1, 1] (the arithmetic raygen's Decoder does)."""
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2) * 2.0 - 1.0, dtype=np.float32)


# ---------------------------------------------------------------- contenders


def run_single(src: SourceConfig, tcfg: TransformConfig, vae_dir: Path, out: Path, batch: int, threads: int,
               seed: int = 0) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    listing = list_source(src)
    reader = ItemReader(listing.kind, listing.info, src)
    vae, scale, shift = load_vae(vae_dir)
    parts = []
    for start in range(0, len(listing.keys), batch):
        keys = listing.keys[start:start + batch]
        images = [apply(tcfg, reader.read(k), np.random.default_rng([seed, start + j])) for j, k in enumerate(keys)]
        parts.append(encode(vae, scale, shift, torch.from_numpy(to_input(images))))
    latents = np.concatenate(parts)
    np.save(out, latents)
    return latents, time.perf_counter() - t0


class CropDataset(torch.utils.data.Dataset):
    """Read + decode + crop + [-1, 1] CHW float32, in the DataLoader's worker processes."""

    def __init__(self, src: SourceConfig, tcfg: TransformConfig, seed: int = 0):
        listing = list_source(src)
        self.keys, self.tcfg, self.seed = listing.keys, tcfg, seed
        self.reader = ItemReader(listing.kind, listing.info, src)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        img = apply(self.tcfg, self.reader.read(self.keys[i]), np.random.default_rng([self.seed, i]))
        return torch.from_numpy(to_input([img])[0])


def run_dataloader(src: SourceConfig, tcfg: TransformConfig, vae_dir: Path, out: Path, batch: int, threads: int,
                   workers: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(CropDataset(src, tcfg), batch_size=batch, num_workers=workers, shuffle=False)
    vae, scale, shift = load_vae(vae_dir)
    latents = np.concatenate([encode(vae, scale, shift, x) for x in loader])
    np.save(out, latents)
    return latents, time.perf_counter() - t0


def run_raygen(cfg: IngestConfig, store_dir: Path) -> tuple[np.ndarray, float, dict]:
    from raygen.data.ingest import run_ingest
    from raygen.data.store import Store

    t0 = time.perf_counter()
    meta = run_ingest(cfg, store_dir, "vae")
    seconds = time.perf_counter() - t0
    return np.asarray(Store(store_dir).array("latent")[:]), seconds, meta


def compare(name: str, got: np.ndarray, ref: np.ndarray, loose: bool = False) -> dict:
    """fp16 tolerance: the latents were rounded to fp16 (relative step 2^-11 ~ 4.9e-4) after fp32 convs that
    may sum in a different order (other thread counts / batch splits); allow a few fp16 steps."""
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    a, b = got.astype(np.float32), ref.astype(np.float32)
    diff = np.abs(a - b)
    # channels-last oneDNN kernels deviate ~6e-4 from float64 on these flat images (contiguous: 6e-7)
    tol = 4e-3 * np.abs(b) + (4e-3 if loose else 1e-3) * float(np.abs(b).max())
    ok = bool((diff <= tol).all())
    stats = {"max_abs_diff": float(diff.max()), "max_abs_ref": float(np.abs(b).max()), "match": ok}
    assert ok, f"{name} latents differ from the single-process loop beyond fp16 tolerance: {stats}"
    return stats


def cpu_bench(a) -> dict:
    import ray

    from raygen.cli import init_ray
    from raygen.data.ingest import resolve_resources

    tmp = Path(tempfile.mkdtemp(prefix="raygen-bench-ingest-"))
    try:
        t = time.perf_counter()
        img_dir = make_images(tmp, a.num, a.src_size)
        vae_dir = make_vae(tmp / "tiny-vae")
        print(f"generated {a.num} JPEGs ({a.src_size}) + tiny VAE in {time.perf_counter() - t:.1f} s: {tmp}")
        src = SourceConfig(kind="class_folders", path=str(img_dir))
        tcfg = TransformConfig(kind="center_crop_adm", resolution=a.resolution)
        gflop = encoder_gflop(tiny_vae_config(), a.resolution)
        load0 = os.getloadavg()[0]

        ref, t_single = run_single(src, tcfg, vae_dir, tmp / "single.npy", a.batch, a.cpus)
        print(f"single process     : {a.num / t_single:8.1f} img/s  ({t_single:.2f} s)")
        dl, t_dl = run_dataloader(src, tcfg, vae_dir, tmp / "dataloader.npy", a.batch, a.cpus, a.loader_workers)
        print(f"DataLoader({a.loader_workers} wkrs)  : {a.num / t_dl:8.1f} img/s  ({t_dl:.2f} s)")
        dl_check = compare("DataLoader", dl, ref)

        t = time.perf_counter()
        if os.environ.get("RAY_ADDRESS"):
            init_ray()  # an existing cluster: its CPUs, not --cpus
        else:
            ray.init(num_cpus=a.cpus, log_to_driver=True, configure_logging=False)
            init_ray()  # raygen's DataContext settings (preserve_order, no progress bars)
        ray_init_s = time.perf_counter() - t
        ray_cpus = ray.cluster_resources().get("CPU")
        time.sleep(a.settle)  # let the fresh cluster's daemons finish starting
        cfg = IngestConfig(
            source=src, transform=tcfg,
            encoder=EncoderConfig(model=str(vae_dir), posterior="mean", batch_size=a.batch, actors=a.encoder_actors,
                                  cpus_per_actor=a.cpus_per_actor, channels_last=a.channels_last or None),
            store=StoreConfig(path=str(tmp / "store"), dtype="float16", shard_size=a.shard_size),
            ingest=PipelineConfig(decode_actors=a.decode_actors, decode_batch_size=a.decode_batch,
                                  cpus_per_decoder=a.cpus_per_decoder,
                                  fuse_decode={"auto": None, "yes": True, "no": False}[a.fuse_decode]))
        for part in (cfg.source, cfg.transform, cfg.encoder, cfg.store, cfg.ingest):
            part.validate()
        enc_actors, _, dec_actors, fused = resolve_resources(cfg)
        got, t_ray, meta = run_raygen(cfg, tmp / "store")
        print(f"raygen run_ingest  : {a.num / t_ray:8.1f} img/s  ({t_ray:.2f} s; ray.init {ray_init_s:.1f} s not counted)")
        ray_check = compare("raygen", got, ref, loose=a.channels_last)
        load1 = os.getloadavg()[0]
        ray.shutdown()
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rate = {"single": a.num / t_single, "dataloader": a.num / t_dl, "raygen": a.num / t_ray}
    ratio_dl, ratio_single = rate["raygen"] / rate["dataloader"], rate["raygen"] / rate["single"]
    print(f"ratio_vs_dataloader {ratio_dl:.3f}   ratio_vs_single {ratio_single:.3f}")
    if max(load0, load1) > a.cpus:
        print(f"warning: load average {max(load0, load1):.1f} > {a.cpus}: other work shared the cores; repeat on a quiet machine")
    return {
        "ratio_vs_dataloader": round(ratio_dl, 4), "ratio_vs_single": round(ratio_single, 4),
        "images_per_s": {k: round(v, 2) for k, v in rate.items()},
        "seconds": {"single": round(t_single, 3), "dataloader": round(t_dl, 3), "raygen": round(t_ray, 3),
                    "raygen_pipeline_only": meta["seconds_last_run"]},
        "ray_init_s": round(ray_init_s, 2), "ray_settle_s": a.settle,
        "gflop_per_image": round(gflop, 4),
        "correctness": {"dataloader_vs_single": dl_check, "raygen_vs_single": ray_check},
        "config": {
            "num_images": a.num, "src_size": a.src_size, "format": "JPEG q95 class_folders (embedded shapes)",
            "transform": f"center_crop_adm {a.resolution}", "batch": a.batch,
            "vae": "AutoencoderKL(tiny_vae_config()), random weights, fp32 compute, posterior mean, fp16 out",
            "cpus": a.cpus,
            "single": {"torch_threads": a.cpus},
            "dataloader": {"num_workers": a.loader_workers, "batch_size": a.batch, "main_torch_threads": a.cpus,
                           "worker_torch_threads": 1, "start_method": torch.multiprocessing.get_start_method()},
            "raygen": {"ray_num_cpus": ray_cpus, "fused_decode_encode": fused, "channels_last": a.channels_last, "decode_actors": dec_actors,
                       "cpus_per_decoder": a.cpus_per_decoder, "decode_batch_size": a.decode_batch,
                       "encoder_actors": enc_actors, "encoder_cpus_per_actor": a.cpus_per_actor,
                       "encoder_torch_threads": max(1, int(a.cpus_per_actor)), "shard_size": a.shard_size,
                       "timed": "run_ingest end to end (listing, actor start-up, model load, decode, encode, "
                                "shard writes, meta.json); ray.init excluded"},
        },
        "loadavg_1min": [round(load0, 2), round(load1, 2)],
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def encoder_gflop(config: dict, res: int) -> float:
    """FLOPs of encoding one res x res image (convs, matmuls, attention), counted on the meta device."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
        with FlopCounterMode(display=False) as fc:
            vae.encode(torch.empty(1, 3, res, res)).latent_dist.mean
    return fc.get_total_flops() / 1e9


# ---------------------------------------------------------------- GPU section


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    for key, peak in PEAK_FP16_TFLOPS:
        if key.lower() in name.lower():
            return peak, f"table ({key}: dense fp16/bf16 tensor-core peak, data sheet)"
    return None, "unknown device: pass --peak-tflops"


def gpu_bench(a) -> dict:
    from diffusers import AutoencoderKL

    from raygen.data.encoders import VAEEncoder

    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    name = torch.cuda.get_device_name(device)
    b, res = a.gpu_batch, a.gpu_resolution
    counted_gflop = encoder_gflop(SD_VAE_CONFIG, res)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_CONFIG).to(device, torch.float16).eval().requires_grad_(False)
    x = (torch.rand(b, 3, res, res, device=device) * 2 - 1).half()
    host = {"index": np.arange(b), "label": np.zeros(b, np.int64), "key": np.array([f"{i}" for i in range(b)], object),
            "error": np.array([""] * b, object), "image": (x.float().cpu().numpy())}

    tmp = Path(tempfile.mkdtemp(prefix="raygen-bench-ingest-gpu-"))
    try:
        vae.save_pretrained(tmp / "sd-vae-arch")
        enc = VAEEncoder(EncoderConfig(model=str(tmp / "sd-vae-arch"), posterior="mean", gpus_per_actor=1,
                                       dtype="float16", batch_size=b))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def raw():
        with torch.inference_mode():
            vae.encode(x).latent_dist.mean

    def actor():
        enc(host)

    rates = {}
    for label, fn in (("encode_device_batch", raw), ("raygen_vae_encoder", actor)):
        for _ in range(a.gpu_warmup):
            fn()
        torch.cuda.synchronize()
        blocks = []
        for _ in range(a.gpu_repeats):
            t0 = time.perf_counter()
            for _ in range(a.gpu_iters):
                fn()
            torch.cuda.synchronize()
            blocks.append(b * a.gpu_iters / (time.perf_counter() - t0))
        rates[label] = statistics.median(blocks)
    peak, peak_src = peak_tflops(name, a.peak_tflops)
    gflop = SD_VAE_ENCODER_GFLOP * (res / 256) ** 2
    bound = peak * 1e3 / gflop if peak else None  # images/s at 100% of the peak
    for label, r in rates.items():
        print(f"{name} | sd-vae-ft-ema-arch encoder {res}x{res} fp16 batch {b} | {label}: {r:8.1f} img/s"
              + (f" = {r / bound:.1%} of the FLOP bound ({bound:.0f} img/s at {peak:g} TFLOP/s)" if bound else ""))
    return {
        "images_per_s": round(rates["encode_device_batch"], 2),
        "ratio_to_flop_bound": round(rates["encode_device_batch"] / bound, 4) if bound else None,
        "raygen_vae_encoder_images_per_s": round(rates["raygen_vae_encoder"], 2),
        "raygen_vae_encoder_ratio_to_flop_bound": round(rates["raygen_vae_encoder"] / bound, 4) if bound else None,
        "flop_bound_images_per_s": round(bound, 1) if bound else None,
        "gflop_per_image": gflop, "gflop_per_image_counted": round(counted_gflop, 2),
        "peak_tflops": peak, "peak_source": peak_src,
        "config": {"vae": "AutoencoderKL, sd-vae-ft-ema architecture, random weights", **{k: list(v) if isinstance(
            v, tuple) else v for k, v in SD_VAE_CONFIG.items()}, "resolution": res, "batch": b, "dtype": "float16",
            "iters_per_block": a.gpu_iters, "repeats": a.gpu_repeats, "warmup": a.gpu_warmup,
            "cudnn_benchmark": a.cudnn_benchmark,
            "timed": {"encode_device_batch": "vae.encode(x).latent_dist.mean, x fp16 already on the GPU",
                      "raygen_vae_encoder": "raygen VAEEncoder(batch) on a host float32 numpy batch: H2D, encode, "
                                            "(mean - shift) * scale, D2H, fp16"}},
        "device": name, "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main(argv=None):
    a = parse_args(argv)
    if a.device == "cpu":
        result = cpu_bench(a)
        out = Path(a.out) if a.out else ROOT / "bench" / "results" / "ingest.json"
    else:
        result = gpu_bench(a)
        slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
        out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"ingest_{slug}.json"
    write_json(out, result)
    return result


if __name__ == "__main__":
    main()
