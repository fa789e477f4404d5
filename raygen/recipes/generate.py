"""`jobs/generate.py`: samples of any trained generating run, one image per seed, as EDM's generate.py
(Karras et al., arXiv 2206.00364) makes them for FID:

    python jobs/generate.py run=<run dir> seeds=0-49999 sampler.steps=18 [format=png|npz] [class=<int>|balanced]
                            [batch=64] [workers=N] [out=<dir>]

The run's recipe (from its exported `net_ema.pt`, else its latest checkpoint) rebuilds the task and the method
from the run's config.yaml; the EMA weights go to one Ray actor per GPU (or per share of the free CPUs). The
seeds are cut into fixed batches; each batch draws its noise from a SeedStack of its seeds (raygen.core.rng),
so image k's noise and every other random draw depend on seed k only, whichever batch, worker or resume
draws it. Labels are class-balanced by
seed (seed % num_classes) unless `class=` fixes one.

Output (docs/generate-and-fid.md): EDM's --subdirs layout `<out>/<seed//1000*1000:06d>/<seed:06d>.png`, every
file written under a temporary name and renamed; or with format=npz one shard per batch, then
`<out>/samples.npz` (`images` uint8 [N, H, W, C], `labels`, `seeds`). A rerun with the same arguments skips the
seeds already written; `<out>/manifest.json` records what the samples are (run, weights, sampler settings,
labels, seeds) and a rerun with anything else is refused. The job ends with `samples: <path>` and the job
contract's last line `run_dir: <out>`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from raygen.config import ConfigError
from raygen.eval.fid_protocol import parse_seeds, seeds_text

JOB = "generate"
MANIFEST = "manifest.json"
SAMPLES_NPZ = "samples.npz"
SHARDS = "shards"
# manifest keys that decide what the images are: a rerun into the same out dir must match all of them
IDENTITY = ("run", "recipe", "weights", "settings", "labels", "seeds", "format", "device")


@dataclass
class GenerateConfig:
    run: Optional[str] = None  # the run directory (config.yaml + net_ema.pt or checkpoints/)
    num: Optional[int] = None  # seeds 0..num-1 when `seeds` is unset
    seeds: Optional[str] = None  # EDM's form: 0-49999, or 0,5,10-20
    sampler: dict[str, Any] = field(default_factory=dict)  # sampler settings of the run's method, e.g. steps
    format: Literal["png", "npz"] = "png"
    batch: int = 64  # samples per network batch (EDM's --batch)
    workers: int = 0  # 0: one per GPU, else one per free CPU; N: N workers
    use_gpu: Optional[bool] = None  # null: GPUs when the cluster has them
    out: Optional[str] = None  # default: <runs-root>/generate/<run dir name>
    label: str = "balanced"  # `class=` on the command line: balanced (seed % num_classes) or one class index

    def validate(self):
        if not self.run:
            raise ConfigError("run=<run directory> is required: the run whose EMA weights generate")
        if self.num is None and self.seeds is None:
            raise ConfigError("give the seeds: seeds=0-49999 (EDM's form) or num=50000 (seeds 0..num-1)")
        if self.num is not None and self.num < 1:
            raise ConfigError(f"num must be >= 1, got {self.num}")
        if self.num is not None and self.seeds is not None:
            n = len(parse_seeds(self.seeds))
            if n != self.num:
                raise ConfigError(f"num={self.num} but seeds={self.seeds} lists {n} seeds; drop num or make them agree")
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: one per GPU or free CPU), got {self.workers}")
        if self.label != "balanced" and not str(self.label).isdigit():
            raise ConfigError(f"class={self.label!r}: give a class index (class=3) or class=balanced")

    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds) if self.seeds is not None else list(range(self.num))


# ------------------------------------------------------------------------------------------ the run


@dataclass
class TrainedRun:
    """What a run directory gives generation: its recipe, its task (rebuilt from config.yaml) and its EMA weights."""

    path: Path
    recipe: Any
    task: Any
    ema: dict
    weights: dict  # where the weights came from: {"file": ..., "step": ...}


def load_run(run: str) -> TrainedRun:
    """The run's recipe (named by its net_ema.pt, else by its latest checkpoint's record), its config.yaml
    loaded as the recipe's config, the task built from it and the EMA weights. Raises ConfigError naming
    what is missing."""
    import torch

    from raygen import recipes
    from raygen.config import load_config
    from raygen.core.job import preset_dir
    from raygen.train.checkpoint import EXPORT_FILE, STATE_FILE, latest_checkpoint, read_record

    path = Path(run).expanduser().resolve()
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"run={run}: no config.yaml there; give the directory a training job printed as run_dir:")
    export = path / EXPORT_FILE
    if export.is_file():
        record = torch.load(export, map_location="cpu", weights_only=False)
        name, ema = record.get("recipe"), record["ema"]
        weights = {"file": EXPORT_FILE, "step": record.get("step")}
    else:
        ckpt = latest_checkpoint(path)
        if ckpt is None or not (ckpt / STATE_FILE).is_file():
            raise ConfigError(f"run={run}: neither {EXPORT_FILE} nor a registered torch checkpoint is there; give a "
                              "run that trained (its job writes net_ema.pt at the end)")
        rec = read_record(ckpt)
        name, ema = rec.get("recipe"), torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)["ema"]
        weights = {"file": str(ckpt.relative_to(path) / STATE_FILE), "step": rec.get("step")}
    if not name:
        raise ConfigError(f"run={run}: its weights do not name their recipe; give a run made by raygen's jobs")
    recipe = recipes.get(name)
    cfg, _ = load_config(recipe.config, preset=None, preset_dir=preset_dir(recipe.name),
                         config_file=str(path / "config.yaml"))
    data = getattr(cfg, "data", None)
    if getattr(data, "source", None) == "files":  # the U-Net recipes encode raw files into a store first
        from raygen.recipes.diffusion import prepare_pixel_store

        cfg = prepare_pixel_store(cfg, path.parent.parent)
    task = recipe.task(cfg)
    if task.backend != "torch":
        raise ConfigError(f"run={run}: the {name} recipe trains with the {task.backend} backend; generate.py "
                          "samples torch networks (net_ema.pt)")
    return TrainedRun(path, recipe, task, ema, weights)


def sampler_settings(method, run_cfg, given: dict) -> dict:
    """The method's defaults, overlaid by the run's own evaluation settings (eval.settings) and then by the
    command's sampler.* keys, each of which must be a setting the method takes."""
    allowed = type(method).sampler_settings
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ConfigError(f"sampler.{unknown[0]}: the {type(method).__name__} sampler has no setting "
                          f"{unknown[0]!r}; it takes {', '.join(allowed) or 'none'}")
    run_settings = dict(getattr(getattr(run_cfg, "eval", None), "settings", None) or {})
    return {**method.default_settings(), **run_settings, **given}


