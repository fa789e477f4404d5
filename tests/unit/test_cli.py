"""The job contract's bad inputs: each stops before anything is written, with one line that names
the key or path and the fix (exit code 2)."""
import subprocess
import sys
from pathlib import Path

import pytest

from raygen.cli import run_job

ROOT = Path(__file__).resolve().parents[2]


def run_bad(args, tmp_path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_job("dit", args + ["--runs-root", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.yaml")), "half-written run"
    return capsys.readouterr().err


def test_unknown_key_names_the_closest_match(tmp_path, capsys):
    err = run_bad(["train.stpes=10"], tmp_path, capsys)
    assert "unknown config key 'train.stpes'" in err and "did you mean 'train.steps'" in err


def test_wrong_type(tmp_path, capsys):
    err = run_bad(["train.batch_size=many"], tmp_path, capsys)
    assert "'train.batch_size' expects int" in err


def test_schedule_that_does_not_reach_noise(tmp_path, capsys):
    err = run_bad(["method.schedule=linear", "method.num_timesteps=100", "method.sample_steps=10"], tmp_path, capsys)
    assert "never reaches noise" in err and "method.short_schedule=rescale" in err


def test_batch_not_divisible_by_workers(tmp_path, capsys):
    err = run_bad(["train.num_workers=3", "train.batch_size=128"], tmp_path, capsys)
    assert "train.batch_size=128 is not divisible" in err


def test_unknown_preset_lists_the_shipped_ones(tmp_path, capsys):
    err = run_bad(["--preset", "nope"], tmp_path, capsys)
    assert "smoke" in err and "default" in err


def test_unwritable_run_directory(tmp_path, capsys):
    # a path under a regular file cannot be created, even by root
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        run_job("dit", ["--runs-root", str(blocker / "runs")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write the run directory" in err and "--runs-root" in err


def test_help_lists_every_config_key():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "dit.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for key in ("method.cfg_scale", "train.ckpt_every", "eval.sweep", "--preset", "--runs-root"):
        assert key in out
