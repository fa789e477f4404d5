"""raygen.jaxgen.flow: the time sampler, the clipped interpolation and its target, the loss (against
an oracle velocity and a zero-velocity network), gradients under jit, the Euler loop against closed
forms, and the guided sampler against a plain Python loop that reruns the whole network every step.

XLA compiles are the cost on CPU: numpy draws the test inputs, and the few jitted programs are compiled
with the backend optimisations off (they are tiny; compiling is what takes the time)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raygen.jaxgen.flow import (FlowConfig, cfg_keep_mask, clip_t, euler_loop, euler_sample, euler_sample_jit,
                                flow_draws, flow_loss, interpolate, sample_t, velocity_target)
from raygen.jaxgen.fsdit import dummy_inputs, fsdit

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)

B, S, C, K, T_S, D = 3, 8, 4, 2, 3, 16
SHAPES = {"x": (B, S, S, C), "pooled": (B, K, D), "tokens": (B, K, T_S, D)}
NET = fsdit("debug", S, C, D, patch_size=2, cross_attn="all")


def draw(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": draw(rng, SHAPES["x"]), "pooled": draw(rng, SHAPES["pooled"]), "tokens": draw(rng, SHAPES["tokens"])}


@pytest.fixture(scope="module")
def fresh_params():
    return fast_jit(lambda r, args: NET.init(r, *args)["params"])(jax.random.key(0), dummy_inputs(NET, SHAPES))


@pytest.fixture(scope="module")
def params(fresh_params):
    """Every parameter moved off its init, so the zero-initialised layers pass signal."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p) + 0.05 * rng.standard_normal(p.shape),
                                                        p.dtype), fresh_params)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_t_matches_its_mean_and_std(mean, std):
    cfg = FlowConfig(logit_mean=mean, logit_std=std)
    t = np.asarray(sample_t(jax.random.key(7), 20_000, cfg), np.float64)
    assert np.all((t > 0) & (t < 1))
    logit = np.log(t) - np.log1p(-t)
    # standard error of the mean is std/sqrt(20k) ~ 0.007
    assert abs(logit.mean() - mean) < 0.03 and abs(logit.std() - std) < 0.03


def test_uniform_t():
    t = np.asarray(sample_t(jax.random.key(7), 20_000, FlowConfig(t_sampler="uniform")))
    assert np.all((t >= 0) & (t < 1)) and abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005
    with pytest.raises(ValueError, match="t_sampler"):
        FlowConfig(t_sampler="cosine")


def test_interpolation_clip_touches_only_times_above_the_clip():
    rng = np.random.default_rng(0)
    x1, eps = (rng.standard_normal((5, 2, 2, 3)).astype(np.float32) for _ in range(2))
    t = np.array([0.0, 0.3, 0.99, 0.995, 1.0])
    x_t = np.asarray(interpolate(jnp.asarray(x1, jnp.float32), jnp.asarray(eps, jnp.float32),
                                 jnp.asarray(t, jnp.float32), 0.99), np.float64)
    path = lambda s, i: (1 - s) * eps[i] + s * x1[i]
    for i in range(3):  # t <= 0.99: the plain straight path
        np.testing.assert_allclose(x_t[i], path(t[i], i), atol=1e-6)
    for i in (3, 4):  # above: held at 0.99, 1% of the noise left in
        np.testing.assert_allclose(x_t[i], path(0.99, i), atol=1e-6)
        assert np.abs(x_t[i] - path(t[i], i)).max() > 1e-4
    np.testing.assert_allclose(np.asarray(interpolate(jnp.asarray(x1), jnp.asarray(eps), jnp.ones(5), 1.0)), x1,
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(velocity_target(jnp.asarray(x1), jnp.asarray(eps))), x1 - eps)
    np.testing.assert_array_equal(np.asarray(clip_t(jnp.asarray(t), 0.99)), np.minimum(t, 0.99).astype(np.float32))


class OracleNet:
    """Stands in for the network: inverts the interpolation at the time it is given, returning x1 - eps,
    the exact target, only if that time is the one the interpolation used. Records what it was given."""

    def __init__(self, x1):
        self.x1, self.seen = x1, {}

    def apply(self, variables, x_t, t, pooled, tokens, keep):
        self.seen.update(t=t, keep=keep, pooled=pooled, tokens=tokens)
        s = t[:, None, None, None]
        eps = (x_t - s * self.x1) / (1 - s)
        return self.x1 - eps


def test_flow_loss_feeds_the_clipped_time_and_regresses_x1_minus_eps():
    rng = np.random.default_rng(2)
    x1 = draw(rng, (64, 2, 2, 3))
    data = {"x": x1, "pooled": draw(rng, (64, 2, 5)), "tokens": None}
    cfg = FlowConfig(t_sampler="uniform", t_clip=0.9, cfg_drop=0.5)
    key = jax.random.key(11)
    _, t, keep = flow_draws(key, x1, cfg)
    assert np.sum(np.asarray(t) > 0.9) >= 3, "the draw must clip some samples for this test to mean anything"

    net = OracleNet(x1)
    loss, aux = flow_loss(net, None, data, key, cfg)
    assert float(loss) < 1e-8
    np.testing.assert_array_equal(np.asarray(net.seen["t"]), np.minimum(np.asarray(t), 0.9))
    np.testing.assert_array_equal(np.asarray(aux["t"]), np.asarray(net.seen["t"]))
    # the CFG mask: drawn as uniform >= cfg_drop from the key's own split, handed to the network as is
    np.testing.assert_array_equal(np.asarray(net.seen["keep"]), np.asarray(keep))
    np.testing.assert_array_equal(np.asarray(aux["keep"]), np.asarray(keep))
    assert 0 < np.asarray(keep).sum() < 64 and net.seen["pooled"] is data["pooled"]


