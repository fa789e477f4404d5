"""The few-shot evaluation protocol (FSDiT): scores for images generated from K support images of
classes the generator never trained on (docs/methods/fsdit-evaluation.md).

No pretrained feature network fits 16x16 images of arbitrary classes, so the protocol trains its own
small CNN (`train_classifier`) twice, on disjoint data, for two different jobs:

(a) the *feature network* for FID, precision / recall and diversity (when no Inception weights are
    given): trained on real images of the **seen** classes, the ones the generator trained on. The
    unseen test classes are then outside its training set exactly as they are outside the generator's,
    so the feature space favours neither the generated nor the reference images of those classes.
(b) the *few-shot accuracy classifier*: trained on held-out real images of the **unseen** classes (never
    shown to the generator in training, and disjoint from the reference images that are scored), then
    asked to label each generated image. Few-shot accuracy is the fraction labelled with
    the class of the supports it was generated from; the same classifier on the reference images gives
    the ceiling (`real_accuracy`), 1 / number of classes the floor (`chance`).

`score_fewshot` computes every number from one set of generated and one set of reference images;
`support_grid` draws supports next to their generations.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raygen.core.grid import save_grid
from raygen.eval.fid import FeatureExtractor, extract, feature_stats, frechet_distance
from raygen.eval.quality import diversity_ratio, precision_recall

FEATURE_DIM = 64
TRAIN_STEPS = 600
BATCH_SIZE = 64
MAX_SHIFT = 2  # pixels, each direction: generated objects are rarely exactly where the real ones are
LEARNING_RATE = 3e-3


class FewShotNet(nn.Module):
    """Four 3x3 conv layers (16x16 -> 8x8 -> 4x4 at 16x16 input), global average pooling to a
    `feature_dim` vector (the features), and a linear head. Batch norm keeps a few hundred Adam
    steps enough; in eval mode it is a fixed affine map, so features do not depend on the batch."""

    def __init__(self, channels: int, num_classes: int, feature_dim: int = FEATURE_DIM):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.conv = nn.Sequential(
            *block(channels, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, feature_dim, 2)
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT, flip: bool = True) -> torch.Tensor:
    """Per-image random shifts of up to `max_shift` pixels (borders replicated, so no artificial frame
    appears) and random horizontal flips, drawn from `generator` (on the CPU) for reproducibility."""
    n, _, h, w = x.shape
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4, mode="replicate")
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [n, 1, h, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [n, 1, 1, w]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if flip:
        mirrored = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    return x


class FewShotClassifier(FeatureExtractor):
    """A trained `FewShotNet` as a feature extractor (`name`, `dim`, `__call__`, so `extract` and FID work)
    and as a classifier over its training labels (`predict`, `accuracy`).

    `classes` holds the label values it was trained on (sorted); `predict` answers in those values, so
    unseen-class labels such as 80..95 need no remapping. `name` carries a digest of the weights: FID is
    only comparable between statistics of the same trained network. Images are float [N, C, H, W] in
    [-1, 1] with the channels and size of the training images.
    """

    def __init__(self, net: FewShotNet, classes: np.ndarray, image_shape: tuple[int, int, int],
                 device: str | torch.device = "cpu", train_seconds: float = float("nan")):
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.classes = np.asarray(classes)
        self.image_shape = tuple(image_shape)
        self.dim = net.head.in_features
        self.train_seconds = train_seconds
        digest = hashlib.sha256()
        for key, value in net.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        self.name = f"fewshot-cnn-{digest.hexdigest()[:12]}"

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"this classifier was trained on [N, {', '.join(map(str, self.image_shape))}] images "
                             f"in [-1, 1], got shape {tuple(images.shape)}")
        return images.float().to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.net.features(self._input(images)).double().cpu().numpy()

    def features(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Penultimate features [N, dim] (float64), batched."""
        return extract(self, images, batch_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Predicted label values [N] (elements of `classes`)."""
        idx = [self.net(self._input(images[i : i + batch_size])).argmax(1).cpu() for i in range(0, len(images), batch_size)]
        return self.classes[torch.cat(idx).numpy()] if idx else self.classes[:0]

    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Fraction of `images` predicted as their `labels`."""
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"need one label per image: {len(images)} images, labels of shape {labels.shape}")
        if not len(images):
            raise ValueError("accuracy of an empty set of images is undefined")
        return float((self.predict(images) == labels).mean())


