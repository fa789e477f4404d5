"""Typed run configs: dataclasses built from YAML presets plus dotted CLI overrides.

Configs are plain (nested) dataclasses so that code gets attribute access and type
checkers see real types.  Values arrive as loosely typed YAML / command-line text, so
this module coerces them field by field and turns every problem into a one-line
:class:`ConfigError` that names the dotted key and how to fix it, instead of letting
a typo or a YAML 1.1 quirk (``1e-4`` loads as a *string*) surface hours into a run.

Merge order used by :func:`load_config`::

    dataclass defaults <- preset YAML (with ``base:`` inheritance) <- config file <- overrides
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import pathlib
import types
import typing
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ConfigError",
    "all_keys",
    "closest_key",
    "is_key",
    "deep_merge",
    "dump_yaml",
    "flatten",
    "nest",
    "render_marked",
    "write_config",
    "from_dict",
    "load_config",
    "parse_override",
    "to_dict",
]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


class ConfigError(ValueError):
    """A user-fixable config problem; the message names the dotted key and the fix."""


# --------------------------------------------------------------------------- keys


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (also through ``Optional``), i.e. whether it is a section."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and _is_dataclass_type(args[0]):
            return args[0]
    return None


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Init fields with resolved annotations (so ``from __future__ import annotations`` works)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _paths(cls: type, prefix: str = "", *, sections: bool) -> list[str]:
    out = []
    for f, tp in _fields(cls):
        key = _join(prefix, f.name)
        sub = _section_type(tp)
        if sub is None:
            out.append(key)
        else:
            if sections:
                out.append(key)
            out.extend(_paths(sub, key, sections=sections))
    return out


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a dataclass tree, e.g. ``['seed', 'train.lr', ...]``."""
    return _paths(cls, prefix, sections=False)


def is_key(cls: type, key: str) -> bool:
    """Whether `key` names a leaf of `cls`, or an entry of a mapping-valued leaf (``eval.settings.steps``)."""
    keys = set(all_keys(cls))
    if key in keys:
        return True
    hints = dict(_leaf_types(cls))
    parts = key.split(".")
    return any(".".join(parts[:i]) in hints and _is_mapping(hints[".".join(parts[:i])]) for i in range(1, len(parts)))


def _leaf_types(cls: type, prefix: str = ""):
    for f, tp in _fields(cls):
        key = _join(prefix, f.name)
        sub = _section_type(tp)
        if sub is None:
            yield key, tp
        else:
            yield from _leaf_types(sub, key)


