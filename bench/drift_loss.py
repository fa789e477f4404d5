"""Drift computation: raygen's batched `drift` (all classes x locations of a key in one set of bmm's,
chunked) against a naive structure (a Python loop over feature keys x classes x temperatures, each
iteration solving one class's [L, G, G+U+P] problems), in one process, on the same inputs. Both compute
the official math (docs/methods/drifting.md: scale s and theta_R over the whole key batch, so
the loop does two passes over the classes, syncing once per class for the scale as a naive port does).

Checked: both give the same V (max abs difference reported). Timed: median (and best) of --repeats runs of
each, alternating. Peak memory above the inputs: on CUDA torch.cuda.max_memory_allocated after
reset_peak_memory_stats; on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) minus the resident set before the call.

    python bench/drift_loss.py [--device cpu] [--nc 16] [--repeats 3] [--threads 1]   # -> bench/results/drift_loss.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raygen.methods.drifting import DriftConfig, cfg_weight, drift, sample_omega  # noqa: E402

# One 8x8 map with 256 channels and its 7 keys (docs/methods/drifting.md), a 4x4 map's per-location key, the raw latent.
KEYS = {"map8": (64, 256), "map8_mean": (1, 256), "map8_std": (1, 256), "map8_p2_mean": (16, 256),
        "map8_p2_std": (16, 256), "map8_p4_mean": (4, 256), "map8_p4_std": (4, 256), "map4": (16, 512),
        "global": (1, 1024)}


# ---- the naive structure: loop over keys x classes x temperatures ------------------------------------

def per_class_drift(gen, pos, unc, w, temps):
    """One key, looping over classes. gen [nc, G, L, C] etc.; returns V [nc, G, L, C]."""
    nc, G, L, C = gen.shape
    U = unc.shape[1]
    as_lnc = lambda f: f.permute(1, 0, 2)  # noqa: E731  one class: [N, L, C] -> [L, N, C]
    # pass 1: the scale over the whole key batch, class by class (an .item() sync per class)
    num, den = 0.0, 0.0
    for c in range(nc):
        x, tg = as_lnc(gen[c]), torch.cat([as_lnc(gen[c]), as_lnc(unc[c]), as_lnc(pos[c])], 1)
        om = torch.cat([torch.ones(G), torch.full((U,), float(w[c])), torch.ones(pos.shape[1])]).to(x.device)
        d = torch.cdist(x, tg).clamp(min=1e-4)  # sqrt(max(|.|^2, 1e-8))
        num += float((d * om).sum())
        den += float(om.sum()) * G * L
    s = num / den
    sigma = max(s / math.sqrt(C), 1e-3)
    # pass 2: V_R per class and temperature, then theta_R over all classes
    v_r = [[None] * nc for _ in temps]
    for c in range(nc):
        x, tg = as_lnc(gen[c]), torch.cat([as_lnc(gen[c]), as_lnc(unc[c]), as_lnc(pos[c])], 1)
        om = torch.cat([torch.ones(G), torch.full((U,), float(w[c])), torch.ones(pos.shape[1])]).to(x.device)
        dn = torch.cdist(x, tg).clamp(min=1e-4) / max(s, 1e-3)
        dn[:, :, :G] += 100.0 * torch.eye(G, device=x.device)
        tg = tg / sigma
        for r, R in enumerate(temps):
            logits = -dn / R
            a = torch.sqrt((torch.softmax(logits, -1) * torch.softmax(logits, -2)).clamp(min=1e-6)) * om
            a_neg, a_pos = a[..., : G + U], a[..., G + U:]
            w_pos, w_neg = a_pos * a_neg.sum(-1, keepdim=True), a_neg * a_pos.sum(-1, keepdim=True)
            v = w_pos @ tg[:, G + U:] - w_neg @ tg[:, : G + U]
            v_r[r][c] = v  # [L, G, C]
    out = 0
    for r in range(len(temps)):
        vs = torch.stack(v_r[r])  # [nc, L, G, C]
        out = out + vs / vs.square().mean().clamp(min=1e-8).sqrt()
    return out.permute(0, 2, 1, 3)  # [nc, G, L, C]


def loop_all(feats, w, cfg):
    return {k: per_class_drift(g, p, u, w, cfg.temperatures) for k, (g, p, u) in feats.items()}


# ---- raygen: one batched call per key ------------------------------------------------------------------

def batched_all(feats, w, cfg):
    out = {}
    for k, (g, p, u) in feats.items():
        nc, G, L, C = g.shape
        prob = lambda f: f.transpose(1, 2).reshape(nc * L, f.shape[1], C)  # noqa: E731
        v = drift(prob(g), prob(p), prob(u), w.repeat_interleave(L), cfg)
        out[k] = v.view(nc, L, G, C).transpose(1, 2)
    return out


# ---- measurement ---------------------------------------------------------------------------------------

def _rss_kib(field):
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(fn, device):
    """(seconds, peak bytes above the memory in use before the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    del out
    return dt, peak - before


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nc", type=int, default=16, help="classes per step (ablation: 64)")
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--pos", type=int, default=64)
    p.add_argument("--uncond", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is steadier "
                   "on a shared machine, where two threads wait on each other whenever a core is taken")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/drift_loss[_<gpu>].json)")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    cfg = DriftConfig()
    omega = sample_omega(a.nc, g)
    w = cfg_weight(omega, a.gen, a.uncond).to(device)
    feats = {}
    for k, (L, C) in KEYS.items():
        shape = lambda n: (a.nc, n, L, C)  # noqa: E731
        gen = torch.randn(shape(a.gen), generator=g)
        feats[k] = (gen.to(device), (0.2 + torch.randn(shape(a.pos), generator=g)).to(device),
                    torch.randn(shape(a.uncond), generator=g).to(device))

    # same V: the loop transcribes the same math independently of raygen's code
    ours, ref = batched_all(feats, w, cfg), loop_all(feats, w, cfg)
    max_diff = max(float((ours[k] - ref[k]).abs().max()) for k in KEYS)
    rms = min(float(ref[k].square().mean().sqrt()) for k in KEYS)
    print(f"max |V_batched - V_loop| = {max_diff:.2e} (smallest per-key RMS of V {rms:.3f})")
    assert max_diff < 1e-3 * max(rms, 1.0), max_diff
    del ours, ref

    t_ours, t_loop, m_ours, m_loop = [], [], [], []
    for _ in range(a.repeats):  # alternate, as the machine may be shared
        dt, mem = measure(lambda: batched_all(feats, w, cfg), device)
        t_ours.append(dt), m_ours.append(mem)
        dt, mem = measure(lambda: loop_all(feats, w, cfg), device)
        t_loop.append(dt), m_loop.append(mem)
    ours_s, loop_s = statistics.median(t_ours), statistics.median(t_loop)
    ratio = loop_s / ours_s
    ratio_best = min(t_loop) / min(t_ours)  # the least disturbed run of each, on a shared machine
    problems = sum(a.nc * L for L, _ in KEYS.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{name} | {len(KEYS)} keys, {problems} problems (nc={a.nc} x locations), G={a.gen} P={a.pos} U={a.uncond}")
    for label, med, runs, mem in (("batched drift ", ours_s, t_ours, m_ours),
                                  ("per-class loop", loop_s, t_loop, m_loop)):
        print(f"{label}: {med:.3f} s (runs {', '.join(f'{t:.3f}' for t in runs)}), peak +{max(mem) / 2**20:.0f} MiB")
    print(f"speed-up (loop / batched): {ratio:.2f}x median, {ratio_best:.2f}x best run")
    result = {
        "ratio": round(ratio, 3), "ratio_best_runs": round(ratio_best, 3),
        "batched_s": round(ours_s, 4), "loop_s": round(loop_s, 4),
        "batched_runs_s": [round(t, 4) for t in t_ours], "loop_runs_s": [round(t, 4) for t in t_loop],
        "batched_peak_mib": round(max(m_ours) / 2**20, 1), "loop_peak_mib": round(max(m_loop) / 2**20, 1),
        "peak_memory": "torch.cuda.max_memory_allocated above the allocation before the call" if device.type == "cuda"
        else "peak resident set (VmHWM after /proc/self/clear_refs) above the RSS before the call",
        "max_abs_diff": max_diff,
        "config": {"nc": a.nc, "G": a.gen, "P": a.pos, "U": a.uncond, "keys": {k: list(v) for k, v in KEYS.items()},
                   "problems": problems, "temperatures": cfg.temperatures, "coupling": cfg.coupling,
                   "drift_form": cfg.drift_form, "chunk_size": cfg.chunk_size},
        "device": name, "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
    }
    if a.out:
        out = Path(a.out)
    else:
        slug = "" if device.type == "cpu" else "_" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        out = ROOT / "bench" / "results" / f"drift_loss{slug}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
