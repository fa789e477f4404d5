"""Training-loop overhead: raygen's loop under TorchTrainer (1 worker, Ray Data shard, logging,
checkpoints, EMA) against a plain PyTorch loop over the same model, data, batch and update rule,
in one run. Steady-state steps/s exclude start-up, which is reported separately.

    python bench/train_overhead.py [--steps 300] [key=value ...]   # overrides of the DiT default preset
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raygen.cli import init_ray, preset_dir  # noqa: E402
from raygen.config import load_config  # noqa: E402
from raygen.data.images import arrays, to_model_input  # noqa: E402
from raygen.recipes.dit import DiTConfig, DiTTask  # noqa: E402
from raygen.train.driver import fit  # noqa: E402
from raygen.train.logging import read_metrics  # noqa: E402
from raygen.train.state import EMA, lr_factor  # noqa: E402


def plain_loop(task: DiTTask, steps: int, warmup: int, window: int) -> tuple[list[float], float]:
    """The loop a researcher writes by hand: tensors in memory, a reshuffle per epoch, the same loss,
    AdamW, clipping, LR schedule and EMA. Returns (steps/s of each `window` steps after `warmup`,
    seconds before the first step)."""
    t_start = time.perf_counter()
    cfg = task.cfg
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.train.seed)
    batch = to_model_input(dict(zip(("image", "label"), arrays(cfg.data, "train"))))
    x, y = torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])
    net, method = task.build_net(), task.build_method()
    ema = EMA(net, cfg.train)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(0)
    bs, perm, pos = cfg.train.batch_size, torch.randperm(len(x), generator=g), 0
    startup = time.perf_counter() - t_start
    rates, t0 = [], time.perf_counter()
    for step in range(warmup + steps):
        if step >= warmup and (step - warmup) % window == 0:
            if step > warmup:
                rates.append(window / (time.perf_counter() - t0))
            t0 = time.perf_counter()
        if pos + bs > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos : pos + bs]
        pos += bs
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.schedule)
        loss = method.loss(net, {"image": x[idx], "label": y[idx]}, g).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net, step)
    rates.append(window / (time.perf_counter() - t0))
    return rates, startup


def raygen_loop(task: DiTTask, warmup_steps: int) -> tuple[list[float], float, float]:
    """Returns (steps/s of each logged window after `warmup_steps`, start-up s, total s)."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        fit(task, Path(d))
        total = time.perf_counter() - t0
        records = read_metrics(Path(d))
    rates = [r["steps_per_s"] for r in records if r["step"] > warmup_steps]
    startup = total - task.cfg.train.steps / statistics.median(rates)
    return rates, startup, total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg, _ = load_config(DiTConfig, preset="default", preset_dir=preset_dir("dit"), overrides=[
        f"train.steps={a.steps + a.warmup}", "train.log_every=25", f"train.ckpt_every={a.steps + a.warmup}",
        f"train.sample_every={10 * (a.steps + a.warmup)}", "eval.enabled=false", *a.overrides])
    task = DiTTask(cfg)
    init_ray()
    # plain loop before and after the raygen run, so drifts of a shared machine hit both sides;
    # every side is summarised by the median of its 25-step windows
    before, base_startup = plain_loop(task, a.steps, a.warmup, window=25)
    ray_rates, ray_startup, total = raygen_loop(task, a.warmup)
    after, _ = plain_loop(task, a.steps, a.warmup, window=25)
    base_rate, ray_rate = statistics.median(before + after), statistics.median(ray_rates)
    print(f"plain PyTorch loop : {base_rate:.3f} steps/s (before {statistics.median(before):.3f}, after "
          f"{statistics.median(after):.3f}; start-up {base_startup:.1f} s)")
    print(f"raygen TorchTrainer: {ray_rate:.3f} steps/s (start-up {ray_startup:.1f} s, total {total:.1f} s)")
    ratio = ray_rate / base_rate
    print(f"ratio (raygen / plain, steady state): {ratio:.3f}")
    out = ROOT / "bench" / "results" / "train_overhead.json"
    out.write_text(json.dumps({
        "ratio": round(ratio, 4),
        "raygen_steps_per_s": round(ray_rate, 4), "plain_steps_per_s": round(base_rate, 4),
        "raygen_startup_s": round(ray_startup, 2), "plain_startup_s": round(base_startup, 2),
        "steps_timed": a.steps, "warmup_steps": a.warmup, "batch_size": cfg.train.batch_size,
        "model": cfg.model.arch, "data": f"{cfg.data.source} {cfg.data.resolution}x{cfg.data.resolution}",
        "logging": {"tensorboard": cfg.log.tensorboard, "wandb": cfg.log.wandb, "jsonl": True},
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