def _is_mapping(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def closest_key(key: str, candidates: list[str]) -> str | None:
    """Best match for a mistyped dotted key across the whole tree.

    Scores on the last component (so ``lr`` put at top level still finds ``train.lr``);
    the full-path similarity only breaks ties, preferring the key's own section.
    Ancestors of ``key`` are skipped: suggesting ``train`` for ``train.zzz`` helps no one.
    """
    leaf = key.rsplit(".", 1)[-1]
    best, best_score = None, (0.6, -1.0)  # 0.6: difflib.get_close_matches' cutoff
    for cand in candidates:
        if cand == key or key.startswith(cand + "."):
            continue
        score = (
            difflib.SequenceMatcher(None, leaf, cand.rsplit(".", 1)[-1]).ratio(),
            difflib.SequenceMatcher(None, key, cand).ratio(),
        )
        if score > best_score:
            best, best_score = cand, score
    return best


# ----------------------------------------------------------------------- coercion


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _coerce(tp: Any, value: Any, key: str, candidates: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if tp is Any or tp is object:
        return value
    if _is_dataclass_type(tp):
        return _build(tp, value, key, candidates)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        for choice in args:  # CLI/YAML may hand `3` for Literal['3'] or vice versa
            if str(value) == str(choice):
                return choice
        raise _type_error(key, tp, value)
    if origin in (Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in _NULL)
        ):
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, key, candidates)
        for option in options:
            try:
                return _coerce(option, value, key, candidates)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)
    if tp in (list, tuple) or origin in (list, tuple):
        return _coerce_sequence(tp, origin or tp, args, value, key, candidates)
    if tp is dict or origin is dict:
        if value is None:  # `key: null` empties a mapping (a merge cannot remove keys otherwise)
            return {}
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        value_tp = args[1] if args else Any
        return {
            str(k): _coerce(value_tp, v, f"{key}.{k}", candidates) for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 loads `1e-4` (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        # bools are rejected: YAML turns a bare `yes`/`no` into one, and "True" is never meant
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(key, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, tp, value)


def _coerce_sequence(tp, kind, args, value, key, candidates):
    if isinstance(value, str):  # `betas=0.9,0.95` on the CLI arrives as one string
        value = [part.strip() for part in value.split(",")] if value.strip() else []
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, tp, value)
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(
                f"config key '{key}' expects {len(args)} items ({_type_name(tp)}), "
                f"got {len(value)}: {list(value)!r}"
            )
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [
        _coerce(t, v, f"{key}[{i}]", candidates)
        for i, (t, v) in enumerate(zip(item_types, value))
    ]
    return tuple(items) if kind is tuple else items


def _build(cls: type, data: Any, prefix: str, candidates: list[str]) -> Any:
    where = f"'{prefix}'" if prefix else "the top level"
    if not isinstance(data, dict):
        example = (all_keys(cls, prefix) or [prefix])[0]
        raise ConfigError(
            f"config section {where} expects a mapping of keys, got {data!r} "
            f"({type(data).__name__}); set its keys instead, e.g. '{example}=...'"
        )
    fields = _fields(cls)
    names = [f.name for f, _ in fields]
    for name in data:
        if name not in names:
            key = _join(prefix, str(name))
            match = closest_key(key, candidates)
            hint = f"; did you mean '{match}'?" if match else ";"
            raise ConfigError(
                f"unknown config key '{key}'{hint} valid keys under {where}: {', '.join(names)}"
            )
    kwargs = {}
    for f, tp in fields:
        key = _join(prefix, f.name)
        if f.name in data:
            kwargs[f.name] = _coerce(tp, data[f.name], key, candidates)
        elif _is_dataclass_type(tp) and f.default is dataclasses.MISSING and (
            f.default_factory is dataclasses.MISSING
        ):
            kwargs[f.name] = _build(tp, {}, key, candidates)  # section left entirely at defaults
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}'; set it with '{key}=...'")
    obj = cls(**kwargs)
    if callable(getattr(obj, "validate", None)):
        obj.validate()  # children were built (and validated) above, so this runs last
    return obj


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build and validate a (nested) dataclass ``cls`` from a plain dict.

    Missing keys keep dataclass defaults; unknown keys, wrong types and failed
    ``validate()`` checks raise :class:`ConfigError`.  ``prefix`` is the dotted path
    of ``cls`` inside a larger config and only affects error messages.
    """
    return _build(cls, data, prefix, _paths(cls, prefix, sections=True))


# ---------------------------------------------------------------------- dumping


def to_dict(cfg: Any) -> Any:
    """Plain YAML-safe form of a config (dataclasses to dicts, tuples to lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically, so a crash never leaves a half-written config
    next to a checkpoint (readers see either the old file or the new one)."""
    from raygen.core.files import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# -------------------------------------------------------------------- merging


def parse_override(s: str) -> tuple[list[str], object]:
    """Split ``"a.b.c=value"`` into ``(['a', 'b', 'c'], value)``.

    The value is parsed as YAML so ``x=[1,2]``, ``x=null`` and ``x=true`` work; text
    that is not valid YAML (e.g. ``[draft] run``) is kept as a plain string.
    """
    key, sep, raw = s.partition("=")
    key = key.strip()
    path = key.split(".")
    if not sep or not all(path):
        raise ConfigError(
            f"bad override {s!r}; use dotted key=value form, e.g. 'train.lr=1e-4'"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return path, value


def deep_merge(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base``; neither input is modified.

    Nested dicts merge key by key; anything else in ``update`` replaces the base value.
    """
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def nest(flat: dict[str, Any]) -> dict:
    """{'a.b': 1, 'a.c': 2} -> {'a': {'b': 1, 'c': 2}}."""
    out: dict = {}
    for key, value in flat.items():
        for part in reversed(key.split(".")):
            value = {part: value}
        out = deep_merge(out, value)
    return out


def flatten(d: dict, prefix: str = "", leaves: set[str] | None = None) -> dict[str, Any]:
    """{'a': {'b': 1}, 'c.d': 2} -> {'a.b': 1, 'c.d': 2}. A key in `leaves` is kept whole even when its
    value is a mapping (a dict-valued config key such as ``eval.settings``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and (leaves is None or key not in leaves):
            out.update(flatten(v, key + ".", leaves))
        else:
            out[key] = v
    return out


def write_config(cfg: Any, path: str | os.PathLike, given: dict | None = None, as_given: Any = None) -> None:
    """config.yaml of a run, atomically: the full config with each key marked (see `render_marked`)."""
    from raygen.core.files import write_text

    write_text(path, render_marked(cfg, given or {}, as_given if as_given is not None else cfg))


def render_marked(cfg: Any, given: dict, as_given: Any) -> str:
    """YAML of the full config `cfg`, every leaf marked: `# given` (set by a preset, file or override),
    `# resolved (was X)` (derived by the recipe from the data or other keys), unmarked = default."""
    leaves = set(all_keys(type(cfg)))
    given_keys = set(flatten(given, leaves=leaves))
    before = flatten(to_dict(as_given), leaves=leaves)
    lines = ["# The config this run used. `# given`: set by the preset, --config file or the command line;",
             "# `# resolved`: derived by raygen from the data or other keys (the value before in brackets);",
             "# unmarked: the default."]

    def scalar(v) -> str:
        return yaml.safe_dump(v, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()

    def walk(d: dict, prefix: str, indent: int):
        for k, v in d.items():
            key = _join(prefix, k)
            if isinstance(v, dict) and key not in leaves:
                lines.append(" " * indent + f"{k}:")
                walk(v, key, indent + 2)
                continue
            mark = ""
            if key in before and before[key] != v:
                mark = f"  # resolved (was {scalar(before[key])})"
            elif key in given_keys or any(g.startswith(key + ".") for g in given_keys):
                mark = "  # given"
            lines.append(" " * indent + f"{k}: {scalar(v)}{mark}")

    walk(to_dict(cfg), "", 0)
    return "\n".join(lines) + "\n"


def _read_yaml(path: pathlib.Path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{line}: {problem}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must contain a mapping of config keys, got {type(data).__name__}"
        )
    return data


def _load_preset(name: str, preset_dir: pathlib.Path, chain: tuple[str, ...] = ()) -> dict:
    """Load ``preset_dir/<name>.yaml``, resolving ``base:`` inheritance recursively."""
    if name in chain:
        raise ConfigError(
            f"preset inheritance cycle: {' -> '.join(chain + (name,))}; remove one 'base:' key"
        )
    path = preset_dir / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in preset_dir.glob("*.yaml"))
        match = difflib.get_close_matches(name, available, n=1)
        hint = f"did you mean '{match[0]}'? " if match else ""
        where = f" (base of '{chain[-1]}')" if chain else ""
        raise ConfigError(
            f"unknown preset '{name}'{where}; {hint}available presets in {preset_dir}: "
            f"{', '.join(available) or '(none)'}"
        )
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'base' in {path} must be a preset name, got {base!r}")
    return deep_merge(_load_preset(base, preset_dir, chain + (name,)), data)


def load_config(
    cls: type,
    *,
    preset: str | None,
    preset_dir: pathlib.Path,
    config_file: str | None = None,
    overrides: typing.Iterable[str] = (),
) -> tuple[Any, dict]:
    """Build a ``cls`` config from defaults <- preset <- config file <- overrides.

    With neither ``preset`` nor ``config_file`` the ``default`` preset is used if
    ``preset_dir/default.yaml`` exists.  Returns ``(cfg, raw)`` where ``raw`` is the
    merged dict of explicitly given values (dataclass defaults not included).
    """
    preset_dir = pathlib.Path(preset_dir)
    if preset is None and config_file is None and (preset_dir / "default.yaml").is_file():
        preset = "default"
    raw: dict = _load_preset(preset, preset_dir) if preset is not None else {}
    if config_file is not None:
        path = pathlib.Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; check the path")
        data = _read_yaml(path)
        base = data.pop("base", None)  # a config file may start from a preset, as presets do
        if base is not None:
            if not isinstance(base, str):
                raise ConfigError(f"'base' in {path} must be a preset name, got {base!r}")
            raw = deep_merge(raw, _load_preset(base, preset_dir, (str(path),)))
        raw = deep_merge(raw, data)
    for item in overrides:
        keys, value = parse_override(item)
        for k in reversed(keys):
            value = {k: value}
        raw = deep_merge(raw, value)
    return from_dict(cls, raw), raw
