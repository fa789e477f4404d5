"""Few-shot episodes: which classes are seen in training and which are kept for evaluation, and which
images form each episode (one target image and `shots` support images of the same class).

Everything here is a pure function of the labels of a listing, the class ids and a seed (numpy only),
so the tables can be rebuilt anywhere and compared exactly. Positions are indices into the listing
(the same positions a store is indexed by).

    split_classes(names)                        -> {"train": ids, "val": ids, "test": ids}  (disjoint)
    episode_table(labels, ids, sets, shots, s)  -> {"target", "supports", "label", "set", "rotation"}
    holdout(labels, ids, per_class_reference)   -> (support pool, reference images) of unseen classes

An episode table draws, for every class and each of `sets` sets, `shots + 1` distinct images; each of
them in turn is the target and the others are its supports (the `shots + 1` rotations of a set), so
every image drawn is generated once from the rest. Rows are ordered "stratified round-robin": each
class's episodes are shuffled, then classes take turns, so any prefix of n * len(classes) rows holds n
episodes of every class (a run that stops early has still seen all classes equally).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["DEFAULT_SPLIT", "SPLITS", "episode_table", "holdout", "split_classes"]

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = (60, 16, 20)  # miniImageNet's class split (Vinyals et al. 2016, Ravi & Larochelle 2017)


def split_classes(class_names: Sequence[str], split: Sequence[int] = DEFAULT_SPLIT, seed: int = 42) -> dict:
    """Disjoint train/val/test class ids (positions in `class_names`, i.e. listing labels), each list
    sorted. The names are sorted before the seeded permutation, so the split depends on which classes
    there are and on `seed`, not on the order the source lists them in. Classes beyond the sum of the
    counts are left out."""
    counts = [int(c) for c in split]
    n = len(class_names)
    shown = "/".join(str(c) for c in counts)
    if len(counts) != 3 or any(c < 0 for c in counts):
        raise ValueError(f"split={shown} must be three class counts >= 0 (train/val/test), e.g. split=60/16/20")
    if sum(counts) > n:
        raise ValueError(f"split={shown} needs {sum(counts)} classes but there are only {n}; lower the counts "
                         f"so they sum to at most {n}")
    by_name = sorted(range(n), key=lambda i: (class_names[i], i))
    order = [by_name[j] for j in np.random.default_rng(seed).permutation(n)]
    out, start = {}, 0
    for name, count in zip(SPLITS, counts):
        out[name] = sorted(order[start:start + count])
        start += count
    return out


def _class_positions(labels: np.ndarray, classes: Sequence[int], need: int, what: str, fix: str) -> list[np.ndarray]:
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # positions grouped by class, ascending within each
    sorted_labels = labels[order]
    found = []
    for c in classes:
        lo, hi = np.searchsorted(sorted_labels, c, "left"), np.searchsorted(sorted_labels, c, "right")
        idx = order[lo:hi]
        if len(idx) < need:
            raise ValueError(f"class {int(c)} has {len(idx)} images but {what} needs at least {need} per class; "
                             f"{fix}")
        found.append(idx.astype(np.int64))
    return found


def _generator(seed: int, label: int, *stream: int) -> np.random.Generator:
    """One generator per class: a class's draws do not depend on which other classes are in the table."""
    return np.random.default_rng([int(seed), int(label), *stream])


def episode_table(labels: np.ndarray, classes: Sequence[int], sets: int, shots: int, seed: int) -> dict:
    """The episodes of `classes`: for each class, `sets` draws of `shots + 1` distinct images (without
    replacement within a draw), each draw giving `shots + 1` episodes (rotation r: target = the r-th
    image, supports = the others in draw order). Rows are stratified round-robin over `classes` (see the
    module docstring). Returns int64 `target` [E], `supports` [E, shots], `label` [E] and int32 `set`,
    `rotation` [E], with E = len(classes) * sets * (shots + 1); positions index `labels`."""
    if sets < 1 or shots < 1:
        raise ValueError(f"sets and shots must be >= 1, got sets={sets}, shots={shots}")
    k = shots + 1
    per_class = sets * k
    positions = _class_positions(labels, classes, k, f"shots={shots} (a target and {shots} supports)",
                                 "add images to it, leave the class out, or lower shots")
    others = np.array([[j for j in range(k) if j != r] for r in range(k)], dtype=np.int64)  # [k, shots]
    rotation = np.tile(np.arange(k, dtype=np.int32), sets)
    set_index = np.repeat(np.arange(sets, dtype=np.int32), k)
    cols = {name: [] for name in ("target", "supports", "label", "set", "rotation")}
    for c, idx in zip(classes, positions):
        rng = _generator(seed, c)
        # `sets` independent draws of k of this class's images: the k smallest of fresh uniform keys, in
        # the order of their keys (a uniformly random ordered k-subset, without sorting every image)
        keys = rng.random((sets, len(idx)))
        first = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < len(idx) else np.tile(np.arange(k), (sets, 1))
        first = np.take_along_axis(first, np.argsort(np.take_along_axis(keys, first, axis=1), axis=1), axis=1)
        chosen = idx[first]  # [sets, k]
        order = _generator(seed + 1, c).permutation(per_class)
        cols["target"].append(chosen.reshape(-1)[order])
        cols["supports"].append(chosen[:, others].reshape(per_class, shots)[order])
        cols["label"].append(np.full(per_class, int(c), np.int64))
        cols["set"].append(set_index[order])
        cols["rotation"].append(rotation[order])
    if not positions:
        return {"target": np.zeros(0, np.int64), "supports": np.zeros((0, shots), np.int64),
                "label": np.zeros(0, np.int64), "set": np.zeros(0, np.int32), "rotation": np.zeros(0, np.int32)}
    # round-robin: row j * C + i is the j-th (shuffled) episode of the i-th class
    return {name: np.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:]) for name, parts in cols.items()}


def holdout(labels: np.ndarray, classes: Sequence[int], per_class_reference: int, seed: int) -> tuple:
    """Evaluation of unseen classes: per class, `per_class_reference` images held out as the reference
    (what generated images are compared with; never shown as supports) and the rest as the support pool.
    Returns (support_pool, reference), sorted int64 positions into `labels`; deterministic in `seed`.
    Episodes that draw supports from the pool only: `episode_table(np.where(np.isin(np.arange(len(labels)),
    reference), -1, labels), classes, ...)`."""
    if per_class_reference < 1:
        raise ValueError(f"per_class_reference must be >= 1, got {per_class_reference}")
    positions = _class_positions(labels, classes, per_class_reference + 1,
                                 f"per_class_reference={per_class_reference} (plus a support pool)",
                                 "add images to it, leave the class out, or lower per_class_reference")
    pool, reference = [], []
    for c, idx in zip(classes, positions):
        perm = idx[_generator(seed, c, 2).permutation(len(idx))]  # a stream of its own, apart from the tables
        reference.append(perm[:per_class_reference])
        pool.append(perm[per_class_reference:])
    cat = (lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64))
    return cat(pool), cat(reference)