def test_cfg_keep_mask_drops_the_configured_fraction():
    keep = np.asarray(cfg_keep_mask(jax.random.key(3), 20_000, 0.1))
    assert keep.dtype == bool and abs(keep.mean() - 0.9) < 0.01
    assert np.asarray(cfg_keep_mask(jax.random.key(3), 100, 0.0)).all()
    assert not np.asarray(cfg_keep_mask(jax.random.key(3), 100, 1.0)).any()


@pytest.fixture(scope="module")
def loss_and_grad():
    cfg = FlowConfig()
    return fast_jit(jax.value_and_grad(lambda p, b, k: flow_loss(NET, p, b, k, cfg), has_aux=True)), cfg


def test_zero_velocity_network_loss_is_mean_squared_target(loss_and_grad, fresh_params):
    fn, cfg = loss_and_grad
    data, key = batch(0), jax.random.key(5)
    (loss, aux), grads = fn(fresh_params, data, key)
    eps = np.asarray(flow_draws(key, data["x"], cfg)[0], np.float64)
    x1 = np.asarray(data["x"], np.float64)
    expected = ((x1 - eps) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(aux["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_flow_loss_gradients_are_finite_and_reach_the_support_path(loss_and_grad, params):
    fn, _ = loss_and_grad
    (loss, aux), grads = fn(params, batch(0), jax.random.key(5))
    assert np.isfinite(float(loss)) and aux["loss"].shape == (B,) and aux["t"].shape == (B,)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    for path in (("perceiver", "ctx_proj", "kernel"), ("blocks_0", "cross_attn", "kv", "kernel"),
                 ("y_embedder", "Dense_0", "kernel"), ("y_scale",)):
        g = grads
        for name in path:
            g = g[name]
        assert np.abs(np.asarray(g)).max() > 0, path


def exact_euler(v, x0, steps):
    x = np.asarray(x0, np.float64)
    for i in range(steps):
        x = x + v(x, i / steps) / steps
    return x


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_euler_loop_matches_the_exact_recursion(steps):
    rng = np.random.default_rng(4)
    x0, a, c = rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    j = lambda z: jnp.asarray(z, jnp.float32)
    # v = a - x: x_N = a + (x0 - a)(1 - 1/N)^N
    out = np.asarray(euler_loop(lambda x, t: j(a) - x, j(x0), steps))
    np.testing.assert_allclose(out, exact_euler(lambda x, t: a - x, x0, steps), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, a + (x0 - a) * (1 - 1 / steps) ** steps, rtol=1e-5, atol=1e-6)
    # v = t*c probes the time grid t_i = i/N (not (i+1)/N): x_N = x0 + c (N-1) / (2N)
    out = np.asarray(euler_loop(lambda x, t: t * j(c), j(x0), steps))
    np.testing.assert_allclose(out, x0 + c * (steps - 1) / (2 * steps), rtol=1e-5, atol=1e-6)


def test_guided_sampler_matches_a_loop_that_reruns_the_whole_network(params):
    """The fori_loop sampler, conditioning encoded once, against a Python loop calling the full network
    (projector, Perceiver and all) for each branch at every step; w = 1 must be the purely conditional
    flow and w = 0 the purely unconditional one."""
    data, steps = batch(3), 4
    noise = draw(np.random.default_rng(9), SHAPES["x"])
    sampler = fast_jit(euler_sample, static_argnames=("net", "steps"))
    forward = fast_jit(lambda p, x, t, pooled, tokens, keep: NET.apply({"params": p}, x, t, pooled, tokens, keep))
    ones, zeros = jnp.ones((B,), bool), jnp.zeros((B,), bool)

    def reference(w):
        x = noise
        for i in range(steps):
            t = jnp.full((B,), i / steps, jnp.float32)
            v_c = forward(params, x, t, data["pooled"], data["tokens"], ones)
            v_u = forward(params, x, t, data["pooled"], data["tokens"], zeros)
            v = {1.0: v_c, 0.0: v_u}.get(w, v_u + w * (v_c - v_u))
            x = x + v / steps
        return np.asarray(x)

    out = {}
    for w in (3.0, 1.0, 0.0):
        out[w] = np.asarray(sampler(NET, params, noise, data["pooled"], data["tokens"], steps=steps,
                                    cfg_scale=jnp.float32(w)))
        np.testing.assert_allclose(out[w], reference(w), rtol=1e-5, atol=1e-5, err_msg=f"cfg_scale={w}")
    assert np.abs(out[3.0] - out[1.0]).max() > 1e-3 and np.abs(out[1.0] - out[0.0]).max() > 1e-3


def test_sampler_traces_under_jit_without_support_tokens():
    """The exported jitted sampler (steps static) traces; cross_attn="none" runs with tokens=None."""
    net = fsdit("debug", S, C, D, patch_size=2, cross_attn="none", use_support_tokens=False)
    shapes = {"x": SHAPES["x"], "pooled": SHAPES["pooled"]}
    p = jax.eval_shape(lambda r: net.init(r, *dummy_inputs(net, shapes))["params"], jax.random.key(0))
    noise = jax.ShapeDtypeStruct(SHAPES["x"], jnp.float32)
    pooled = jax.ShapeDtypeStruct(SHAPES["pooled"], jnp.float32)
    out = jax.eval_shape(lambda p, n, y: euler_sample_jit(net, p, n, y, None, steps=5, cfg_scale=2.0), p, noise, pooled)
    assert out.shape == SHAPES["x"] and out.dtype == jnp.float32