def labels_of(seeds: np.ndarray, num_classes: int, label: str) -> np.ndarray:
    """Class-balanced by seed (seed % num_classes, so a seed's label does not depend on the seed list), or
    one class for every seed. -1 for an unconditional task."""
    if not num_classes:
        if label != "balanced":
            raise ConfigError(f"class={label}: the run is unconditional (no classes); drop class=")
        return np.full(len(seeds), -1, np.int64)
    if label == "balanced":
        return (seeds % num_classes).astype(np.int64)
    c = int(label)
    if not 0 <= c < num_classes:
        raise ConfigError(f"class={c}: the run has classes 0..{num_classes - 1}")
    return np.full(len(seeds), c, np.int64)


# ------------------------------------------------------------------------------------------ the out dir


def png_path(out: Path, seed: int) -> Path:
    """EDM's --subdirs layout: 1000 images per folder."""
    return out / f"{seed // 1000 * 1000:06d}" / f"{seed:06d}.png"


def written_seeds(out: Path, fmt: str) -> set[int]:
    """Seeds whose image is complete on disk: PNGs under their final name (a killed write leaves only a
    hidden temporary file), or the seeds of samples.npz or of the finished npz shards."""
    done: set[int] = set()
    if fmt == "png":
        for sub in (out.iterdir() if out.is_dir() else ()):
            if sub.is_dir() and sub.name.isdigit():
                done.update(int(f.name[:-4]) for f in os.scandir(sub)
                            if f.name.endswith(".png") and f.name[:-4].isdigit())
        return done
    if (out / SAMPLES_NPZ).is_file():
        with np.load(out / SAMPLES_NPZ) as z:
            return set(int(s) for s in z["seeds"])
    for shard in sorted((out / SHARDS).glob("batch-*.npz")) if (out / SHARDS).is_dir() else ():
        with np.load(shard) as z:
            done.update(int(s) for s in z["seeds"])
    return done


