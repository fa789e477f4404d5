"""The few-shot evaluation of an FSDiT run (docs/methods/fsdit-evaluation.md): for every unseen class,
episodes of `shots` supports drawn from its support pool, generations from each, scored against the
class's held-out real images (never supports) by raygen.eval.fewshot."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

REPORTED = ("fewshot_accuracy", "real_accuracy", "chance", "fid_class_mean", "fid_other_mean", "own_closer_fraction",
            "fid_all", "precision", "recall", "diversity_intra", "num_generated", "sample_seconds", "steps",
            "cfg_scale")
SEEN_PER_CLASS = 40  # real images per seen class for the feature network
CHUNK = 256  # samples per sampler call


def listing_labels(store) -> np.ndarray:
    """Labels by listing position (the episode tables' index), from the store's own copy of the listing."""
    from raygen.data.store import LISTING

    return np.load(store.path / LISTING)["labels"].astype(np.int64)


def evaluate_fewshot(task, ema_params, run_dir) -> dict:
    import jax
    import torch

    from raygen.core.files import write_json
    from raygen.core.grid import save_grid
    from raygen.data.episodes import holdout
    from raygen.data.fewshot_prep import load_split
    from raygen.eval.fewshot import score_fewshot, support_grid, train_classifier

    cfg, ev = task.cfg, task.cfg.eval
    data = task.data
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    split = load_split(cfg.stage.episodes)
    unseen = [int(c) for c in split["splits"][ev.split]["class_ids"]]
    seen = [int(c) for c in split["splits"]["train"]["class_ids"]]
    labels = listing_labels(data.targets)
    # three disjoint sets per unseen class: the FID reference, the judge's training images, the support
    # pool; a generator that copied its supports could not pass the judge by sharing its training images
    pool, reference = holdout(labels, unseen, ev.reference_per_class, ev.seed)
    rest = labels.copy()
    rest[reference] = -1
    pool, judged = holdout(rest, unseen, ev.judge_per_class, ev.seed + 1)
    rng = np.random.default_rng(ev.seed)

    def pixels(idx) -> torch.Tensor:
        return torch.from_numpy(np.asarray(task.to_pixels(data.x(idx)), np.float32))

    # the feature space: a network trained on real images of the seen classes only
    seen_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:SEEN_PER_CLASS] for c in seen])
    t0 = time.perf_counter()
    features = train_classifier(pixels(seen_idx), labels[seen_idx], seed=ev.seed, steps=ev.classifier_steps)
    # the judge: a classifier trained on real images of the unseen classes, none of them a support or a reference
    judge = train_classifier(pixels(judged), labels[judged], seed=ev.seed + 1, steps=ev.classifier_steps)
    print(f"eval: feature network ({len(seen)} seen classes) and judge ({len(unseen)} unseen classes) trained in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    # episodes: per unseen class, episodes_per_class draws of `shots` supports from its pool
    supports, gen_labels = [], []
    for c in unseen:
        mine = pool[labels[pool] == c]
        for _ in range(ev.episodes_per_class):
            supports.append(rng.choice(mine, size=task.shots, replace=False))
            gen_labels.append(c)
    supports = np.repeat(np.stack(supports), ev.samples_per_episode, axis=0)  # [N, K]
    gen_labels = np.repeat(np.asarray(gen_labels), ev.samples_per_episode)
    method = task.build_method()
    settings = {**method.default_settings(), **ev.settings}
    net = task.build_net().bind({"params": jax.device_put(ema_params)})
    key = jax.random.key(ev.seed)
    t0 = time.perf_counter()
    generated = []
    for i in range(0, len(supports), CHUNK):
        cond = data.cond(supports[i:i + CHUNK])
        noise = jax.random.normal(jax.random.fold_in(key, i), (len(cond["pooled"]), *task.target_shape))
        generated.append(task.to_pixels(np.asarray(method.sample(net, noise, cond, None, **settings))))
    generated = torch.from_numpy(np.concatenate(generated).astype(np.float32))
    sample_seconds = time.perf_counter() - t0

    scores = score_fewshot(generated, gen_labels, pixels(reference), labels[reference], extractor=features,
                           classifier=judge, pr_k=ev.pr_k)
    per_class = ev.episodes_per_class * ev.samples_per_episode
    first = np.arange(len(unseen)) * per_class
    support_grid(pixels(supports[first].reshape(-1)).reshape(len(unseen), task.shots, *generated.shape[1:]),
                 generated.reshape(len(unseen), per_class, *generated.shape[1:])[:, :min(per_class, 8)],
                 out_dir / "fewshot_grid.png", max_classes=len(unseen), upscale=task.preview_upscale)
    save_grid(generated[:min(len(generated), 8 * per_class)], out_dir / "samples.png", nrow=per_class,
              upscale=task.preview_upscale)
    names = split["splits"][ev.split]["class_names"]
    name_of = dict(zip(unseen, names))
    metrics = {k: scores[k] for k in REPORTED if k in scores}
    metrics.update(num_generated=len(generated), sample_seconds=sample_seconds, steps=int(settings["steps"]),
                   cfg_scale=float(settings["cfg_scale"]), split=ev.split, num_classes=len(unseen))
    write_json(out_dir / "metrics.json", {
        **metrics,
        "fid_per_class": {name_of[int(c)]: v for c, v in scores["fid_per_class"].items()},
        "fid_own_vs_other": {name_of[int(c)]: v for c, v in scores["fid_own_vs_other"].items()},
        "protocol": {"episodes_per_class": ev.episodes_per_class, "samples_per_episode": ev.samples_per_episode,
                     "shots": task.shots, "reference_per_class": ev.reference_per_class,
                     "feature_network": f"trained on {len(seen_idx)} real images of the {len(seen)} seen classes",
                     "judge": f"trained on {len(judged)} real images of the {len(unseen)} unseen classes, disjoint "
                              "from the supports and the reference"},
    })
    return metrics  # the job prints them (a worker's print could arrive after the job's last line)
