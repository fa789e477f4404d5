"""Class-balanced batches drawn by index, for methods whose step is a set of classes (drifting:
nc classes x P positives and U unconditional negatives per step, arXiv 2602.04770 Sec. 4 and A.8).

Every stream here is a pure function of (seed, step, rank), so a resumed run continues it exactly:
`uniform` draws the step's classes and items from generators seeded by the step; `queue` is the
release's memory bank, rebuilt on resume by replaying its pushes.
"""
from __future__ import annotations

import math
import queue
import threading
from collections import deque
from typing import Iterator, Optional

import numpy as np

from raygen.config import ConfigError
from raygen.data import images as image_data
from raygen.data.store import Store, class_index


class ClassIndexedData:
    """Random access to the training set by class: the embedded images in memory, or a store
    memory-mapped (the positions of each class from the store's class index, rows read on demand)."""

    def __init__(self, data_cfg: image_data.ImageDataConfig, flips: str = "random"):
        self.cfg, self.flips = data_cfg, flips
        self.images: Optional[np.ndarray] = None
        if data_cfg.source in image_data.STORE_SOURCES:
            store = Store(data_cfg.path)
            name = image_data.STORE_ARRAY[store.meta["kind"]]
            self.pixels = name == "image"  # uint8 pixels: scaled to [-1, 1] as they are read
            self.labels = image_data.store_labels(store.meta, store.labels)
            self._arrays = [store.array(name)]
            if flips == "random" and f"{name}_flip" in store.array_names:
                self._arrays.append(store.array(f"{name}_flip"))
            self.num_classes = len(store.class_names)
            self.by_class = [store.class_indices(c) for c in range(self.num_classes)]
        else:
            images, self.labels = image_data.arrays(data_cfg, "train")
            self.images = image_data.to_model_input({"image": images, "label": self.labels})["image"]
            self.num_classes = len(image_data.class_names(data_cfg))
            self.by_class = class_index(self.labels, self.num_classes)
        empty = [c for c in range(self.num_classes) if len(self.by_class[c]) == 0]
        if empty:
            raise ConfigError(f"{data_cfg.path or data_cfg.source}: class(es) {empty} have no training items; "
                              "class-balanced batches need items of every class")

    def rows(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        flat = idx.reshape(-1)
        if self.images is not None:
            out = self.images[flat]
        else:
            # memmap reads in sorted order (fancy indexing sorts per shard anyway), one copy per row
            out = np.empty((len(flat), *self._arrays[0][flat[:1]].shape[1:]), np.float32)
            pick = rng.integers(0, len(self._arrays), len(flat))
            for k, arr in enumerate(self._arrays):
                sel = np.flatnonzero(pick == k)
                if len(sel):
                    out[sel] = arr[flat[sel]]
            if self.pixels:
                out = out / 127.5 - 1.0
        return out.reshape(*idx.shape, *out.shape[1:])

    def sample(self, classes: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
        """[len(classes), per_class] positions, without replacement where the class is large enough."""
        out = np.empty((len(classes), per_class), np.int64)
        for row, c in enumerate(classes):
            pool = self.by_class[int(c)]
            out[row] = rng.choice(pool, per_class, replace=len(pool) < per_class)
        return out


class MemoryBank:
    """The release's queues (arXiv 2602.04770 A.8) as a function of the step: micro-step i pushes
    `push` random items drawn from a generator seeded by (seed, i); class c's queue holds the last
    `class_size` pushed items of class c, the global queue the last `global_size`. `at(i)` replays the
    pushes up to step i (integers only), so a resumed run has exactly the queues it had. Before step 0
    the bank is pre-filled with ceil(global_size / push) pushes."""

    def __init__(self, labels: np.ndarray, num_classes: int, push: int, class_size: int, global_size: int,
                 seed: int):
        self.labels, self.push, self.seed = labels, push, seed
        self.per_class = [deque(maxlen=class_size) for _ in range(num_classes)]
        self.everything: deque = deque(maxlen=global_size)
        self.next = -math.ceil(global_size / push)  # the pre-fill: steps -ceil(global_size / push) .. -1
        self.last = np.zeros(0, np.int64)

    def pushed(self, step: int) -> np.ndarray:
        # seed entropy must be non-negative: the pre-fill steps are negative
        return np.random.default_rng([self.seed, 0x9E3779B9, step + (1 << 40)]).integers(0, len(self.labels), self.push)

    def at(self, step: int) -> "MemoryBank":
        """The bank after the push of micro-step `step`."""
        while self.next <= step:
            items = self.pushed(self.next)
            for i in items:
                self.per_class[self.labels[i]].append(i)
            self.everything.extend(items)
            self.last, self.next = items, self.next + 1
        return self

    def positives(self, c: int, n: int, rng: np.random.Generator, fallback: np.ndarray) -> np.ndarray:
        """n items of class c from its queue (with replacement when it holds fewer; from the whole
        class while its queue is still empty)."""
        pool = np.fromiter(self.per_class[c], np.int64) if self.per_class[c] else fallback
        return rng.choice(pool, n, replace=len(pool) < n)

    def negatives(self, shape, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.fromiter(self.everything, np.int64), shape)


def class_balanced_batches(data: ClassIndexedData, b, *, start: int, per_micro: int, rank: int, world: int,
                           seed: int, by_index: bool) -> Iterator[tuple[int, dict]]:
    """Endless (micro-step after the batch, batch) of `b.pos` positives and `b.uncond` negatives for
    each of this worker's classes. Micro-step i draws `per_micro` classes from a generator seeded by
    (seed, i), the same on every worker, and each worker takes its slice; items come from a generator
    seeded by (seed, i, rank). `b` is the recipe's batch section (sampler, pos, uncond, queue sizes).
    With `by_index` the batch carries positions (`pos_idx`, `uncond_idx`) instead of rows."""
    local = per_micro // world
    bank = (MemoryBank(data.labels, data.num_classes, b.push_per_step, b.class_queue, b.global_queue, seed)
            if b.sampler == "queue" else None)
    i = start
    while True:
        if bank is not None:  # the release: classes of the pushed batch, positives from their queues
            bank.at(i)
            classes = data.labels[bank.last[:per_micro]][rank * local:(rank + 1) * local]
            rng = np.random.default_rng([seed, i, rank])
            pos = np.stack([bank.positives(int(c), b.pos, rng, data.by_class[int(c)]) for c in classes])
            unc = bank.negatives((len(classes), b.uncond), rng)
        else:
            rng = np.random.default_rng([seed, i])
            classes = rng.choice(data.num_classes, per_micro,
                                 replace=not b.distinct_classes or per_micro > data.num_classes)
            classes = classes[rank * local:(rank + 1) * local]
            rng = np.random.default_rng([seed, i, rank])
            pos = data.sample(classes, b.pos, rng)
            unc = rng.integers(0, len(data.labels), (len(classes), b.uncond))
        batch = {"label": classes.astype(np.int64)}
        if by_index:
            batch.update(pos_idx=pos, uncond_idx=unc)
        else:
            batch.update(pos=data.rows(pos, rng), uncond=data.rows(unc, rng))
        i += 1
        yield i, batch


def prefetch(iterator, depth: int = 2):
    """Run a batch iterator in a thread, `depth` batches ahead (memmap reads off the training thread)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surfaces in the training thread
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
