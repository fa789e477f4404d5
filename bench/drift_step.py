"""One full drifting training step and where its time goes: generator forward, MAE features of the
generated samples (forward), MAE features of the real samples (forward, no grad), the drift over all
keys, and the backward through MAE and generator, plus the optimizer step.

    python bench/drift_step.py --device cuda            # the ablation step: B/2, MAE W256, nc 64, G=P=64, U=16
    python bench/drift_step.py --tiny                   # the digits default's sizes, on CPU

Each part is timed with the device synchronised around it, over `--repeats` steps after one warm-up
step; results go to bench/results/drift_step[_<device>].json. This is a breakdown, not a comparison:
the drift's own comparison with a per-class loop is bench/drift_loss.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from raygen.methods.drifting import DriftConfig, drifting_loss, sample_omega
from raygen.nets.drift_dit import draw_style, drift_dit
from raygen.nets.mae import LatentMAE


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the digits default: T/2 on 1x16x16, MAE W16, nc 10, G=P=32, U=8")
    p.add_argument("--nc", type=int, default=None, help="classes per step on this device (ablation: 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    if a.tiny:
        shape, arch, width, nc, G, P, U, maps = (1, 16, 16), "DriftDiT-T/2", 16, 10, 32, 32, 8, ["layer1", "layer2", "layer3", "layer4"]
    else:
        shape, arch, width, nc, G, P, U, maps = (4, 32, 32), "DriftDiT-B/2", 256, 64, 64, 64, 16, None
    nc = a.nc or nc
    amp = dev.type == "cuda"
    gen_net = drift_dit(arch, input_size=shape[1], in_channels=shape[0], num_classes=1000 if not a.tiny else 10).to(dev)
    for q in gen_net.parameters():  # a trained-like network: the zero-initialised output would short-cut the MAE grads
        if q.dim() > 1 and q.abs().sum() == 0:
            torch.nn.init.normal_(q, std=0.02)
    mae = LatentMAE(in_channels=shape[0], width=width, input_size=shape[1]).to(dev).requires_grad_(False).eval()
    opt = torch.optim.AdamW(gen_net.parameters(), lr=1e-4)
    cfg = DriftConfig()
    g = torch.Generator(device=dev).manual_seed(0)
    labels = torch.arange(nc, device=dev) % (10 if a.tiny else 1000)
    real = torch.randn(nc * (P + U), *shape, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        t = {}
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            omega = sample_omega(nc, g).to(dev)
            noise = torch.randn(nc * G, *shape, generator=g, device=dev)
            x = gen_net(noise, labels.repeat_interleave(G), omega.repeat_interleave(G), draw_style(nc * G, g).to(dev))
            sync(); t1 = time.perf_counter(); t["generator_fwd"] = t1 - t0
            fg = {k: v.unflatten(0, (nc, G)) for k, v in mae.features(x, layers=maps).items()}
            sync(); t2 = time.perf_counter(); t["mae_fwd_generated"] = t2 - t1
            with torch.no_grad():
                fr = mae.features(real, layers=maps)
            sync(); t3 = time.perf_counter(); t["mae_fwd_real"] = t3 - t2
        fp = {k: v[: nc * P].unflatten(0, (nc, P)) for k, v in fr.items()}
        fu = {k: v[nc * P:].unflatten(0, (nc, U)) for k, v in fr.items()}
        loss, _ = drifting_loss(fg, fp, fu, omega, cfg)
        sync(); t4 = time.perf_counter(); t["drift_and_loss"] = t4 - t3
        loss.backward()
        sync(); t5 = time.perf_counter(); t["backward_mae_and_generator"] = t5 - t4
        torch.nn.utils.clip_grad_norm_(gen_net.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(); t["optimizer"] = time.perf_counter() - t5
        t["total"] = time.perf_counter() - t0
        return t

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [step() for _ in range(a.repeats)]
    med = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    share = {k: round(v / med["total"], 3) for k, v in med.items() if k != "total"}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    result = {"device": name, "device_type": dev.type, "arch": arch, "mae_width": width, "sample_shape": list(shape),
              "nc": nc, "G": G, "P": P, "U": U, "maps": maps or "all 12", "amp_bf16": amp,
              "keys": len(mae.feature_keys(maps)), "median_seconds": med, "share_of_step": share,
              "peak_gpu_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
              "threads": torch.get_num_threads(), "repeats": a.repeats}
    print(json.dumps(result, indent=2))
    tag = "_tiny" if a.tiny else ""
    dev_tag = "" if dev.type == "cpu" else "_" + name.lower().replace(" ", "-")
    out = Path(a.out or Path(__file__).parent / "results" / f"drift_step{tag}{dev_tag}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
