"""Configs that say what ran: validation only checks, the recipe's resolve step derives values into a
new config (the user's keys untouched), and config.yaml marks every key given, resolved or default."""
import yaml

from raygen import recipes
from raygen.cli import load_resolved
from raygen.config import flatten, render_marked, to_dict


def test_resolve_leaves_the_given_config_untouched_and_derives_the_batch_size():
    rec = recipes.get("drifting")
    cfg, given_cfg, given = load_resolved(rec, preset="smoke", overrides=["batch.nc=5"])
    before = to_dict(given_cfg)
    assert given_cfg.train.batch_size == 0  # as given: the recipe derives it
    assert cfg.train.batch_size == 5 * cfg.batch.gen  # resolved: nc x G
    assert to_dict(given_cfg) == before and cfg is not given_cfg and cfg.train is not given_cfg.train
    assert recipes.resolved(rec, cfg) == cfg  # resolving twice changes nothing


def test_config_yaml_marks_given_resolved_and_default_keys_and_reloads_to_the_same_config():
    rec = recipes.get("drifting")
    cfg, given_cfg, given = load_resolved(rec, preset="smoke", overrides=["batch.nc=5"])
    text = render_marked(cfg, given, given_cfg)
    lines = {ln.strip().split(":")[0]: ln for ln in text.splitlines() if ":" in ln and not ln.startswith("#")}
    assert "# given" in lines["nc"] and "# given" in lines["arch"]
    batch_size = [ln for ln in text.splitlines() if ln.strip().startswith("batch_size: 40")]
    assert batch_size and "# resolved (was 0)" in batch_size[0]
    assert lines["coupling"].strip() == "coupling: partial_two_sided"  # a default: unmarked
    assert yaml.safe_load(text) == to_dict(cfg)  # the comments do not change what it loads as
    # the dict-valued eval keys are leaves, marked as a whole
    assert "# given" in lines["sweep"] and flatten(given)["eval.sweep.omega"] == [1.0, 2.0]


def test_planning_a_sweep_grid_point_does_not_change_the_base():
    from raygen.tune import sweep as sw

    spec = sw.load_sweep("drifting_coupling_smoke")
    trials = sw.plan(spec)
    assert all(t.cfg.train.batch_size == t.cfg.batch.nc * t.cfg.batch.gen for t in trials)
