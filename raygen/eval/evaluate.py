"""One evaluator for every generating recipe (docs/evaluation.md).

From the EMA weights it draws `eval.num_samples` samples under the task's conditioning (class-balanced
labels today) at the method's sampler settings (or `eval.settings`), optionally sweeps one sampler
setting the method declares (`eval.sweep`: DDIM steps, CFG scale, omega, ...), and scores every set
in the feature space of one extractor against the held-out reference: FID, improved precision and
recall (k = `eval.pr_k`), the intra-class diversity ratio and, where the extractor classifies, class
accuracy. The untrained network is scored under the same protocol as a floor. Everything lands in
`eval/metrics.json` (one schema), `eval/samples*.png` and `eval/<setting>_sweep.{csv,json,png}`.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from raygen.config import ConfigError
from raygen.core.files import write_json


@dataclass
class EvalConfig:
    enabled: bool = True
    extractor: Literal["auto", "digits", "inception", "none"] = "auto"  # auto: digits on digits, else inception if weights given
    inception_weights: Optional[str] = None  # local path or URL of inception-2015-12-05.pt (TorchScript)
    num_samples: int = 1000  # class-balanced
    batch_size: int = 500
    settings: dict[str, Any] = field(default_factory=dict)  # sampler settings; unset ones: the method's defaults
    sweep: dict[str, list] = field(default_factory=dict)  # one sampler setting and its values, e.g. {steps: [10, 25]}
    sweep_samples: int = 0  # samples per sweep point; 0 = num_samples
    headline: Literal["settings", "best"] = "settings"  # best: the headline metrics are the sweep's best FID
    preview: dict[str, Any] = field(default_factory=dict)  # sampler settings of the training-time sample grids
    pr_k: int = 3  # k of the k-NN balls of improved precision / recall
    untrained_baseline: bool = True  # the untrained network under the same protocol
    seed: int = 1234
    cpus: int = 0  # CPUs for the evaluation task; 0 = every free CPU

    def validate(self):
        if self.num_samples < 2 or (self.sweep_samples and self.sweep_samples < 2):
            raise ConfigError("eval.num_samples and eval.sweep_samples must be >= 2 (FID needs a covariance)")
        if self.extractor == "inception" and not self.inception_weights:
            raise ConfigError(
                "eval.extractor=inception needs eval.inception_weights=<path or URL of inception-2015-12-05.pt>"
            )
        if len(self.sweep) > 1:
            raise ConfigError(f"eval.sweep sweeps one sampler setting, got {sorted(self.sweep)}; sweep the others "
                              "with a Tune sweep (jobs/ablate.py)")
        for key, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"eval.sweep.{key} must be a non-empty list of values, got {values!r}")
        if self.headline == "best" and not self.sweep:
            raise ConfigError("eval.headline=best picks the best point of eval.sweep; set eval.sweep.<setting>=[...]")
        if self.pr_k < 1:
            raise ConfigError("eval.pr_k must be >= 1")


def check_settings(cfg: EvalConfig, allowed: tuple[str, ...], method: str) -> None:
    """Every sampler setting named in eval.settings / eval.sweep / eval.preview must be one the method takes."""
    for section in ("settings", "sweep", "preview"):
        for key in getattr(cfg, section):
            if key not in allowed:
                raise ConfigError(f"eval.{section}.{key}: the {method} sampler has no setting {key!r}; it takes "
                                  f"{', '.join(allowed) or 'none'}")


def extractor_kind(cfg: EvalConfig, data_cfg) -> str:
    """digits | inception | none: what `eval.extractor` means for this data (None: nothing to score against)."""
    if data_cfg is None:
        return "none"
    if cfg.extractor == "auto":
        return "digits" if data_cfg.source == "digits" else ("inception" if cfg.inception_weights else "none")
    return cfg.extractor


def scored_metrics(cfg: EvalConfig, data_cfg) -> list[str]:
    """The sample-quality metrics one scored set of samples gets for this data."""
    kind = extractor_kind(cfg, data_cfg)
    if kind == "none":
        return []
    return ["fid", "precision", "recall", "diversity_ratio", *(["class_accuracy"] if kind == "digits" else [])]


def reported_metrics(cfg: EvalConfig, data_cfg, settings: tuple[str, ...]) -> list[str]:
    """Every key of eval/metrics.json a sweep may rank on, for a method with these sampler settings."""
    scored = scored_metrics(cfg, data_cfg)
    out = ["num_samples", "sample_seconds", *settings, *scored]
    if scored and cfg.untrained_baseline:
        out += ["fid_untrained", "fid_untrained_over_fid"]
    if scored and cfg.sweep:
        (key, values), = cfg.sweep.items()
        out += [f"{m}@{key}={_fmt(v)}" for v in values for m in scored]
        if cfg.headline == "best":
            out.append(f"best_{key}")
    return out


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
    """Held-out real images in [-1, 1] and labels: the set every score here is measured against."""
    from raygen.data.images import arrays, to_model_input

    images, labels = arrays(data_cfg, "test")
    batch = to_model_input({"image": images, "label": labels})
    return torch.from_numpy(batch["image"]), labels


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class Evaluator:
    """Samples a network under the task's conditioning and scores them against the reference set."""

    def __init__(self, task, cfg: EvalConfig, device: torch.device):
        from raygen.eval.fid import extract, feature_stats

        self.task, self.cfg, self.device = task, cfg, device
        # latent runs are scored on decoded pixels against the pixel source the store was made from
        data = task.pixel_data
        self.extractor = build_extractor(cfg, data)
        self.ref = None
        if self.extractor is not None:
            real, self.ref_labels = reference_images(data)
            self.ref_features = extract(self.extractor, real, cfg.batch_size)
            self.ref = feature_stats(self.ref_features)

    def sample(self, method, net, n: int, **settings) -> tuple[torch.Tensor, dict]:
        cond = self.task.conditions(n)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        bs = self.cfg.batch_size
        out = [self.task.generate(method, net, {k: v[i:i + bs] for k, v in cond.items()}, g, **settings).cpu()
               for i in range(0, n, bs)]
        return torch.cat(out), cond

    def score(self, images: torch.Tensor, cond: dict) -> dict:
        from raygen.eval.fid import extract, feature_stats, frechet_distance
        from raygen.eval.quality import diversity_ratio, precision_recall

        if self.extractor is None:
            return {}
        feats = extract(self.extractor, images, self.cfg.batch_size)
        labels = cond.get("label")
        labels = labels.numpy() if labels is not None else None
        precision, recall = precision_recall(self.ref_features, feats, k=self.cfg.pr_k)
        out = {"fid": frechet_distance(*feature_stats(feats), *self.ref), "precision": precision, "recall": recall,
               "diversity_ratio": diversity_ratio(self.ref_features, self.ref_labels if labels is not None else None,
                                                  feats, labels)}
        if hasattr(self.extractor, "predict") and labels is not None:
            out["class_accuracy"] = float((self.extractor.predict(images) == labels).mean())
        return out


