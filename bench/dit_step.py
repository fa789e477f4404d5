"""One DiT training step (forward + MSE loss + backward, with zero_grad): raygen.nets.dit vs diffusers'
DiTTransformer2DModel (a faithful port of the reference DiT) at the same size, in one process.

The two models are timed in alternating blocks (the order flips every repeat), so machine noise hits
both alike: `ratio` divides the two median blocks, `paired_ratio` is the median of the per-repeat ratios. Both run in train() mode (diffusers then draws its 10% label
dropout inside the net, a few tiny ops), fp32 or bf16 autocast, eager unless --compile. It counts the
model FLOPs of one raygen step (torch.utils.flop_counter); on a GPU it reports model-FLOPs utilisation
against --peak-tflops. On a CPU that other processes keep busy, OpenMP's spinning waits make every
parallel op expensive, which favours the model with fewer ops: compare with OMP_WAIT_POLICY=PASSIVE
or --threads 1 (the JSON records the load average and the policy).

    python bench/dit_step.py                       # CPU: DiT-S/2 at depth 4, batch 8 -> bench/results/dit_step.json
    python bench/dit_step.py --device cuda --dtype bf16 --model B/2   # batch 256 -> dit_step_<gpu>.json
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
from raygen.nets.dit import DIT_SIZES, dit  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="S/2", help="size/patch, e.g. S/2, B/2, XL/2 (sizes: %s)" % ", ".join(DIT_SIZES))
    p.add_argument("--depth", type=int, default=None, help="override the named depth (CPU default: 4)")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 256 on a GPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per model (default 10)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (CPU 1, GPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (CPU 1, GPU 5)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (989 = H100 SXM dense bf16)")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/dit_step[_<device>].json)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    for name, cpu_default, gpu_default in (("batch", 8, 256), ("repeats", 10, 10), ("steps", 1, 10), ("warmup", 1, 5)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if cpu else gpu_default)
    if args.depth is None and cpu and args.model == "S/2":
        args.depth = 4  # full-depth DiT-S/2 took 3-12 s a step on the 2 shared cores this was tuned on
    return args


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
    if args.threads:
        torch.set_num_threads(args.threads)
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
    # each repeat times the two models back to back: the median of those pairs' ratios follows slow drifts
    paired = statistics.median(d / r for r, d in zip(times["raygen"], times["diffusers"]))

    result = dict(
        ratio=round(ratio, 4), paired_ratio=round(paired, 4),
        raygen_steps_per_s=round(sps["raygen"], 4), diffusers_steps_per_s=round(sps["diffusers"], 4),
        **{f"{k}_block_s": [round(v, 4) for v in times[k]] for k in times},
        config=dict(model=f"DiT-{args.model}", **cfg, batch=b, tokens=(s // cfg["patch_size"]) ** 2, dtype=args.dtype,
                    compile=args.compile, repeats=args.repeats, steps_per_block=args.steps, warmup=args.warmup,
                    params_raygen=sum(p.numel() for p in ours.parameters()),
                    params_diffusers=sum(p.numel() for p in ref.parameters())),
        device=device_name(device), torch_threads=torch.get_num_threads() if device.type == "cpu" else None,
        loadavg_1min=round(os.getloadavg()[0], 2),  # other work on the machine while it ran
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        torch=torch.__version__, diffusers=__import__("diffusers").__version__,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    print(f"{result['device']} | DiT-{args.model} depth {cfg['depth']} batch {b} {args.dtype}"
          f"{' compiled' if args.compile else ''}: raygen {sps['raygen']:.3f} steps/s, "
          f"diffusers {sps['diffusers']:.3f} steps/s, ratio {ratio:.3f} (median of paired blocks {paired:.3f})")
    if device.type == "cpu" and result["loadavg_1min"] > os.cpu_count():
        print(f"warning: load average {result['loadavg_1min']} > {os.cpu_count()} cores: other work competes for "
              "the cores, and with OpenMP's spinning waits that penalises every parallel op (the model with fewer "
              "ops wins); OMP_WAIT_POLICY=PASSIVE or --threads 1 measure the compute instead")

    # model FLOPs of one raygen step (matmuls + attention; the same for diffusers), counted on an eager step
    from torch.utils.flop_counter import FlopCounterMode

    ours.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fc, autocast():
        F.mse_loss(ours(x, t, y).float(), target).backward()
    flops = fc.get_total_flops()
    result.update(flops_per_step=flops, **{f"{k}_tflops": round(flops * v / 1e12, 4) for k, v in sps.items()})
    if device.type == "cuda":
        result.update(peak_tflops=args.peak_tflops,
                      **{f"{k}_mfu": round(flops * v / (args.peak_tflops * 1e12), 4) for k, v in sps.items()})
        print(f"{flops / 1e12:.3f} TFLOP/step; MFU raygen {result['raygen_mfu']:.1%}, "
              f"diffusers {result['diffusers_mfu']:.1%} (of {args.peak_tflops:g} TFLOPS)")
    else:
        print(f"{flops / 1e9:.1f} GFLOP/step: raygen {result['raygen_tflops'] * 1e3:.1f} GFLOP/s, "
              f"diffusers {result['diffusers_tflops'] * 1e3:.1f} GFLOP/s")
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