def remove_temp_files(out: Path) -> int:
    """Temporary files of writes a killed run left (raygen.core.files names them .<name>.<pid>.<id>.tmp)."""
    n = 0
    for d in [out, out / SHARDS, *(p for p in out.iterdir() if p.is_dir() and p.name.isdigit())]:
        if d.is_dir():
            for f in d.glob(".*.tmp"):
                f.unlink(missing_ok=True)
                n += 1
    return n


def check_manifest(out: Path, manifest: dict) -> bool:
    """True when `out` already holds samples of exactly this manifest (a resume); ConfigError naming every
    differing key when it holds others; False for a new out dir."""
    path = out / MANIFEST
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"out={out}: {MANIFEST} is unreadable ({e}); pass another out=<dir>") from None
    diffs = []
    for key in IDENTITY:
        a, b = old.get(key), manifest.get(key)
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"sampler.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                      if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise ConfigError(f"out={out} holds samples made differently ({'; '.join(diffs)}); one out dir holds one "
                          "set of samples: pass another out=<dir>, or repeat the recorded settings to resume it")
    return True


# ------------------------------------------------------------------------------------------ the workers


class SampleWriter:
    """A Ray actor: the network on its device, writing the images of the batches it is given."""

    def __init__(self, task, ema, settings: dict, out: str, fmt: str, threads: int, gpu: bool):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.task, self.settings, self.out, self.fmt = task, settings, Path(out), fmt
        self.method = task.build_method()
        self.net = task.build_net()
        self.net.load_state_dict(ema)
        self.net.eval().to(self.device)

    def write(self, seeds: list[int], labels: list[int]) -> int:
        """Generate the images of `seeds` and write them; returns how many were written."""
        import torch

        from raygen.core.files import atomic_write
        from raygen.core.grid import to_uint8
        from raygen.core.rng import SeedStack

        # an unconditional task's label is -1, which its method ignores; the label still sizes the batch
        cond = {"label": torch.as_tensor(labels, dtype=torch.long)}
        images = self.task.generate(self.method, self.net, cond, SeedStack(seeds, self.device), **self.settings)
        u8 = to_uint8(images).cpu().numpy().transpose(0, 2, 3, 1)  # NHWC
        if self.fmt == "npz":
            with atomic_write(self.out / SHARDS / f"batch-{seeds[0]:09d}.npz") as f:
                np.savez(f, images=u8, labels=np.asarray(labels, np.int64), seeds=np.asarray(seeds, np.int64))
            return len(seeds)
        from PIL import Image

        for seed, img in zip(seeds, u8):
            with atomic_write(png_path(self.out, seed)) as f:
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(f, format="PNG")
        return len(seeds)


def batches_to_do(seeds: list[int], labels: np.ndarray, done: set[int], batch: int) -> list[tuple[list, list]]:
    """The seed list cut into fixed batches of `batch` (the same cut on every run), each without its
    written seeds; a batch left empty is dropped. The fixed cut keeps every untouched batch exactly the
    batch an uninterrupted run draws."""
    out = []
    for i in range(0, len(seeds), batch):
        keep = [(s, int(lab)) for s, lab in zip(seeds[i:i + batch], labels[i:i + batch]) if s not in done]
        if keep:
            out.append(([s for s, _ in keep], [lab for _, lab in keep]))
    return out