def evaluate(task, ema_state: dict, run_dir: Path, cpus: int = 0) -> dict:
    """Score the EMA network of `task`; write eval/metrics.json, sample grids and the sweep; return the metrics."""
    from raygen.core.grid import save_grid

    if cpus:
        torch.set_num_threads(cpus)
    cfg: EvalConfig = task.cfg.eval
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = task.build_method()
    check_settings(cfg, type(method).sampler_settings, task.recipe)
    net = task.build_net().to(device).eval()
    net.load_state_dict(ema_state)
    ev = Evaluator(task, cfg, device)
    settings = {**method.default_settings(), **cfg.settings}
    nrow = task.num_classes or None
    per_grid = (task.num_classes or 10) * min(10, max(1, cfg.num_samples // max(1, task.num_classes)))

    def run(n: int, net_, **s) -> tuple[dict, torch.Tensor]:
        t0 = time.perf_counter()
        images, cond = ev.sample(method, net_, n, **s)
        # network evaluations per sample (a guided pass on a doubled batch counts once), where the method says
        nfe = {"nfe": method.nfe(**s)} if hasattr(method, "nfe") else {}
        return {**ev.score(images, cond), "num_samples": n, "sample_seconds": round(time.perf_counter() - t0, 2),
                **nfe}, images

    metrics: dict = {"recipe": task.recipe, "weights": "ema", "fid_features": getattr(ev.extractor, "name", None)}
    rows, headline = [], None
    if cfg.sweep:
        (key, values), = cfg.sweep.items()
        n = cfg.sweep_samples or cfg.num_samples
        for v in values:
            row, images = run(n, net, **{**settings, key: v})
            rows.append({key: v, **row})
            save_grid(images[:per_grid], out_dir / f"samples_{key}{_fmt(v)}.png", nrow=nrow,
                      upscale=task.preview_upscale)
        write_sweep(rows, out_dir / f"{key}_sweep", x=key,
                    title=f"{task.recipe}: {key} sweep ({n} samples each)")
        for r in rows:
            metrics.update({f"{m}@{key}={_fmt(r[key])}": r[m] for m in r if m not in (key, "num_samples",
                                                                                      "sample_seconds")})
        if cfg.headline == "best" and ev.extractor is not None:
            best = min(rows, key=lambda r: r["fid"])
            settings = {**settings, key: best[key]}
            metrics[f"best_{key}"] = best[key]
            if n == cfg.num_samples:
                headline = {k: v for k, v in best.items() if k != key}
    if headline is None:
        headline, images = run(cfg.num_samples, net, **settings)
        save_grid(images[:per_grid], out_dir / "samples.png", nrow=nrow, upscale=task.preview_upscale)
    else:  # the best sweep point is the headline: its grid is the main one
        (key, _), = cfg.sweep.items()
        import shutil

        shutil.copyfile(out_dir / f"samples_{key}{_fmt(settings[key])}.png", out_dir / "samples.png")
    metrics.update(headline)
    metrics.update({"settings": settings, **settings})
    if hasattr(ev.extractor, "test_accuracy"):
        metrics["classifier_test_accuracy"] = ev.extractor.test_accuracy()

    if cfg.untrained_baseline and ev.extractor is not None:
        torch.manual_seed(cfg.seed)
        untrained = task.build_net().to(device).eval()
        u, _ = run(cfg.num_samples, untrained, **settings)
        for m in scored_metrics(cfg, task.pixel_data):
            metrics[f"{m}_untrained"] = u[m]
        metrics["fid_untrained_over_fid"] = u["fid"] / max(metrics["fid"], 1e-12)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def write_sweep(rows: list[dict], stem: Path, x: str, title: str) -> None:
    """rows -> <stem>.json, <stem>.csv and a <stem>.png plot of every scored metric against `x`."""
    write_json(stem.with_suffix(".json"), rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [k for k in ("fid", "precision", "recall", "diversity_ratio", "class_accuracy") if any(k in r for r in rows)]
    if not ys:
        return
    xs = [r[x] for r in rows]
    log_x = all(isinstance(v, (int, float)) and v > 0 for v in xs) and max(xs) / min(xs) >= 10
    fig, axes = plt.subplots(1, len(ys), figsize=(4 * len(ys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], ys):
        ax.plot(xs, [r.get(k, np.nan) for r in rows], marker="o")
        ax.set_xlabel(x)
        ax.set_ylabel(k)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)