def train_classifier(images: torch.Tensor, labels, *, seed: int = 0, steps: int = TRAIN_STEPS,
                     batch_size: int = BATCH_SIZE, max_shift: int = MAX_SHIFT, flip: bool = True,
                     feature_dim: int = FEATURE_DIM, device: str | torch.device = "cpu",
                     num_threads: int | None = 1) -> FewShotClassifier:
    """Train a `FewShotClassifier` with cross-entropy on real `images` [N, C, H, W] in [-1, 1] and their
    `labels` [N] (any integer values; at least 2 classes).

    Adam with a one-cycle learning-rate schedule for `steps` mini-batches, with random shifts and
    horizontal flips (`augment`) so that it generalises to unseen images of its classes, generated ones
    included. Set `flip=False` for data whose classes differ by a mirror image. Deterministic in `seed`:
    the initialisation under `torch.manual_seed(seed)` (the caller's global RNG state is restored
    afterwards), batches and augmentation from a `torch.Generator` seeded with `seed`.

    `num_threads`: torch's intra-op CPU threads while training (the process setting is restored after;
    None keeps it). The network is so small that a second thread buys about 1.25x on free cores, while
    on busy, oversubscribed cores the threads' waits at every operator made training 10x slower; so
    one thread by default. 600 steps (the default) on ~2000 16x16 RGB images take about 19 s of one
    CPU core, whatever the number of classes.
    """
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != (len(images),):
        raise ValueError(f"need images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {labels.shape}")
    classes, targets = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {len(classes)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    start = time.perf_counter()
    device = torch.device(device)
    x = images.detach().float().to(device)
    y = torch.from_numpy(targets.reshape(-1)).long().to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FewShotNet(x.shape[1], len(classes), feature_dim).to(device)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps)
    net.train()
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        perm, pos = torch.randperm(len(x), generator=generator), 0
        for _ in range(steps):
            if pos + batch_size > len(x) and pos > 0:  # epochs without replacement; a short tail is skipped
                perm, pos = torch.randperm(len(x), generator=generator), 0
            idx = perm[pos : pos + batch_size].to(device)
            pos += batch_size
            loss = F.cross_entropy(net(augment(x[idx], generator, max_shift, flip)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return FewShotClassifier(net, classes, tuple(x.shape[1:]), device, time.perf_counter() - start)


def _by_class(features: np.ndarray, labels: np.ndarray) -> dict:
    return {c.item(): features[labels == c] for c in np.unique(labels)}


def score_fewshot(generated: torch.Tensor, gen_labels, reference: torch.Tensor, ref_labels, *,
                  extractor: FeatureExtractor, classifier: FewShotClassifier | None, pr_k: int = 3) -> dict:
    """Every few-shot metric of `generated` [N, C, H, W] (label = the class of the supports each image was
    generated from) against held-out real `reference` images of the unseen classes.

    `extractor`: the feature space of FID, precision / recall and diversity (Inception, or a
    `FewShotClassifier` trained on the seen classes). `classifier`: a `FewShotClassifier` trained on
    real images of the unseen classes that are NOT in `reference` (the caller keeps them disjoint; on
    its own training images `real_accuracy` would overstate the ceiling), or None to skip accuracy.
    Every generated class must have >= 2 reference images; every reference class is a candidate in the
    own-vs-other comparison and counts in `chance`.

    Returns a dict:
      fid_per_class {class: FID(generated_c, reference_c)}, fid_class_mean (their mean);
      fid_own_vs_other {class: {"own": FID to its own reference, "other_mean": mean FID to the other
        classes' references}}, fid_other_mean (mean of other_mean), own_closer_fraction (fraction of
        classes whose generations are closer to their own reference than to every other one);
      fid_all (all generated vs all reference, pooled), precision, recall (pooled, arXiv 1904.06991,
        k = pr_k); diversity_intra (`quality.diversity_ratio`: mean over classes of
        tr Cov(generated_c) / tr Cov(reference_c), i.e. of the mean squared pairwise feature distances:
        1 = as varied as real, 0 = one image per class); fewshot_accuracy, real_accuracy (None without
        a classifier); chance = 1 / number of classes; num_classes, num_generated, num_reference.
    """
    gen_labels, ref_labels = np.asarray(gen_labels), np.asarray(ref_labels)
    if gen_labels.shape != (len(generated),) or ref_labels.shape != (len(reference),):
        raise ValueError(f"need one label per image: generated {len(generated)} / labels {gen_labels.shape}, "
                         f"reference {len(reference)} / labels {ref_labels.shape}")
    gen_feats, ref_feats = extract(extractor, generated), extract(extractor, reference)
    gen_by, ref_by = _by_class(gen_feats, gen_labels), _by_class(ref_feats, ref_labels)
    missing = sorted(c for c in gen_by if len(ref_by.get(c, ())) < 2)
    if missing:
        raise ValueError(f"generated classes {missing} have fewer than 2 reference images; FID needs a covariance")
    small = sorted({c for by in (gen_by, ref_by) for c, f in by.items() if len(f) < 2})
    if small or len(ref_by) < 2:
        raise ValueError(f"need >= 2 reference classes and >= 2 images of every class (too few: {small})")
    if classifier is not None and hasattr(classifier, "classes"):
        if set(np.asarray(classifier.classes).tolist()) != set(ref_by):
            raise ValueError(f"the classifier knows classes {sorted(np.asarray(classifier.classes).tolist())} but "
                             f"the reference has {sorted(ref_by)}; train it on held-out images of the same classes")

    ref_stats = {c: feature_stats(f) for c, f in ref_by.items()}
    own_vs_other, fid_per_class, closer = {}, {}, []
    for c, feats in gen_by.items():
        stats = feature_stats(feats)
        row = {r: frechet_distance(*stats, *ref_stats[r]) for r in ref_by}
        others = [v for r, v in row.items() if r != c]
        fid_per_class[c] = row[c]
        own_vs_other[c] = {"own": row[c], "other_mean": float(np.mean(others))}
        closer.append(row[c] < min(others))

    precision, recall = precision_recall(ref_feats, gen_feats, k=pr_k)
    out = {
        "fid_per_class": fid_per_class,
        "fid_class_mean": float(np.mean(list(fid_per_class.values()))),
        "fid_own_vs_other": own_vs_other,
        "fid_other_mean": float(np.mean([v["other_mean"] for v in own_vs_other.values()])),
        "own_closer_fraction": float(np.mean(closer)),
        "fid_all": frechet_distance(*feature_stats(gen_feats), *feature_stats(ref_feats)),
        "precision": precision,
        "recall": recall,
        "diversity_intra": diversity_ratio(ref_feats, ref_labels, gen_feats, gen_labels),
        "fewshot_accuracy": None if classifier is None else classifier.accuracy(generated, gen_labels),
        "real_accuracy": None if classifier is None else classifier.accuracy(reference, ref_labels),
        "chance": 1.0 / len(ref_by),
        "num_classes": len(ref_by),
        "num_generated": len(generated),
        "num_reference": len(reference),
    }
    return out


def support_grid(supports: torch.Tensor, generated: torch.Tensor, path: str | os.PathLike, *,
                 max_classes: int = 20, upscale: int = 4) -> Path:
    """One row per class (the first `max_classes`): its K supports, one blank (white) tile, then its G
    generations. supports [C, K, ch, H, W], generated [C, G, ch, H, W], in [-1, 1]. Written by
    `save_grid` (atomic PNG), so the image is (K + 1 + G) * (W * upscale + 1) + 1 pixels wide and
    rows * (H * upscale + 1) + 1 high."""
    if supports.ndim != 5 or generated.ndim != 5 or supports.shape[0] != generated.shape[0] \
            or supports.shape[2:] != generated.shape[2:]:
        raise ValueError(f"need supports [C, K, ch, H, W] and generated [C, G, ch, H, W] of the same classes and "
                         f"image shape, got {tuple(supports.shape)} and {tuple(generated.shape)}")
    if max_classes < 1:
        raise ValueError(f"max_classes must be >= 1, got {max_classes}")
    supports, generated = supports[:max_classes].float().cpu(), generated[:max_classes].float().cpu()
    gap = torch.ones(len(supports), 1, *supports.shape[2:])
    rows = torch.cat([supports, gap, generated], dim=1)  # [C, K + 1 + G, ch, H, W]
    return save_grid(rows.flatten(0, 1), path, nrow=rows.shape[1], upscale=upscale)
