"""The one registry: every built-in recipe is complete, and an incomplete record is refused when it is
registered, naming what is missing."""
import dataclasses

import pytest

from raygen import recipes
from raygen.core.contracts import Method, NetSpec, Task
from raygen.recipes import Recipe, register
from raygen.train.config import LogConfig, TrainConfig


@dataclasses.dataclass
class GoodConfig:
    run: dict = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)


class GoodTask(Task):
    def net_spec(self):
        return NetSpec("torch.nn:Identity")

    def build_method(self):
        raise NotImplementedError

    def preview(self, net, generator):
        raise NotImplementedError


def run(cfg, run_dir, callbacks=()):
    return {}


def metrics(cfg, eval_only=False, during_training=False):
    return []


def test_builtin_recipes_are_registered_once_and_complete():
    assert {"dit", "drifting", "latent_mae"} <= set(recipes.names())
    for name in ("dit", "drifting", "latent_mae"):
        r = recipes.get(name)
        assert r.name == name and issubclass(r.task, Task) and callable(r.run) and callable(r.reported_metrics)
    assert recipes.get("dit").evaluate is not None and recipes.get("latent_mae").evaluate is None


def test_a_complete_recipe_registers():
    r = register(Recipe(name="test_good", config=GoodConfig, task=GoodTask, run=run, reported_metrics=metrics))
    assert recipes.get("test_good") is r


@pytest.mark.parametrize("missing", ["run", "reported_metrics", "task", "config"])
def test_a_recipe_missing_a_required_piece_is_refused_naming_it(missing):
    fields = dict(name=f"test_no_{missing}", config=GoodConfig, task=GoodTask, run=run, reported_metrics=metrics)
    fields[missing] = None
    with pytest.raises(TypeError, match=f"missing {missing}"):
        register(Recipe(**fields))
    assert f"test_no_{missing}" not in recipes.names()


def test_a_task_that_does_not_implement_the_contract_is_refused():
    class HalfTask(Task):
        def net_spec(self):
            return NetSpec("torch.nn:Identity")

    with pytest.raises(TypeError, match="build_method, preview"):
        register(Recipe(name="test_half", config=GoodConfig, task=HalfTask, run=run, reported_metrics=metrics))


def test_a_config_without_the_run_sections_is_refused():
    @dataclasses.dataclass
    class NoTrain:
        run: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="lacks the section.*train, log"):
        register(Recipe(name="test_sections", config=NoTrain, task=GoodTask, run=run, reported_metrics=metrics))


def test_a_method_must_define_its_loss():
    class NoLoss(Method):
        pass

    with pytest.raises(TypeError):
        NoLoss()


def test_unknown_recipe_lists_the_known_ones():
    from raygen.config import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*dit.*drifting"):
        recipes.get("nope")


def test_a_second_recipe_under_a_taken_name_is_refused():
    @dataclasses.dataclass
    class OtherConfig(GoodConfig):
        pass

    register(Recipe(name="test_twice", config=GoodConfig, task=GoodTask, run=run, reported_metrics=metrics))
    register(Recipe(name="test_twice", config=GoodConfig, task=GoodTask, run=run, reported_metrics=metrics))  # a re-import
    with pytest.raises(TypeError, match="'test_twice' is registered twice"):
        register(Recipe(name="test_twice", config=OtherConfig, task=GoodTask, run=run, reported_metrics=metrics))


def test_image_recipes_name_their_method_and_share_the_sequence():
    """The network x method recipes are one `image_recipe` call each: the method the task builds is the
    one whose sampler settings the reported metrics follow, and a task that names no method is refused."""
    from raygen.methods.ddpm import DDPM
    from raygen.methods.edm import EDM
    from raygen.methods.sdd import BetaDiffusion
    from raygen.recipes.common import ImageTask, image_recipe

    for name, method in (("dit", DDPM), ("diffit", DDPM), ("edm", EDM), ("sdd", BetaDiffusion)):
        r = recipes.get(name)
        assert r.task.method_cls is method and r.evaluate is not None
        setting, cfg = next(iter(method.sampler_settings)), r.config()
        cfg.eval.sweep = None
        assert f"fid@{setting}=1" not in r.reported_metrics(cfg)
        cfg.eval.sweep = {setting: [1, 2]}
        assert f"fid@{setting}=1" in r.reported_metrics(cfg)

    class NoMethod(ImageTask):
        def net_spec(self):
            return NetSpec("torch.nn:Identity")

    with pytest.raises(TypeError, match="NoMethod must name its method"):
        image_recipe("test_no_method", GoodConfig, NoMethod, description="")
    assert "test_no_method" not in recipes.names()
