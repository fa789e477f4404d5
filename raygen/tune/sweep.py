"""A sweep file, and the plan it expands to: which trials run, which are excluded and why.

    recipe: drifting                 # any recipe: dit, drifting, latent_mae
    preset: default                  # the base config of every trial (or `config: file.yaml`)
    overrides: {train.steps: 500}    # dotted keys set on every trial
    grid:                            # the cartesian product of these values is the set of trials
      drift.coupling: [partial_two_sided, row, sinkhorn]
      drift.drift_form: [alg2_joint, split]
    metric: fid                      # the headline metric (best trial, grid view); `mode: min|max`
    resources: {num_workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}   # per trial
    max_concurrent_trials: 2
    scheduler: {type: asha, metric: loss, grace_period: 100}               # optional early stopping
    eval_only: {from_run: runs/dit/...}   # optional: trials only evaluate one trained run

Everything here is checked before a trial starts: unknown keys, empty grids, metrics the recipe
never reports, resources the cluster cannot give. A grid point whose config fails the recipe's own
validation (e.g. Sinkhorn with marginal `none` while omega can reach 1) is excluded with that reason.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from importlib import resources as pkg_resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from raygen import recipes
from raygen.config import ConfigError, closest_key, all_keys, deep_merge, flatten, from_dict, is_key, load_config, nest, to_dict

@dataclass
class Resources:
    num_workers: int = 1  # Ray Train workers per trial
    cpus_per_worker: int = 1
    gpus_per_worker: Optional[float] = None  # None: 1 when the cluster has GPUs, else 0; fractions share a GPU
    # the trial's own process only launches its Train run and waits: by default it takes no CPU, so
    # two 1-CPU trials fit on 2 cores (Tune needs some resource per trial: it gets 128 MiB of memory)
    driver_cpus: float = 0

    def validate(self):
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ConfigError("resources.num_workers and resources.cpus_per_worker must be >= 1")
        if (self.gpus_per_worker or 0) < 0 or self.driver_cpus < 0:
            raise ConfigError("resources.gpus_per_worker and resources.driver_cpus must be >= 0")


@dataclass
class Scheduler:
    type: Literal["asha"] = "asha"
    metric: str = "loss"  # a metric reported during training (ASHA compares trials at equal steps)
    mode: Literal["min", "max"] = "min"
    grace_period: int = 100  # steps every trial runs before it can be stopped
    reduction_factor: float = 2.0

    def validate(self):
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("scheduler.grace_period must be >= 1 and scheduler.reduction_factor > 1")


@dataclass
class EvalOnly:
    from_run: Optional[str] = None  # a finished run of the recipe; None: train the base config once, in the sweep


@dataclass
class SweepSpec:
    recipe: str
    grid: dict[str, Any]
    metric: str
    name: str = ""
    description: str = ""
    preset: Optional[str] = None
    config: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    mode: Literal["min", "max"] = "min"
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int = 1
    scheduler: Optional[Scheduler] = None
    eval_only: Optional[EvalOnly] = None
    keys_order: list[str] = field(default_factory=list)  # grid keys as written (rows, columns of the grid view)


def sweeps_dir() -> Path:
    return Path(str(pkg_resources.files("raygen") / "configs" / "sweeps"))


def shipped_sweeps() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def recipe(name: str) -> recipes.Recipe:
    try:
        return recipes.get(name)
    except ConfigError:
        raise ConfigError(f"sweep key 'recipe': unknown recipe {name!r}; use one of {', '.join(recipes.names())}") from None


def load_sweep(name_or_path: str, preset: str | None = None, overrides: list[str] = ()) -> SweepSpec:
    """A shipped sweep by name, or a sweep YAML file; `preset`/`overrides` change every trial's base."""
    path = Path(name_or_path)
    if not path.suffix:
        path = sweeps_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"--sweep {name_or_path!r}: no such shipped sweep; shipped: {', '.join(shipped_sweeps())}, "
                              "or pass a path to a sweep .yaml")
    elif not path.is_file():
        raise ConfigError(f"--sweep {name_or_path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must be a mapping of sweep keys (recipe, grid, metric, ...)")
    raw.setdefault("name", path.stem)
    if preset:
        raw["preset"], raw["config"] = preset, None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad override {item!r}; use dotted key=value form, e.g. 'train.steps=100'")
        raw.setdefault("overrides", {})
        raw["overrides"] = {**(raw["overrides"] or {}), key.strip(): yaml.safe_load(value)}
    return parse_sweep(raw, where=str(path))


