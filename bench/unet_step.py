"""One U-Net training step (forward + MSE loss + backward, with zero_grad): raygen.nets.unet's SongUNet
(EDM's DDPM++) vs diffusers' UNet2DModel configured to the same architecture, in one process.

diffusers is set up as DDPM++ wherever its options allow: the same resolution, channels per level,
blocks per level (and num_blocks + 1 per decoder level), attention at the same resolutions (one head),
a mid block resnet-attention-resnet, resnet blocks that down/upsample (`downsample_type="resnet"`: 2x2
average pooling / nearest upsampling, as the [1,1] filter), a positional time embedding into a
4 x model_channels MLP, a class embedding, GroupNorm with EDM's min(32, C/4) groups and eps 1e-6, and the
same dropout, both in train() mode. What differs (the parameter counts, printed and asserted within 5%):
diffusers' first conv already outputs the level's channels (DDPM++: model_channels, then a 1x1 skip), it
attends after every resnet of an attention level in the decoder (DDPM++: the last one only), its
attention uses Linear q/k/v/out, and its resampling resnets have no 1x1 skip projection.

The two models are timed in alternating blocks (the order flips every repeat) after warm-up, with the
same inputs and thread count; `ratio` = raygen images/s / diffusers images/s from the medians,
`paired_ratio` the median of per-repeat ratios. FLOPs of one raygen step come from
torch.utils.flop_counter; on a GPU, MFU against --peak-tflops. The JSON records the load average: on a
CPU that other processes keep busy, OpenMP's spinning waits make every parallel op expensive.

    python bench/unet_step.py                    # CPU: model_channels 32, 32x32, batch 16 -> bench/results/unet_step.json
    python bench/unet_step.py --device cuda --dtype bf16   # full CIFAR-10 DDPM++, batch 64 -> unet_step_<gpu>_bf16.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from raygen.nets.unet import DDPMPP, param_count, unet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-channels", type=int, default=None, help="CPU default 32, GPU default 128 (EDM's CIFAR-10)")
    p.add_argument("--channel-mult", default="2,2,2")
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--attn-resolutions", default="16")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--dropout", type=float, default=DDPMPP["dropout"])
    p.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 64 on a GPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--channels-last", action="store_true", help="run raygen's net in channels_last memory format")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per model (default 8)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (CPU 1, GPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (CPU 1, GPU 5)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="for MFU (default 989 dense bf16 / 494 tf32 of an H100 SXM; fp32 here means TF32 off)")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/unet_step[_<gpu>_<dtype>].json)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    for name, cpu_default, gpu_default in (("model_channels", 32, 128), ("batch", 16, 64), ("repeats", 8, 10),
                                           ("steps", 1, 10), ("warmup", 1, 5)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if cpu else gpu_default)
    if args.peak_tflops is None:
        args.peak_tflops = 989.0 if args.dtype == "bf16" else 67.0  # H100 SXM: bf16 dense / fp32 (no TF32)
    args.channel_mult = tuple(int(v) for v in args.channel_mult.split(","))
    args.attn_resolutions = tuple(int(v) for v in args.attn_resolutions.split(",")) if args.attn_resolutions else ()
    return args


def build(args):
    cfg = dict(img_resolution=args.resolution, in_channels=args.channels, num_classes=args.num_classes,
               model_channels=args.model_channels, channel_mult=args.channel_mult, num_blocks=args.num_blocks,
               attn_resolutions=args.attn_resolutions, dropout=args.dropout)
    ours = unet("ddpmpp", **cfg)
    from diffusers import UNet2DModel

    widths = tuple(args.model_channels * m for m in args.channel_mult)
    levels = [args.resolution >> i for i in range(len(widths))]
    attn = [r in args.attn_resolutions for r in levels]
    groups = min(32, min(widths) // 4)  # EDM's rule; one value for diffusers (all DDPM++ widths agree here)
    ref = UNet2DModel(
        sample_size=args.resolution, in_channels=args.channels, out_channels=args.channels,
        time_embedding_type="positional", time_embedding_dim=args.model_channels * 4, flip_sin_to_cos=True, freq_shift=0,
        # resnet resampling everywhere: the Resnet*sampleBlock2D types (plain Down/UpBlock2D resample with a conv)
        down_block_types=tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)),
        block_out_channels=widths, layers_per_block=args.num_blocks, downsample_type="resnet", upsample_type="resnet",
        dropout=args.dropout, attention_head_dim=max(widths), norm_num_groups=groups,  # one head; EDM's groups
        norm_eps=1e-6, num_class_embeds=args.num_classes or None, mid_block_scale_factor=2 ** -0.5,
    )
    return cfg, ours, ref


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        import platform

        return platform.processor() or platform.machine()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (EDM)
    cfg, ours, ref = build(args)
    n_ours, n_ref = param_count(ours), param_count(ref)
    print(f"parameters: raygen {n_ours:,}  diffusers {n_ref:,}  (diffusers / raygen = {n_ref / n_ours:.4f})")
    assert abs(n_ref / n_ours - 1) <= 0.05, "diffusers' configuration is not within 5% of raygen's parameter count"
    ours, ref = ours.to(device).train(), ref.to(device).train()
    if args.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    b, s = args.batch, args.resolution
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, args.channels, s, s, generator=g).to(device)
    target = torch.randn(b, args.channels, s, s, generator=g).to(device)
    noise = torch.randn(b, generator=g).to(device)  # c_noise: raygen's positional embedding input
    t = torch.randint(0, 1000, (b,), generator=g).to(device)  # diffusers' timestep input (same embedding cost)
    y = torch.randint(0, max(args.num_classes, 1), (b,), generator=g).to(device) if args.num_classes else None
    x_ours = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    fwd = {"raygen": lambda: ours(x_ours, noise, y), "diffusers": lambda: ref(x, timestep=t, class_labels=y).sample}
    models = {"raygen": ours, "diffusers": ref}

    def step(name):
        models[name].zero_grad(set_to_none=True)
        with autocast():
            loss = F.mse_loss(fwd[name]().float(), target)
        loss.backward()

    for name in fwd:
        for _ in range(args.warmup):
            step(name)
    sync()
    times = {name: [] for name in fwd}
    for r in range(args.repeats):
        for name in (("raygen", "diffusers") if r % 2 == 0 else ("diffusers", "raygen")):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    ips = {k: b / statistics.median(v) for k, v in times.items()}
    ratio = ips["raygen"] / ips["diffusers"]
    paired = statistics.median(d / r for r, d in zip(times["raygen"], times["diffusers"]))

    result = dict(
        ratio=round(ratio, 4), paired_ratio=round(paired, 4),
        raygen_images_per_s=round(ips["raygen"], 3), diffusers_images_per_s=round(ips["diffusers"], 3),
        **{f"{k}_block_s": [round(v, 4) for v in times[k]] for k in times},
        config=dict(arch="ddpmpp", **cfg, batch=b, dtype=args.dtype, channels_last=args.channels_last,
                    repeats=args.repeats, steps_per_block=args.steps, warmup=args.warmup,
                    diffusers={k: ref.config[k] for k in (
                        "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                        "downsample_type", "upsample_type", "time_embedding_dim", "attention_head_dim",
                        "norm_num_groups", "norm_eps", "num_class_embeds")}),
        params_raygen=n_ours, params_diffusers=n_ref,
        device=device_name(device), torch_threads=torch.get_num_threads() if device.type == "cpu" else None,
        loadavg_1min=round(os.getloadavg()[0], 2), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        torch=torch.__version__, diffusers=__import__("diffusers").__version__,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    print(f"{result['device']} | DDPM++ {args.model_channels}x{args.channel_mult} {s}x{s} batch {b} {args.dtype}: "
          f"raygen {ips['raygen']:.2f} img/s, diffusers {ips['diffusers']:.2f} img/s, "
          f"ratio {ratio:.3f} (median of paired blocks {paired:.3f})")
    if device.type == "cpu" and result["loadavg_1min"] > os.cpu_count():
        print(f"warning: load average {result['loadavg_1min']} > {os.cpu_count()} cores: other work competes for the "
              "cores (OMP_WAIT_POLICY=PASSIVE or --threads 1 measure the compute instead)")

    # model FLOPs of one step of each (conv / matmul / attention), counted on an eager step; MFU and
    # FLOP/s use raygen's count for both (diffusers' extra decoder attention is extra work, not credit)
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name in fwd:
        models[name].zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc, autocast():
            F.mse_loss(fwd[name]().float(), target).backward()
        counts[name] = fc.get_total_flops()
    flops = counts["raygen"]
    result.update(flops_per_step=flops, diffusers_flops_per_step=counts["diffusers"],
                  **{f"{k}_tflops": round(flops * v / b / 1e12, 5) for k, v in ips.items()})
    print(f"FLOPs per step: raygen {flops / 1e9:.1f} G, diffusers {counts['diffusers'] / 1e9:.1f} G")
    if device.type == "cuda":
        result.update(peak_tflops=args.peak_tflops,
                      **{f"{k}_mfu": round(flops * v / b / (args.peak_tflops * 1e12), 4) for k, v in ips.items()})
        print(f"{flops / 1e12:.3f} TFLOP/step; MFU raygen {result['raygen_mfu']:.1%}, "
              f"diffusers {result['diffusers_mfu']:.1%} (of {args.peak_tflops:g} TFLOPS)")
    else:
        print(f"{flops / 1e9:.1f} GFLOP/step: raygen {result['raygen_tflops'] * 1e3:.1f} GFLOP/s, "
              f"diffusers {result['diffusers_tflops'] * 1e3:.1f} GFLOP/s")
    if args.out:
        out = Path(args.out)
    else:
        gpu = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
        slug = "" if device.type == "cpu" else f"_{gpu}_{args.dtype}"
        out = ROOT / "bench" / "results" / f"unet_step{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return result


if __name__ == "__main__":
    main()
