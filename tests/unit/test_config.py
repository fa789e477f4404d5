"""Tests for raygen.config: presets, overrides, coercion and error messages.

The dataclasses live at module level on purpose: with ``from __future__ import
annotations`` the field types are strings that ``typing.get_type_hints`` resolves
from module globals.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, Optional

import pytest
import yaml

from raygen.config import (
    ConfigError,
    all_keys,
    deep_merge,
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)


@dataclasses.dataclass
class Train:
    batch_size: int = 8
    lr: float = 1e-3
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)
    name: Optional[str] = None
    ema: bool = False
    milestones: list[int] = dataclasses.field(default_factory=list)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(
                f"train.batch_size must be > 0, got {self.batch_size}; set train.batch_size=8"
            )


@dataclasses.dataclass
class Recipe:
    train: Train
    seed: int = 0


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


@pytest.fixture
def presets(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "presets"
    d.mkdir()
    write(d / "small.yaml", "seed: 1\ntrain:\n  batch_size: 4\n  lr: 1e-4\n")
    write(d / "big.yaml", "base: small\ntrain:\n  batch_size: 64\n")
    return d


def test_defaults_and_all_keys():
    cfg = from_dict(Recipe, {})
    assert cfg == Recipe(train=Train())
    assert all_keys(Recipe) == [
        "train.batch_size", "train.lr", "train.schedule", "train.betas",
        "train.name", "train.ema", "train.milestones", "train.extra", "seed",
    ]


def test_merge_order_preset_file_override(presets, tmp_path):
    file = write(tmp_path / "run.yaml", "seed: 2\ntrain:\n  lr: 0.5\n  schedule: constant\n")
    cfg, raw = load_config(
        Recipe, preset="small", preset_dir=presets, config_file=str(file),
        overrides=["train.lr=0.25", "train.betas=[0.5,0.6]"],
    )
    assert cfg.seed == 2                      # file beats preset
    assert cfg.train.batch_size == 4          # preset beats default
    assert cfg.train.schedule == "constant"   # file beats default
    assert cfg.train.lr == 0.25               # override beats file
    assert cfg.train.betas == (0.5, 0.6)
    assert raw == {"seed": 2, "train": {"batch_size": 4, "lr": 0.25, "schedule": "constant",
                                        "betas": [0.5, 0.6]}}


def test_default_preset_used_when_nothing_given(presets):
    assert load_config(Recipe, preset=None, preset_dir=presets)[0] == Recipe(train=Train())
    write(presets / "default.yaml", "seed: 7\n")
    assert load_config(Recipe, preset=None, preset_dir=presets)[0].seed == 7


def test_yaml11_float_string_and_scalar_coercion():
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}  # the quirk being worked around
    cfg = from_dict(Recipe, {"seed": "3", "train": {
        "lr": "1e-4", "betas": "0.8, 0.9", "milestones": "10,20", "extra": {"w": 1},
        "name": 5,
    }})
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.seed == 3
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.milestones == [10, 20]
    assert cfg.train.extra == {"w": 1.0}
    assert cfg.train.name == "5"


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("yes", True), ("1", True), ("false", False), ("no", False), ("0", False),
])
def test_bool_strings(text, expected):
    assert from_dict(Train, {"ema": text}).ema is expected


@pytest.mark.parametrize("text", ["null", "None", None])
def test_optional_accepts_null(text):
    assert from_dict(Train, {"name": text}).name is None


def test_literal_error_lists_choices():
    with pytest.raises(ConfigError, match=r"'train\.schedule' expects one of 'cosine', 'constant', got 'linear'"):
        from_dict(Recipe, {"train": {"schedule": "linear"}})


def test_wrong_type_message():
    with pytest.raises(ConfigError) as e:
        from_dict(Recipe, {"train": {"batch_size": "abc"}})
    assert str(e.value) == "config key 'train.batch_size' expects int, got 'abc' (str)"
    with pytest.raises(ConfigError, match=r"'train\.batch_size' expects int, got True \(bool\)"):
        from_dict(Recipe, {"train": {"batch_size": True}})
    with pytest.raises(ConfigError, match=r"'train\.betas' expects 2 items"):
        from_dict(Recipe, {"train": {"betas": [1, 2, 3]}})
    with pytest.raises(ConfigError, match=r"'train\.milestones\[1\]' expects int, got 'x'"):
        from_dict(Recipe, {"train": {"milestones": [1, "x"]}})


def test_section_given_scalar():
    with pytest.raises(ConfigError, match=r"section 'train' expects a mapping.*got 5 \(int\)"):
        from_dict(Recipe, {"train": 5})


def test_unknown_key_suggests_and_lists_section():
    with pytest.raises(ConfigError) as e:
        from_dict(Recipe, {"train": {"batchsize": 3}})
    msg = str(e.value)
    assert "unknown config key 'train.batchsize'" in msg
    assert "did you mean 'train.batch_size'?" in msg
    assert "valid keys under 'train': batch_size, lr, schedule, betas, name" in msg


def test_unknown_key_suggests_across_sections(presets):
    with pytest.raises(ConfigError) as e:
        load_config(Recipe, preset=None, preset_dir=presets, overrides=["lr=1"])
    assert "unknown config key 'lr'; did you mean 'train.lr'?" in str(e.value)
    assert "valid keys under the top level: train, seed" in str(e.value)


def test_validate_error_propagates(presets):
    with pytest.raises(ConfigError, match="train.batch_size must be > 0"):
        load_config(Recipe, preset="small", preset_dir=presets, overrides=["train.batch_size=0"])


def test_preset_inheritance_and_cycle(presets):
    cfg, _ = load_config(Recipe, preset="big", preset_dir=presets)
    assert (cfg.seed, cfg.train.batch_size, cfg.train.lr) == (1, 64, pytest.approx(1e-4))
    write(presets / "a.yaml", "base: b\n")
    write(presets / "b.yaml", "base: a\n")
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        load_config(Recipe, preset="a", preset_dir=presets)


def test_missing_preset_lists_available(presets):
    with pytest.raises(ConfigError, match=r"unknown preset 'smal'.*available presets in .*: big, small"):
        load_config(Recipe, preset="smal", preset_dir=presets)


def test_missing_config_file(presets, tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Recipe, preset=None, preset_dir=presets, config_file=str(tmp_path / "nope.yaml"))


def test_yaml_syntax_error_names_file_and_line(presets):
    bad = write(presets / "bad.yaml", "seed: 1\ntrain: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(Recipe, preset="bad", preset_dir=presets)
    assert str(bad) in str(e.value) and "line" in str(e.value)
    assert "\n" not in str(e.value)


def test_parse_override():
    assert parse_override("a.b.c=[1,2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=a=b") == (["x"], "a=b")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = deep_merge(base, {"a": {"b": 9}, "d": {"e": 4}})
    assert out == {"a": {"b": 9, "c": 2}, "d": {"e": 4}}
    out["a"]["c"] = 100
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_dump_yaml_round_trip(tmp_path):
    cfg = from_dict(Recipe, {"seed": 5, "train": {"lr": "1e-4", "name": "x", "extra": {"k": 2.0}}})
    path = tmp_path / "out" / "config.yaml"
    dump_yaml(cfg, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temp left
    assert yaml.safe_load(path.read_text())["train"]["betas"] == [0.9, 0.999]  # tuple -> list
    reloaded, _ = load_config(Recipe, preset=None, preset_dir=tmp_path, config_file=str(path))
    assert reloaded == cfg
    assert to_dict(from_dict(Recipe, to_dict(cfg))) == to_dict(cfg)


def test_unknown_key_without_close_match_or_section_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict(Recipe, {"train": {"zzzz": 1}})
    assert "did you mean" not in str(e.value)  # neither 'train' nor 'train.lr'
    with pytest.raises(ConfigError, match="'trian'; did you mean 'train'?"):
        from_dict(Recipe, {"trian": {"lr": 1}})
