"""What time-dependent attention costs, in one process: (1) forward + backward of one DiffiT block (TMSA with
the relative-position bias as an SDPA mask, arXiv 2312.02139 Eq. 3-8) against one DiT block (adaLN-Zero,
plain attention) at the same width and token count, and against the DiffiT block without TMSA
(model.tmsa=false: the time token added to the tokens); (2) a training step (fwd + MSE + bwd) of latent
DiffiT against DiT at matched parameters (DiT's depth chosen so its count is closest to DiffiT's).

Timed in alternating blocks (the order flips every repeat) after warm-up; `ratio` = DiffiT time / DiT time
from the medians (> 1: DiffiT is slower). FLOPs per step from torch.utils.flop_counter.

    python bench/diffit_step.py                               # CPU: width 384, 256 tokens -> bench/results/diffit_step.json
    python bench/diffit_step.py --device cuda --dtype bf16    # DiffiT-XL/2-sized block, batch 32
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from raygen.nets import diffit as dfn  # noqa: E402
from raygen.nets import dit as ditn  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--width", type=int, default=None, help="block width (CPU 384, GPU 1152)")
    p.add_argument("--heads", type=int, default=None, help="(CPU 6, GPU 16)")
    p.add_argument("--grid", type=int, default=16, help="tokens a side (16: 256 tokens, ImageNet-256 at patch 2)")
    p.add_argument("--batch", type=int, default=None, help="(CPU 8, GPU 32)")
    p.add_argument("--arch", default=None, help="latent DiffiT size for part 2 (CPU DiffiT-S/2, GPU DiffiT-XL/2)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    for name, c, g in (("width", 384, 1152), ("heads", 6, 16), ("batch", 8, 32), ("arch", "DiffiT-S/2", "DiffiT-XL/2")):
        if getattr(a, name) is None:
            setattr(a, name, c if cpu else g)
    return a


def timed(fns: dict, args, sync) -> dict:
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(args.repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    b, d, n, hw = args.batch, args.width, args.grid * args.grid, (args.grid, args.grid)

    # (1) one block, same width and tokens; the conditioning vector is the width (latent DiffiT's c)
    tmsa = dfn.DiffiTBlock(d, args.heads, d, args.grid).to(dev).train()
    no_tmsa = dfn.DiffiTBlock(d, args.heads, d, args.grid, tmsa=False).to(dev).train()  # model.tmsa=false
    plain = ditn.DiTBlock(d, args.heads).to(dev).train()
    adaln = ditn.AdaLNModulations(d, 1).to(dev).train()  # DiT's per-block modulation, part of its block cost
    x = torch.randn(b, n, d, device=dev, requires_grad=True)
    c = torch.randn(b, d, device=dev)

    def diffit_block(blk):
        def fn():
            with amp():
                out = blk(x, c, hw)
            out.float().square().mean().backward()
        return fn

    step_diffit, step_no_tmsa = diffit_block(tmsa), diffit_block(no_tmsa)

    def step_dit():
        with amp():
            mods, _ = adaln(c)
            out = plain(x, mods[0])
        out.float().square().mean().backward()

    block_times = timed({"diffit": step_diffit, "dit": step_dit, "diffit_no_tmsa": step_no_tmsa}, args, sync)
    block = {k: statistics.median(v) for k, v in block_times.items()}
    block_params = {"diffit": sum(p.numel() for p in tmsa.parameters()),
                    "diffit_no_tmsa": sum(p.numel() for p in no_tmsa.parameters()),
                    "dit": sum(p.numel() for p in plain.parameters()) + sum(p.numel() for p in adaln.parameters())}

    # (2) latent networks at matched parameters
    res = args.grid * int(args.arch.split("/")[1])
    net_a = dfn.diffit(args.arch, input_size=res, in_channels=4, num_classes=1000).to(dev).train()
    size = dfn.parse_arch(args.arch)
    n_a = sum(p.numel() for p in net_a.parameters())
    best = None
    for depth in range(1, 2 * size["depth"] + 1):
        with torch.device("meta"):
            cand = ditn.DiT(input_size=res, in_channels=4, num_classes=1000, **{**size, "depth": depth})
        n_c = sum(p.numel() for p in cand.parameters())
        if best is None or abs(n_c - n_a) < abs(best[1] - n_a):
            best = (depth, n_c)
    net_b = ditn.DiT(input_size=res, in_channels=4, num_classes=1000, **{**size, "depth": best[0]}).to(dev).train()
    xl = torch.randn(b, 4, res, res, device=dev)
    tl = torch.randint(0, 1000, (b,), device=dev)
    yl = torch.randint(0, 1000, (b,), device=dev)
    target = torch.randn_like(xl)

    def train_step(net):
        def fn():
            net.zero_grad(set_to_none=True)
            with amp():
                out = net(xl, tl, yl)
            F.mse_loss(out.float(), target).backward()
        return fn

    net_times = timed({"diffit": train_step(net_a), "dit": train_step(net_b)}, args, sync)
    nets = {k: statistics.median(v) for k, v in net_times.items()}

    result = dict(
        block=dict(ratio=round(block["diffit"] / block["dit"], 4), diffit_s=round(block["diffit"], 5),
                   dit_s=round(block["dit"], 5), no_tmsa_s=round(block["diffit_no_tmsa"], 5),
                   tmsa_over_no_tmsa=round(block["diffit"] / block["diffit_no_tmsa"], 4), params=block_params, width=d, heads=args.heads, tokens=n, batch=b,
                   flops=dict(diffit=flops(step_diffit), dit=flops(step_dit), diffit_no_tmsa=flops(step_no_tmsa)),
                   times={k: [round(t, 5) for t in v] for k, v in block_times.items()}),
        latent=dict(ratio=round(nets["diffit"] / nets["dit"], 4), diffit_s=round(nets["diffit"], 4),
                    dit_s=round(nets["dit"], 4), diffit_arch=args.arch, diffit_params=n_a,
                    dit_depth=best[0], dit_params=best[1], resolution=res, batch=b,
                    flops=dict(diffit=flops(train_step(net_a)), dit=flops(train_step(net_b))),
                    times={k: [round(t, 4) for t in v] for k, v in net_times.items()}),
        device=(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"), dtype=args.dtype,
        torch_threads=torch.get_num_threads() if dev.type == "cpu" else None,
        loadavg_1min=round(os.getloadavg()[0], 2), torch=torch.__version__,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    print(f"block (width {d}, {n} tokens, batch {b}, {args.dtype}): DiffiT {block['diffit'] * 1e3:.1f} ms, "
          f"DiT {block['dit'] * 1e3:.1f} ms, DiffiT/DiT time {result['block']['ratio']:.3f}; without TMSA "
          f"(time token added) {block['diffit_no_tmsa'] * 1e3:.1f} ms, TMSA/no-TMSA {result['block']['tmsa_over_no_tmsa']:.3f}")
    print(f"latent {args.arch} ({n_a:,} params) vs DiT depth {best[0]} ({best[1]:,} params) at {res}x{res}: "
          f"DiffiT {nets['diffit']:.3f} s, DiT {nets['dit']:.3f} s, DiffiT/DiT time {result['latent']['ratio']:.3f}")
    tag = "" if dev.type == "cpu" else "_" + result["device"].lower().replace(" ", "-") + f"_{args.dtype}"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"diffit_step{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