def cluster_gpus() -> int:
    """GPUs of the cluster this job runs on: the one RAY_ADDRESS names (joining it is cheap), else the
    local cluster a job would start, whose GPUs are this machine's (so a rerun with nothing left to
    write starts no Ray at all)."""
    from raygen.core.job import init_ray

    ray = sys.modules.get("ray")
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        init_ray()
        ray = sys.modules["ray"]
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


def worker_plan(cfg: GenerateConfig, batches: int) -> tuple[int, int, bool]:
    """(workers, CPUs per worker, gpu): one worker per GPU, or by default one per free CPU; never more
    workers than batches. Refuses more GPU workers than GPUs or more CPU workers than free CPUs."""
    import ray

    from raygen.core.job import init_ray

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    if gpu:
        if not gpus:
            raise ConfigError("use_gpu=true but the cluster has no GPU; drop use_gpu")
        n = cfg.workers or gpus
        if n > gpus:
            raise ConfigError(f"workers={n} GPU workers need {n} GPUs, the cluster has {gpus}; lower workers")
        return max(1, min(n, batches)), 1, True
    free = max(1, int(ray.available_resources().get("CPU", 1)))
    n = cfg.workers or free
    if n > free:
        raise ConfigError(f"workers={n} needs {n} CPUs, the cluster has {free} free; lower workers")
    n = max(1, min(n, batches))
    return n, max(1, free // n), False


def assemble_npz(out: Path, seeds: list[int]) -> Path:
    """The shards -> one samples.npz in the order of the seed list (every seed exactly once), then the
    shards are removed."""
    import shutil

    from raygen.core.files import atomic_write

    parts = {}
    for shard in sorted((out / SHARDS).glob("batch-*.npz")):
        with np.load(shard) as z:
            for img, lab, s in zip(z["images"], z["labels"], z["seeds"]):
                if int(s) in parts:
                    raise RuntimeError(f"seed {int(s)} is in two shards of {out / SHARDS}")
                parts[int(s)] = (img, lab)
    missing = [s for s in seeds if s not in parts]
    if missing:
        raise RuntimeError(f"{len(missing)} seeds have no shard in {out / SHARDS} (first: {missing[0]})")
    with atomic_write(out / SAMPLES_NPZ) as f:
        np.savez(f, images=np.stack([parts[s][0] for s in seeds]), labels=np.asarray([parts[s][1] for s in seeds]),
                 seeds=np.asarray(seeds, np.int64))
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return out / SAMPLES_NPZ


def generate(cfg: GenerateConfig, runs_root: str) -> tuple[Path, Path]:
    """Every check, then the samples; returns (samples path, out dir)."""
    from raygen.core.contracts import Method
    from raygen.core.files import write_json
    from raygen.core.job import init_ray, interrupts, lock_run, prepare_run_dir, resume_command

    run = load_run(cfg.run)
    method = run.task.build_method()
    if type(method).sample is Method.sample:
        raise ConfigError(f"run={cfg.run}: the {run.recipe.name} method does not generate (no sampler)")
    settings = sampler_settings(method, run.task.cfg, cfg.sampler)
    seeds = cfg.seed_list()
    labels = labels_of(np.asarray(seeds, np.int64), run.task.num_classes, cfg.label)
    out = Path(cfg.out).expanduser().resolve() if cfg.out else \
        Path(runs_root).expanduser().resolve() / JOB / run.path.name
    device = "cuda" if (cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() > 0) else "cpu"
    manifest = {"run": str(run.path), "recipe": run.recipe.name, "weights": run.weights, "settings": settings,
                "labels": cfg.label, "seeds": seeds_text(seeds), "format": cfg.format, "device": device,
                "count": len(seeds), "num_classes": run.task.num_classes, "sample_shape": list(run.task.sample_shape)}
    nfe = method.nfe(**settings) if callable(getattr(method, "nfe", None)) else None
    if nfe is not None:
        manifest["nfe"] = nfe
    manifest = json.loads(json.dumps(manifest))  # compared as it reads back from the file (tuples are lists)
    prepare_run_dir(out)
    lock_run(out, "generate", f"a generation into {out}")  # one writer; the kernel drops it on any exit
    resumed = check_manifest(out, manifest)
    remove_temp_files(out)  # a killed writer's, never a live one's: this process holds the lock
    if not resumed:
        write_json(out / MANIFEST, {**manifest, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "command": " ".join(sys.argv)})
    wanted = set(seeds)
    done = written_seeds(out, cfg.format) & wanted
    todo = batches_to_do(seeds, labels, done, cfg.batch)
    print(f"{run.recipe.name} run {run.path} ({run.weights['file']}, step {run.weights['step']}): "
          f"{len(seeds)} seeds, {len(done)} already written" + (f"; resuming into {out}" if resumed and done else ""))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items())
          + (f"; {nfe} network evaluations per sample" if nfe is not None else ""), flush=True)

    def interrupted() -> str:
        n = len(written_seeds(out, cfg.format) & wanted)
        return (f"interrupted: generation into {out}; {n} of {len(seeds)} samples are written and kept; resume "
                f"with the same command: {resume_command(JOB, None)}")

    if todo:
        init_ray()  # before the handler below: starting Ray installs its own SIGTERM handler, which would win
    with interrupts(interrupted):
        if todo:
            run_batches(cfg, run, settings, out, todo, len(seeds), len(done))
        if cfg.format == "npz" and not (out / SAMPLES_NPZ).is_file():
            return assemble_npz(out, seeds), out
    final = written_seeds(out, cfg.format) & wanted
    if len(final) != len(seeds):
        raise RuntimeError(f"{len(seeds) - len(final)} samples are missing from {out} after generation")
    return (out / SAMPLES_NPZ if cfg.format == "npz" else out), out


