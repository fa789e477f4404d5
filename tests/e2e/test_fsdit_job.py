"""FSDiT end to end: the job (episodes, SigLIP supports, target store, JaxTrainer with a worker failure
and a restart, export, few-shot evaluation), then the same training on 2 data-parallel workers with
no failure, which must land on the same parameters."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _final_state(run_dir: Path, task):
    from raygen.train.checkpoint import latest_checkpoint, read_record
    from raygen.train.jax_backend import build_optimizer, initial_state, restore_state

    ckpt = latest_checkpoint(run_dir)
    like = initial_state(task, task.build_net(), build_optimizer(task.cfg.optim, task.cfg.train.steps),
                         task.cfg.train.seed)
    return restore_state(ckpt / "state", like), read_record(ckpt)


@pytest.mark.slow
def test_fsdit_smoke_with_failure_then_two_workers_agree(run_job, tmp_path):
    import jax

    from raygen.config import load_config
    from raygen.core.job import preset_dir
    from raygen.recipes.fsdit import FSDiTConfig, FSDiTTask, prepare_stages
    from raygen.train.driver import fit
    from raygen.train.jax_backend import load_exported_jax

    from raygen.data.tiny_models import tiny_siglip

    # a local SigLIP directory (the hub-id-or-path loading code); untrained: the default's brief training
    # into the cache is the job's, measured in the README, and would only cost time here
    siglip = tiny_siglip(tmp_path / "siglip", steps=0)
    run_dir, proc = run_job("fsdit", "--preset", "smoke", "debug.fail_at_step=12", "run.name=fs",
                            f"stage.siglip={siglip}")
    assert run_dir.parent == tmp_path / "fsdit"
    for stage in ("stage 1: episodes", "stage 2: support embeddings", "stage 3: target images", "stage 4: training"):
        assert stage in proc.stdout
    assert (run_dir / ".debug_failed_at_12").exists()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20], "restarted at step 10: every step logged once"
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)

    # the evaluation: every promised number, in range, and the grids
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert m["num_classes"] == 20 and m["chance"] == pytest.approx(0.05) and m["num_generated"] == 20 * 2 * 2
    assert 0.0 <= m["fewshot_accuracy"] <= 1.0 and m["real_accuracy"] > 0.3  # the judge learned the unseen classes
    assert 0.0 <= m["own_closer_fraction"] <= 1.0 and m["fid_class_mean"] > 0 and len(m["fid_per_class"]) == 20
    assert m["steps"] == 4 and m["cfg_scale"] == 2.0
    for png in ("eval/fewshot_grid.png", "eval/samples.png", "plots/training.png", "samples/step_0000020.png"):
        Image.open(run_dir / png).verify()

    # the export rebuilds the network from its NetSpec and holds the final checkpoint's EMA
    cfg, _ = load_config(FSDiTConfig, preset=None, preset_dir=preset_dir("fsdit"),
                         config_file=str(run_dir / "config.yaml"))
    cfg = prepare_stages(cfg, tmp_path)
    task = FSDiTTask(cfg)
    net, ema, record = load_exported_jax(run_dir)
    assert record["step"] == 20 and net.depth == 2 and net.patch_size == 4
    state, ckpt_record = _final_state(run_dir, task)
    assert ckpt_record["backend"] == "jax" and ckpt_record["counters"]["step"] == 20
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state["ema"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the same 20 steps on 2 workers (one global batch, one mesh), uninterrupted: the same parameters
    two = tmp_path / "two_workers"
    cfg2, _ = load_config(FSDiTConfig, preset=None, preset_dir=preset_dir("fsdit"),
                          config_file=str(run_dir / "config.yaml"),
                          overrides=["train.num_workers=2", "debug.fail_at_step=null", "eval.enabled=false",
                                     "log.wandb=false", "log.tensorboard=false"])
    cfg2 = prepare_stages(cfg2, tmp_path)
    result = fit(FSDiTTask(cfg2), two)
    assert result.error is None
    state2, _ = _final_state(two, FSDiTTask(cfg2))
    for key in ("params", "ema"):
        for a, b in zip(jax.tree.leaves(state[key]), jax.tree.leaves(state2[key])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    losses2 = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses2, [r["loss"] for r in records], rtol=1e-4)
