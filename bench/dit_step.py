"""One DiT training step (forward + MSE loss + backward, with zero_grad): raygen.nets.dit vs diffusers'
DiTTransformer2DModel (a faithful port of the reference DiT) at the same size, in one process.

The two models are timed in alternating blocks (the order flips every repeat) and the median block is
taken, so machine noise hits both alike. Both run in train() mode, fp32 or bf16 autocast, eager unless
--compile. With --device cuda it also counts the model FLOPs of one raygen step
(torch.utils.flop_counter) and reports model-FLOPs utilisation against --peak-tflops.

    python bench/dit_step.py                                   # CPU default -> bench/results/dit_step.json
    python bench/dit_step.py --device cuda --dtype bf16 --model B/2 --batch 64
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from raygen.nets.dit import DIT_SIZES, dit  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="S/2", help="size/patch, e.g. S/2, B/2, XL/2 (sizes: %s)" % ", ".join(DIT_SIZES))
    p.add_argument("--depth", type=int, default=None, help="override the named depth")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per model")
    p.add_argument("--steps", type=int, default=2, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (989 = H100 SXM dense bf16)")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/dit_step[_<device>].json)")
    return p.parse_args(argv)


def build(args):
    size, patch = args.model.split("/")
    spec = dict(DIT_SIZES[size], patch_size=int(patch))
    if args.depth:
        spec["depth"] = args.depth
    cfg = dict(spec, input_size=args.input_size, in_channels=args.channels, num_classes=args.num_classes, mlp_ratio=4.0)
    ours = dit(f"DiT-{args.model}", **{k: v for k, v in cfg.items() if k != "patch_size"})
    from diffusers import DiTTransformer2DModel

    ref = DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=cfg["in_channels"], out_channels=cfg["in_channels"], num_layers=cfg["depth"],
        sample_size=cfg["input_size"], patch_size=cfg["patch_size"], num_embeds_ada_norm=cfg["num_classes"],
        activation_fn="gelu-approximate", norm_eps=1e-6,  # tanh-GELU, 4x MLP (FeedForward default mult=4)
    )
    with torch.no_grad():  # no all-zero layers in either model (adaLN-Zero init): same arithmetic on both
        for p in ours.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
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
    device = torch.device(args.device)
    cfg, ours, ref = build(args)
    ours, ref = ours.to(device).train(), ref.to(device).train()
    b, s = args.batch, args.input_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, args.channels, s, s, generator=g).to(device)
    target = torch.randn(b, args.channels, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    y = torch.randint(0, args.num_classes, (b,), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    fwd = {"raygen": lambda: ours(x, t, y), "diffusers": lambda: ref(x, timestep=t, class_labels=y).sample}
    models = {"raygen": ours, "diffusers": ref}
    if args.compile:
        fwd = {k: torch.compile(f) for k, f in fwd.items()}

    def step(name):
        models[name].zero_grad(set_to_none=True)
        with autocast():
            loss = F.mse_loss(fwd[name]().float(), target)
        loss.backward()

    for name in fwd:  # warm-up (and compilation)
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
    sec = {k: statistics.median(v) for k, v in times.items()}
    sps = {k: 1.0 / v for k, v in sec.items()}
    ratio = sps["raygen"] / sps["diffusers"]

    result = dict(
        ratio=round(ratio, 4),
        raygen_steps_per_s=round(sps["raygen"], 4), diffusers_steps_per_s=round(sps["diffusers"], 4),
        raygen_block_s=[round(v, 4) for v in times["raygen"]], diffusers_block_s=[round(v, 4) for v in times["diffusers"]],
        config=dict(model=f"DiT-{args.model}", **cfg, batch=b, tokens=(s // cfg["patch_size"]) ** 2, dtype=args.dtype,
                    compile=args.compile, repeats=args.repeats, steps_per_block=args.steps, warmup=args.warmup,
                    params_raygen=sum(p.numel() for p in ours.parameters()),
                    params_diffusers=sum(p.numel() for p in ref.parameters())),
        device=device_name(device), torch_threads=torch.get_num_threads() if device.type == "cpu" else None,
        torch=torch.__version__, diffusers=__import__("diffusers").__version__,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    print(f"{result['device']} | DiT-{args.model} depth {cfg['depth']} batch {b} {args.dtype}"
          f"{' compiled' if args.compile else ''}: raygen {sps['raygen']:.3f} steps/s, "
          f"diffusers {sps['diffusers']:.3f} steps/s, ratio {ratio:.3f}")
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step("raygen")
        flops = fc.get_total_flops()
        result.update(flops_per_step=flops, peak_tflops=args.peak_tflops,
                      **{f"{k}_tflops": round(flops * v / 1e12, 2) for k, v in sps.items()},
                      **{f"{k}_mfu": round(flops * v / (args.peak_tflops * 1e12), 4) for k, v in sps.items()})
        print(f"{flops / 1e12:.3f} TFLOP/step; MFU raygen {result['raygen_mfu']:.1%}, "
              f"diffusers {result['diffusers_mfu']:.1%} (of {args.peak_tflops:g} TFLOPS)")
    if args.out:
        out = Path(args.out)
    else:
        slug = "" if device.type == "cpu" else "_" + re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
        out = ROOT / "bench" / "results" / f"dit_step{slug}{'_compile' if args.compile else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return result


if __name__ == "__main__":
    main()