def run_batches(cfg: GenerateConfig, run: TrainedRun, settings: dict, out: Path, todo: list, total: int,
                initial: int) -> None:
    """The batches over a pool of SampleWriter actors, as each frees up; one progress line every 10 s."""
    import ray
    from ray.util import ActorPool

    from raygen.core.progress import Progress

    workers, threads, gpu = worker_plan(cfg, len(todo))
    actor = ray.remote(num_cpus=threads, num_gpus=1 if gpu else 0)(SampleWriter)
    ema = ray.put(run.ema)
    pool = ActorPool([actor.remote(run.task, ema, settings, str(out), cfg.format, threads, gpu)
                      for _ in range(workers)])
    print(f"{workers} worker(s) on {'GPU' if gpu else f'{threads} CPU(s) each'}, {len(todo)} batches of up to "
          f"{cfg.batch}", flush=True)
    bar = Progress(total, initial, f"generate {out.name}", unit="img")
    done = initial
    for n in pool.map_unordered(lambda a, b: a.write.remote(*b), todo):
        done += n
        bar.update(done, force=done == total)


def main(argv=None) -> Path:
    """`jobs/generate.py`: prints `samples: <png folder or samples.npz>`, then `run_dir: <out>` last."""
    from raygen.config import load_config
    from raygen.core.job import fail, parse_args, preset_dir, stop_ray

    argv = list(sys.argv[1:] if argv is None else argv)
    # `class=` is the user's word (EDM's --class); the config field is `label` (class is a Python keyword)
    argv = ["label=" + a[len("class="):] if a.startswith("class=") else a for a in argv]
    args = parse_args(JOB, GenerateConfig, argv)
    try:
        cfg, _ = load_config(GenerateConfig, preset=args.preset, preset_dir=preset_dir(JOB), config_file=args.config,
                             overrides=args.overrides)
        samples, out = generate(cfg, args.runs_root)
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # a worker's error arrives as a RayTaskError: one line, the written samples kept
        import ray.exceptions

        if not isinstance(e, ray.exceptions.RayError):
            raise
        cause = getattr(e, "cause", None) or e  # the worker's own exception (Ray's traceback is above)
        first = next((ln for ln in str(cause).strip().splitlines() if ln.strip()), "")
        fail(f"generation failed in a worker: {type(cause).__name__}: {first}\n  the samples written so far are "
             "kept; the same command resumes once the cause is fixed", code=1)
    stop_ray()
    print(f"samples: {samples}")
    print(f"run_dir: {out}", flush=True)
    return samples