def parse_sweep(raw: dict, where: str = "sweep") -> SweepSpec:
    known = {f.name for f in dataclasses.fields(SweepSpec)} - {"keys_order"}
    for k in raw:  # a misspelt key is named first: it is usually why a required one is missing
        if k not in known:
            match = closest_key(str(k), sorted(known))
            raise ConfigError(f"{where}: unknown sweep key '{k}'" + (f"; did you mean '{match}'?" if match else "")
                              + f" (sweep keys: {', '.join(sorted(known))})")
    for k in ("recipe", "grid", "metric"):
        if k not in raw:
            raise ConfigError(f"{where}: missing sweep key '{k}'")
    if not isinstance(raw["grid"], dict) or not raw["grid"]:
        raise ConfigError(f"{where}: 'grid' is empty; give at least one dotted config key with a list of values")
    raw = dict(raw)
    raw["keys_order"] = list(raw["grid"])
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", str(raw["name"])):
        raise ConfigError(f"{where}: sweep name {raw['name']!r} must be a plain directory name")
    spec = from_dict(SweepSpec, raw, prefix="")  # unknown sweep keys are named with a suggestion
    spec.overrides = flatten(spec.overrides or {})
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid key '{key}' has an empty or non-list grid {values!r}; give a list of values")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: grid key '{key}' repeats a value: {values}")
    if spec.max_concurrent_trials < 1:
        raise ConfigError(f"{where}: max_concurrent_trials must be >= 1")
    return spec


# ------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    name: str
    params: dict[str, Any]  # grid key -> value
    cfg: Any = None  # the full recipe config; None when excluded
    excluded: Optional[str] = None  # why the recipe rejects this combination


def trial_name(index: int, params: dict) -> str:
    short = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items())
    return re.sub(r"[^A-Za-z0-9_.=\-]", "-", f"t{index:02d}_{short}")[:120]


def resolve_resources(spec: SweepSpec, cluster: dict) -> None:
    """gpus_per_worker None -> one GPU per worker on a cluster with GPUs, CPU training elsewhere."""
    if spec.resources.gpus_per_worker is None:
        spec.resources.gpus_per_worker = 1.0 if cluster.get("GPU", 0) > 0 else 0.0


def driver_resources(spec: SweepSpec) -> dict:
    """What the Tune trial process itself requests (its Train workers request theirs)."""
    return {"cpu": spec.resources.driver_cpus, "memory": 128 * 2**20}


def resource_overrides(spec: SweepSpec) -> dict:
    """The recipe keys that make every trial's Train run fit the sweep's per-trial resources (and use
    only its own CPUs' worth of threads, since trials run side by side)."""
    r = spec.resources
    use_gpu = (r.gpus_per_worker or 0) > 0
    out = {"train.num_workers": r.num_workers, "train.cpus_per_worker": r.cpus_per_worker,
           "train.torch_threads": r.cpus_per_worker, "train.use_gpu": use_gpu,
           "eval.cpus": r.num_workers * r.cpus_per_worker}
    if use_gpu:
        out["train.gpus_per_worker"] = r.gpus_per_worker
    return out


def base_raw(spec: SweepSpec) -> dict:
    """The base config every trial starts from (preset or file, then the sweep's overrides) as a dict."""
    from raygen.core.job import preset_dir

    cls = recipe(spec.recipe).config
    if spec.eval_only and spec.eval_only.from_run:
        run_cfg = Path(spec.eval_only.from_run) / "config.yaml"
        if not run_cfg.is_file():
            raise ConfigError(f"eval_only.from_run={spec.eval_only.from_run}: no config.yaml there; "
                              f"give the directory of a finished {spec.recipe} run")
        _, raw = load_config(cls, preset=None, preset_dir=Path("/nonexistent"), config_file=str(run_cfg))
    else:
        _, raw = load_config(cls, preset=spec.preset, preset_dir=preset_dir(spec.recipe), config_file=spec.config)
    return raw


