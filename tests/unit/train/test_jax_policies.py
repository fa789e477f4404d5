"""The JAX backend's loop policies against references computed another way: the LR schedule against
the torch loop's `lr_factor`, the optimizer against torch.optim (AdamW, Adam, clipping), the EMA against
its closed form, and a non-finite step left out."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from raygen.train.config import OptimConfig, TrainConfig  # noqa: E402
from raygen.train.state import lr_factor  # noqa: E402


@pytest.mark.parametrize("schedule, warmup, min_ratio", [("constant", 10, 0.0), ("cosine", 10, 0.1), ("cosine", 0, 0.0)])
def test_lr_schedule_matches_the_torch_loop(schedule, warmup, min_ratio):
    from raygen.train.jax_backend import lr_schedule

    optim = OptimConfig(lr=3e-4, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_ratio)
    fn = lr_schedule(optim, total_steps=100)
    for step in (0, 1, 5, 9, 10, 11, 50, 99, 120):
        assert float(fn(step)) == pytest.approx(3e-4 * lr_factor(step, warmup, 100, schedule, min_ratio), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("kind, wd, clip", [("adamw", 0.05, 0.5), ("adam", 0.0, 0.0)])
def test_optimizer_matches_torch(kind, wd, clip):
    """Three steps of the optax chain equal torch's clip_grad_norm_ + AdamW/Adam on the same gradients."""
    import jax.numpy as jnp
    import optax

    from raygen.train.jax_backend import build_optimizer

    optim = OptimConfig(kind=kind, lr=1e-2, weight_decay=wd, betas=(0.9, 0.99), eps=1e-8, warmup_steps=0,
                        schedule="constant", grad_clip=clip)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) * s for s in (1.0, 3.0, 0.2)]
    opt = build_optimizer(optim, total_steps=10)
    params = {"w": jnp.asarray(w0)}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    topt = cls([w], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, **({"weight_decay": wd} if kind == "adamw" else {}))
    for g in grads:
        w.grad = torch.from_numpy(g.copy())
        if clip:
            torch.nn.utils.clip_grad_norm_([w], clip)
        topt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)


def _tiny_step(tc: TrainConfig):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from raygen.core.contracts import Method
    from raygen.train.jax_backend import build_optimizer, make_train_step

    class Square(Method):
        def loss(self, net, batch, key):
            return (net(batch["x"]) - batch["y"]) ** 2

    net = nn.Dense(1)
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
    optim = OptimConfig(lr=0.1, warmup_steps=0, grad_clip=0.0)
    opt = build_optimizer(optim, 10)
    state = {"params": params, "ema": jax.tree.map(jnp.copy, params), "opt_state": opt.init(params),
             "step": jnp.int32(0), "key": jax.random.key_data(jax.random.key(1))}
    batch = {"x": jnp.ones((4, 2)), "y": jnp.full((4, 1), 3.0)}
    return make_train_step(net, Square(), opt, tc), state, batch


def test_ema_is_the_closed_form_and_a_nonfinite_step_changes_nothing():
    import jax

    step, state, batch = _tiny_step(TrainConfig(nonfinite_grads="skip"))
    before = jax.tree.map(np.asarray, state)
    new, out = step(state, batch, np.float32(0.75), np.float32(1.0))
    assert bool(out["finite"]) and int(new["step"]) == 1
    for p0, p1, e1 in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(new["params"]),
                          jax.tree.leaves(new["ema"])):
        # ema = e0 + (1 - d)(p1 - e0) with e0 = p0
        np.testing.assert_allclose(np.asarray(e1), 0.75 * p0 + 0.25 * np.asarray(p1), rtol=1e-6)
    kept = jax.tree.map(np.asarray, new)
    new2, out2 = step(new, batch, np.float32(0.75), np.float32("nan"))  # a NaN loss: skip the update
    assert not bool(out2["finite"]) and int(new2["step"]) == 2
    for a, b in zip(jax.tree.leaves(kept["params"]) + jax.tree.leaves(kept["opt_state"]),
                    jax.tree.leaves(new2["params"]) + jax.tree.leaves(new2["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
