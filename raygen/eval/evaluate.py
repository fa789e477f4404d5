"""Evaluation of a class-conditional generator: class-balanced samples from the EMA weights, FID
against the held-out split under a pluggable extractor, class accuracy (digits), a sample grid, a
sampler step sweep (csv/json/plot), and the untrained network's FID under the same protocol.

Works with any task that offers `build_net()`, `build_method()`, `generate(method, net, labels,
generator, **sampler)`, `num_classes`, `image_shape`, `preview_upscale` and `cfg.data`.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from raygen.core.files import write_text
from raygen.config import ConfigError


@dataclass
class EvalConfig:
    enabled: bool = True
    extractor: Literal["auto", "digits", "inception", "none"] = "auto"  # auto: digits on digits, else inception if weights given
    inception_weights: Optional[str] = None  # local path or URL of inception-2015-12-05.pt (TorchScript)
    num_samples: int = 1000
    batch_size: int = 500
    cfg_scale: Optional[float] = None  # None: the method's sampler settings
    steps: Optional[int] = None
    sweep_steps: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    sweep_samples: int = 500
    untrained_baseline: bool = True
    seed: int = 1234
    cpus: int = 0  # CPUs for the evaluation task; 0 = every CPU of the local node

    def validate(self):
        if self.num_samples < 2 or self.sweep_samples < 2:
            raise ConfigError("eval.num_samples and eval.sweep_samples must be >= 2 (FID needs a covariance)")
        if self.extractor == "inception" and not self.inception_weights:
            raise ConfigError(
                "eval.extractor=inception needs eval.inception_weights=<path or URL of inception-2015-12-05.pt>"
            )


def extractor_kind(cfg: EvalConfig, data_cfg) -> str:
    """digits | inception | none: what `eval.extractor` means for this data (None: nothing to score against)."""
    if data_cfg is None:
        return "none"
    if cfg.extractor == "auto":
        return "digits" if data_cfg.source == "digits" else ("inception" if cfg.inception_weights else "none")
    return cfg.extractor


def scored_metrics(cfg: EvalConfig, data_cfg) -> list[str]:
    """The sample-quality metrics an evaluation reports for this data: FID, and class accuracy on digits."""
    kind = extractor_kind(cfg, data_cfg)
    return {"digits": ["fid", "class_accuracy"], "inception": ["fid"]}.get(kind, [])


def build_extractor(cfg: EvalConfig, data_cfg):
    kind = extractor_kind(cfg, data_cfg)
    if kind == "digits":
        if data_cfg.source != "digits":
            raise ConfigError("eval.extractor=digits only applies to data.source=digits")
        from raygen.eval.digits_classifier import DigitsClassifier

        return DigitsClassifier(data_cfg.resolution)
    if kind == "inception":
        from raygen.eval.fid import InceptionExtractor

        return InceptionExtractor(cfg.inception_weights)
    return None


def reference_images(data_cfg) -> tuple[torch.Tensor, np.ndarray]:
    """Held-out real images in [-1, 1] and labels: the statistics every FID here is measured against."""
    from raygen.data.images import arrays, to_model_input

    images, labels = arrays(data_cfg, "test")
    batch = to_model_input({"image": images, "label": labels})
    return torch.from_numpy(batch["image"]), labels


class Evaluator:
    def __init__(self, task, cfg: EvalConfig, device: torch.device):
        from raygen.eval.fid import extract, feature_stats

        self.task, self.cfg, self.device = task, cfg, device
        # latent runs are scored on decoded pixels against the pixel source the store was made from
        data = getattr(task, "pixel_data", task.cfg.data)
        self.extractor = build_extractor(cfg, data) if data is not None else None
        self.ref = None
        if self.extractor is not None:
            real, _ = reference_images(data)
            self.ref = feature_stats(extract(self.extractor, real, cfg.batch_size))

    def sample(self, method, net, n: int, **sampler) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % self.task.num_classes  # class-balanced
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        out = [self.task.generate(method, net, labels[i : i + self.cfg.batch_size], g, **sampler).cpu()
               for i in range(0, n, self.cfg.batch_size)]
        return torch.cat(out), labels

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        from raygen.eval.fid import extract, feature_stats, frechet_distance

        if self.extractor is None:
            return {}
        out = {"fid": frechet_distance(*feature_stats(extract(self.extractor, images, self.cfg.batch_size)), *self.ref)}
        if hasattr(self.extractor, "predict"):
            out["class_accuracy"] = float((self.extractor.predict(images) == labels.numpy()).mean())
        return out


def evaluate(task, ema_state: dict, run_dir: Path, cpus: int = 0) -> dict:
    """Write eval/metrics.json, eval/samples.png, eval/ddim_sweep.{csv,json,png}; return the metrics."""
    from raygen.core.grid import save_grid

    if cpus:
        torch.set_num_threads(cpus)
    cfg: EvalConfig = task.cfg.eval
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = task.build_method()
    net = task.build_net().to(device).eval()
    net.load_state_dict(ema_state)
    ev = Evaluator(task, cfg, device)
    mcfg = method.cfg
    sampler = {"steps": cfg.steps or mcfg.sample_steps,
               "cfg_scale": mcfg.cfg_scale if cfg.cfg_scale is None else cfg.cfg_scale}

    t0 = time.perf_counter()
    images, labels = ev.sample(method, net, cfg.num_samples, **sampler)
    metrics = {
        **ev.score(images, labels),
        "fid_features": getattr(ev.extractor, "name", None),
        "num_samples": cfg.num_samples,
        "sampler": mcfg.sampler,
        "steps": sampler["steps"],
        "cfg_scale": sampler["cfg_scale"],
        "eta": mcfg.eta,
        "spacing": mcfg.spacing,
        "weights": "ema",
        "sample_seconds": round(time.perf_counter() - t0, 2),
    }
    per_class = min(10, max(1, cfg.num_samples // task.num_classes))
    grid = images[: per_class * task.num_classes]
    save_grid(grid, out_dir / "samples.png", nrow=task.num_classes, upscale=task.preview_upscale)
    if hasattr(ev.extractor, "test_accuracy"):
        metrics["classifier_test_accuracy"] = ev.extractor.test_accuracy()

    if cfg.untrained_baseline and ev.extractor is not None:
        torch.manual_seed(cfg.seed)
        untrained = task.build_net().to(device).eval()
        u_images, u_labels = ev.sample(method, untrained, cfg.num_samples, **sampler)
        u = ev.score(u_images, u_labels)
        metrics["fid_untrained"] = u["fid"]
        metrics["fid_untrained_over_fid"] = u["fid"] / max(metrics["fid"], 1e-12)
        if "class_accuracy" in u:
            metrics["class_accuracy_untrained"] = u["class_accuracy"]

    if mcfg.sampler == "ddim" and cfg.sweep_steps:
        rows = []
        for steps in cfg.sweep_steps:
            t0 = time.perf_counter()
            s_images, s_labels = ev.sample(method, net, cfg.sweep_samples, steps=steps,
                                           cfg_scale=sampler["cfg_scale"])
            rows.append({"steps": steps, "cfg_scale": sampler["cfg_scale"], "num_samples": cfg.sweep_samples,
                         **ev.score(s_images, s_labels), "seconds": round(time.perf_counter() - t0, 2)})
        write_sweep(rows, out_dir / "ddim_sweep", x="steps", title=f"DDIM step sweep ({cfg.sweep_samples} samples)")
        for r in rows:
            metrics.update({f"{k}@steps={r['steps']}": r[k] for k in ("fid", "class_accuracy") if k in r})
    _write_json(out_dir / "metrics.json", metrics)
    return metrics


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_sweep(rows: list[dict], stem: Path, x: str, title: str, xscale: str = "log") -> None:
    """rows -> <stem>.json, <stem>.csv and a <stem>.png plot of every numeric metric against `x`."""
    _write_json(stem.with_suffix(".json"), rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [k for k in ("fid", "class_accuracy") if any(k in r for r in rows)]
    if not ys:
        return
    fig, axes = plt.subplots(1, len(ys), figsize=(4.5 * len(ys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], ys):
        ax.plot([r[x] for r in rows], [r.get(k, np.nan) for r in rows], marker="o")
        ax.set_xlabel(x)
        ax.set_ylabel(k)
        ax.set_xscale(xscale)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)