def plan(spec: SweepSpec, shared: dict | None = None) -> list[Trial]:
    """Every grid point as a Trial: its config built and validated, or the reason it is excluded.
    `shared` holds keys set by the sweep's shared stage (e.g. the MAE every drifting trial uses)."""
    rec = recipe(spec.recipe)
    cls = rec.config
    for where, names in (("grid", spec.grid), ("overrides", spec.overrides)):
        for key in names:
            if not is_key(cls, key):
                match = closest_key(key, sorted(all_keys(cls)))
                raise ConfigError(f"sweep {where} key '{key}' is not a {spec.recipe} config key"
                                  + (f"; did you mean '{match}'?" if match else ""))
    if spec.eval_only:
        if rec.evaluate is None:
            raise ConfigError(f"eval_only: the {spec.recipe} recipe has no evaluation-only mode (dit has)")
        bad = [k for k in spec.grid if not k.startswith(("eval.", "method."))]
        if bad:
            raise ConfigError(f"eval_only sweeps may only vary eval.* and method.* (sampler) keys; {bad[0]} changes "
                              "the trained network: drop eval_only to train one network per trial")
    base = base_raw(spec)
    base = deep_merge(base, nest({**resource_overrides(spec), **spec.overrides, **(shared or {})}))
    base = deep_merge(base, {"log": {"wandb_group": spec.name}, "run": {"name": None}})
    trials = []
    for i, values in enumerate(itertools.product(*spec.grid.values())):
        params = dict(zip(spec.grid, values))
        t = Trial(trial_name(i, params), params)
        try:
            t.cfg = recipes.resolved(rec, from_dict(cls, deep_merge(base, nest(params))))
        except ConfigError as e:
            t.excluded = str(e)
        trials.append(t)
    if all(t.excluded for t in trials):
        raise ConfigError(f"every trial of sweep {spec.name} is excluded; the first: {trials[0].excluded}")
    return trials


def check_metrics(spec: SweepSpec, trials: list[Trial]) -> None:
    """The headline and scheduler metrics must be something the recipe reports."""
    module = recipe(spec.recipe)
    cfg = next(t.cfg for t in trials if t.cfg is not None)
    reported = set(module.reported_metrics(cfg, eval_only=bool(spec.eval_only)))
    wanted = [("metric", spec.metric)]
    if spec.scheduler:
        wanted.append(("scheduler.metric", spec.scheduler.metric))
        training = set(module.reported_metrics(cfg, eval_only=bool(spec.eval_only), during_training=True))
        if spec.scheduler.metric not in training:
            raise ConfigError(f"scheduler.metric={spec.scheduler.metric!r} is not reported during training, so "
                              f"ASHA cannot compare trials; use one of {', '.join(sorted(training))}")
        if spec.eval_only:
            raise ConfigError("scheduler: evaluation-only trials do not train, so there is nothing to stop early")
    for key, metric in wanted:
        if metric not in reported:
            raise ConfigError(f"sweep key '{key}': no {spec.recipe} trial reports {metric!r}; "
                              f"reported: {', '.join(sorted(reported))}")


def check_resources(spec: SweepSpec, cluster: dict) -> int:
    """Fail when one trial needs more than the cluster has; return how many trials can run at once."""
    r = spec.resources
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    need_cpu = r.num_workers * r.cpus_per_worker + r.driver_cpus
    need_gpu = r.num_workers * (r.gpus_per_worker or 0)
    if need_cpu > cpus:
        raise ConfigError(f"sweep resources: one trial needs {need_cpu:g} CPUs (resources.num_workers={r.num_workers} "
                          f"x cpus_per_worker={r.cpus_per_worker} + driver) but the cluster has {cpus:g}; lower them")
    if need_gpu > gpus:
        raise ConfigError(f"sweep resources: one trial needs {need_gpu:g} GPUs (resources.num_workers x "
                          f"gpus_per_worker) but the cluster has {gpus:g}; set resources.gpus_per_worker=0 or add GPUs")
    fits = int(cpus // need_cpu)
    if need_gpu:
        fits = min(fits, int(gpus // need_gpu))
    return max(1, min(spec.max_concurrent_trials, fits))


def spec_dict(spec: SweepSpec) -> dict:
    d = to_dict(spec)
    d.pop("keys_order")
    return d
