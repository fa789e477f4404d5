"""The one registry of recipes, read by `jobs/`, the `raygen` CLI and the Tune sweeps.

A recipe is one record: its name, its config class, its task class, how a run goes (`run`), what it
reports (`reported_metrics`), and optionally how a trained run is evaluated again (`evaluate`), what
derived values its config gets (`resolve`) and what a sweep computes once for all trials
(`shared_stage`). `register` checks the record, so an incomplete recipe fails at import, naming
what is missing, instead of on a worker hours later.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from raygen.config import ConfigError
from raygen.train.config import OptimConfig, TrainConfig, resolve_image_units

# built-in recipes: name -> module that registers it (imported on first use)
BUILTIN = {
    "diffit": "raygen.recipes.diffit",
    "dit": "raygen.recipes.dit",
    "drifting": "raygen.recipes.drifting",
    "edm": "raygen.recipes.edm",
    "fsdit": "raygen.recipes.fsdit",
    "latent_mae": "raygen.recipes.latent_mae",
    "sdd": "raygen.recipes.sdd",
}


@dataclass(frozen=True)
class Recipe:
    name: str
    config: type  # the dataclass of its config (sections run, data, train, ...)
    task: type  # a raygen.core.contracts.Task subclass
    run: Callable  # run(cfg, run_dir, callbacks=()) -> metrics dict; trains and (optionally) evaluates
    reported_metrics: Callable  # reported_metrics(cfg, eval_only=False, during_training=False) -> [names]
    evaluate: Optional[Callable] = None  # evaluate(cfg, run_dir, trained_run) -> metrics of a trained run
    resolve: Optional[Callable] = None  # resolve(cfg) -> cfg with derived values (store resolution, batch size)
    shared_stage: Optional[Callable] = None  # shared_stage(cfg, shared_dir, swept_keys) -> overrides for trials
    description: str = ""


_REGISTRY: dict[str, Recipe] = {}
REQUIRED_SECTIONS = ("run", "train", "log")


def register(recipe: Recipe) -> Recipe:
    """Add a recipe after checking that every required piece is there and has the right kind."""
    from raygen.core.contracts import Task

    missing = [f.name for f in dataclasses.fields(Recipe)
               if f.default is dataclasses.MISSING and getattr(recipe, f.name, None) in (None, "")]
    if missing:
        raise TypeError(f"recipe {recipe.name!r} is missing {', '.join(missing)}")
    if not (isinstance(recipe.config, type) and dataclasses.is_dataclass(recipe.config)):
        raise TypeError(f"recipe {recipe.name!r}: config must be a dataclass, got {recipe.config!r}")
    sections = {f.name for f in dataclasses.fields(recipe.config)}
    lacking = [s for s in REQUIRED_SECTIONS if s not in sections]
    if lacking:
        raise TypeError(f"recipe {recipe.name!r}: its config {recipe.config.__name__} lacks the section(s) "
                        f"{', '.join(lacking)} every run has")
    if not (isinstance(recipe.task, type) and issubclass(recipe.task, Task)):
        raise TypeError(f"recipe {recipe.name!r}: task must subclass raygen.core.contracts.Task")
    abstract = sorted(getattr(recipe.task, "__abstractmethods__", ()))
    if abstract:
        raise TypeError(f"recipe {recipe.name!r}: task {recipe.task.__name__} does not implement "
                        f"{', '.join(abstract)}")
    for f in ("run", "reported_metrics", "evaluate", "resolve", "shared_stage"):
        value = getattr(recipe, f)
        if value is not None and not callable(value):
            raise TypeError(f"recipe {recipe.name!r}: {f} must be callable, got {value!r}")
    if recipe.name in _REGISTRY and _REGISTRY[recipe.name] is not recipe:
        old = _REGISTRY[recipe.name]
        if (old.config.__module__, old.config.__qualname__) != (recipe.config.__module__, recipe.config.__qualname__):
            raise TypeError(f"recipe {recipe.name!r} is registered twice ({old.config.__module__} and "
                            f"{recipe.config.__module__})")
    _REGISTRY[recipe.name] = recipe
    return recipe


def names() -> list[str]:
    return sorted({*BUILTIN, *_REGISTRY})


def get(name: str) -> Recipe:
    """The recipe called `name` (importing a built-in one on first use)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ConfigError(f"unknown recipe {name!r}; use one of {', '.join(names())}")
    return _REGISTRY[name]


def resolved(recipe: Recipe, cfg: Any) -> Any:
    """`cfg` with the recipe's derived values and the step counts of durations given in images (a new
    object; `cfg` itself is left as given)."""
    cfg = recipe.resolve(cfg) if recipe.resolve is not None else cfg
    # image units after the recipe's own values: the batch size they divide by may be derived (drifting)
    if isinstance(getattr(cfg, "train", None), TrainConfig) and isinstance(getattr(cfg, "optim", None), OptimConfig):
        train, optim = resolve_image_units(cfg.train, cfg.optim)
        if (train, optim) != (cfg.train, cfg.optim):
            cfg = dataclasses.replace(cfg, train=train, optim=optim)
    return cfg
