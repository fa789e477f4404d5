"""raygen.jaxgen.fsdit: shapes in every cross-attention mode, adaLN-Zero (a fresh net predicts exactly
zero velocity), the parameter count of the named "big" size, the one CFG null shared by training and
sampling, what the supports reach in each mode, the unpatchify layout and the timestep scaling.

Every network here is the "debug" size at 8x8x4 with patch 2 (16 patches + CLS). XLA compiles are
the cost on CPU, so the tests share one initialisation and one jitted apply per network, compiled
with the backend optimisations off (the programs are tiny; compiling is what takes the time)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raygen.jaxgen.fsdit import FinalLayer, dummy_inputs, fsdit, init_params, param_count, timestep_frequencies

B, S, C, K, T_S, D = 3, 8, 4, 2, 3, 16
SHAPES = {"x": (B, S, S, C), "pooled": (B, K, D), "tokens": (B, K, T_S, D)}


def make_net(mode: str = "all", **kw):
    return fsdit("debug", S, C, D, patch_size=2, cross_attn=mode, **kw)


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)

NETS = {mode: make_net(mode) for mode in ("all", "cls", "none")}


def apply_fn(net):
    """One jitted __call__ per network (keep always passed as an array, so every call shares it)."""
    return fast_jit(lambda p, x, t, pooled, tokens, keep: net.apply({"params": p}, x, t, pooled, tokens, keep))


APPLY = {mode: apply_fn(net) for mode, net in NETS.items()}


def perturb(params, seed, scale=0.05):
    """Move every parameter off its init, so zero-initialised layers (adaLN, output projections) pass
    signal and outputs depend on everything they can depend on. numpy draws: no XLA compile per shape."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape),
                                                        p.dtype), params)


def inputs(seed: int):
    """x, t, pooled, tokens (numpy draws, for the same reason)."""
    rng = np.random.default_rng(seed)
    draw = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return draw(SHAPES["x"]), jnp.array([0.1, 0.5, 0.9]), draw(SHAPES["pooled"]), draw(SHAPES["tokens"])


@pytest.fixture(scope="module")
def fresh_params():
    # "all" has every parameter; "cls" has the same tree and "none" ignores the context entries
    net = NETS["all"]  # what init_params does, compiled fast
    return fast_jit(lambda r, args: net.init(r, *args)["params"])(jax.random.key(0), dummy_inputs(net, SHAPES))


@pytest.fixture(scope="module")
def params(fresh_params):
    return perturb(fresh_params, 1)


@pytest.mark.parametrize("mode", ["all", "cls", "none"])
def test_shapes_and_zero_init_velocity(mode, fresh_params, params):
    net = NETS[mode]
    x, t, pooled, tokens = inputs(0)
    keep = jnp.ones((B,), bool)
    out = APPLY[mode](fresh_params, x, t, pooled, tokens, keep)
    assert out.shape == (B, S, S, C) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0), "adaLN-Zero: a fresh network must predict exactly zero velocity"
    out = np.asarray(APPLY[mode](params, x, t, pooled, tokens, keep))
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-3

    y_cond, context = jax.eval_shape(lambda p: net.apply({"params": p}, pooled, tokens, keep,
                                                         method="encode_context"), fresh_params)
    assert y_cond.shape == (B, net.hidden_size)
    if mode == "none":
        assert context is None
    else:  # perceiver_latents=0: as many latents as patches
        assert context.shape == (B, (S // 2) ** 2, net.hidden_size)
        net5 = make_net(mode, perceiver_latents=5)
        p5 = jax.eval_shape(lambda r: init_params(net5, r, SHAPES), jax.random.key(0))
        assert p5["perceiver"]["latents"].shape == (5, net.hidden_size)
        ctx5 = jax.eval_shape(lambda p: net5.apply({"params": p}, pooled, tokens, keep, method="encode_context")[1], p5)
        assert ctx5.shape == (B, 5, net.hidden_size)


def test_big_size_parameter_count():
    """"big" (DiT-B/2 sizes) on 28x28x4 latents, support_dim 768: counted from shapes, nothing allocated.

    DiT-B/2 backbone (hidden 768, 12 blocks, 196 patches):
      block: qkv 768*2304+2304 + proj 768^2+768 + MLP 2*768*3072+3072+768 + adaLN 768*4608+4608
             = 10,628,352; x12 = 127,540,224
      patch embed 2*2*4*768+768 = 13,056; t-embedder 256*768+768 + 768^2+768 = 787,968;
      final layer 768*1536+1536 + 768*16+16 = 1,193,488                       -> 129,534,736
      (DiT-B/2's published ~130M also holds a 1001x768 label table, which FSDiT does not have)
    FSDiT, adaLN-only conditioning: + CLS 768 + projector 768*1536+1536 + 1536*768+768 = 2,361,600
      + LN(t), LN(y) 4*768 + s 1                                              -> 131,900,177
    cross-attention per block: q 768^2+768 + kv 768*1536+1536 + out 768^2+768 + 2 affine LNs 4*768
      = 2,365,440; x12 = 28,385,280
    Perceiver: ctx proj 768^2 + q, k, v, out 4*768^2 (no bias) + MLP 4,722,432 + 196*768 latents
      = 7,822,080
    total 131,900,177 + 28,385,280 + 7,822,080 = 168,107,537 (measured: the same)
    """
    shapes = {"x": (1, 28, 28, 4), "pooled": (1, 5, 768), "tokens": (1, 5, 16, 768)}

    def count(**kw):
        net = fsdit("big", 28, 4, 768, **kw)
        return param_count(jax.eval_shape(lambda r: init_params(net, r, shapes), jax.random.key(0)))

    n = count()
    assert 150e6 < n < 200e6, n
    assert n == 168_107_537, n
    assert count(cross_attn="none") == 131_900_177


def test_cfg_null_is_one_computation_in_training_and_sampling(params):
    """A sample dropped by the training mask (keep False in __call__) gets exactly the unconditional
    branch the sampler builds (encode_context with keep False, then velocity), and neither depends on
    the supports. The kept samples do depend on them."""
    net, apply = NETS["all"], APPLY["all"]
    x, t, pooled, tokens = inputs(0)
    _, _, other_pooled, other_tokens = inputs(1)
    keep = jnp.array([True, False, True])

    train = np.asarray(apply(params, x, t, pooled, tokens, keep))
    train_other = np.asarray(apply(params, x, t, other_pooled, other_tokens, keep))

    @fast_jit
    def sampler_null(p, x, t, pooled, tokens):
        y_cond, context = net.apply({"params": p}, pooled, tokens, jnp.zeros((B,), bool), method="encode_context")
        return net.apply({"params": p}, x, t, y_cond, context, method="velocity")

    null = np.asarray(sampler_null(params, x, t, other_pooled, other_tokens))
    np.testing.assert_allclose(train[1], null[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(train_other[1], train[1], rtol=0, atol=1e-6)
    for i in (0, 2):  # kept samples see their supports
        assert np.abs(train[i] - train_other[i]).max() > 1e-3
        assert np.abs(train[i] - null[i]).max() > 1e-3


@pytest.mark.parametrize("mode", ["all", "cls"])
def test_kept_sample_depends_on_pooled_and_on_tokens(mode, params):
    apply = APPLY[mode]
    x, t, pooled, tokens = inputs(0)
    _, _, other_pooled, other_tokens = inputs(1)
    keep = jnp.ones((B,), bool)
    base = np.asarray(apply(params, x, t, pooled, tokens, keep))
    assert np.abs(np.asarray(apply(params, x, t, other_pooled, tokens, keep)) - base).max() > 1e-3
    assert np.abs(np.asarray(apply(params, x, t, pooled, other_tokens, keep)) - base).max() > 1e-3


def test_none_mode_ignores_tokens(params):
    x, t, pooled, tokens = inputs(0)
    _, _, _, other_tokens = inputs(1)
    keep = jnp.ones((B,), bool)
    a = APPLY["none"](params, x, t, pooled, tokens, keep)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(APPLY["none"](params, x, t, pooled, other_tokens, keep)))


def test_cls_mode_only_the_cls_token_reads_the_context(params):
    """With one block, "cls" patches cannot see the supports' tokens (only CLS queried them, and no
    later self-attention carries that to the patches); with "all" they can."""
    one_block = {k: v for k, v in params.items() if k != "blocks_1"}
    x, t, pooled, tokens = inputs(0)
    _, _, _, other_tokens = inputs(1)
    keep = jnp.ones((B,), bool)
    cls_net = apply_fn(make_net("cls", depth=1))
    np.testing.assert_array_equal(np.asarray(cls_net(one_block, x, t, pooled, tokens, keep)),
                                  np.asarray(cls_net(one_block, x, t, pooled, other_tokens, keep)))
    all_net = apply_fn(make_net("all", depth=1))
    diff = all_net(one_block, x, t, pooled, tokens, keep) - all_net(one_block, x, t, pooled, other_tokens, keep)
    assert np.abs(np.asarray(diff)).max() > 1e-3


def test_configuration_errors(fresh_params):
    x, t, pooled, tokens = inputs(0)
    keep = jnp.ones((B,), bool)

    def trace(net, tokens):
        return jax.eval_shape(lambda p: net.apply({"params": p}, x, t, pooled, tokens, keep), fresh_params)

    with pytest.raises(ValueError, match="cross_attn"):
        trace(make_net("bogus"), tokens)
    with pytest.raises(ValueError, match="use_support_tokens"):
        trace(make_net("all", use_support_tokens=False), tokens)
    with pytest.raises(ValueError, match="tokens=None"):
        trace(make_net("cls"), None)
    assert trace(make_net("none", use_support_tokens=False), None).shape == (B, S, S, C)
    with pytest.raises(ValueError, match="unknown FSDiT size"):
        fsdit("huge", S, C, D)


def test_final_layer_unpatchify_layout():
    """Token n = gy*g + gx, channel (py*p + px)*C + c lands at pixel (gy*p + py, gx*p + px, c): the
    row-major patch order of the patch embedding (DiT's unpatchify, in NHWC)."""
    p, ch, g = 2, 3, 2
    hidden = p * p * ch
    layer = FinalLayer(hidden, p, ch)
    tokens = jnp.asarray(np.random.default_rng(3).standard_normal((1, 1 + g * g, hidden)), jnp.float32)
    c = jnp.zeros((1, hidden))
    shapes = jax.eval_shape(layer.init, jax.random.key(0), tokens, c)["params"]
    params = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)  # adaLN zero: identity modulation
    params["linear"]["kernel"] = jnp.eye(hidden)
    out = np.asarray(fast_jit(layer.apply)({"params": params}, tokens, c))

    tok = np.asarray(tokens[0, 1:], np.float64)  # the CLS token is dropped
    tok = (tok - tok.mean(-1, keepdims=True)) / np.sqrt(tok.var(-1, keepdims=True) + 1e-6)
    expected = np.zeros((g * p, g * p, ch))
    for gy in range(g):
        for gx in range(g):
            for py in range(p):
                for px in range(p):
                    expected[gy * p + py, gx * p + px] = tok[gy * g + gx, (py * p + px) * ch:(py * p + px + 1) * ch]
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_timestep_features_use_t_times_1000():
    t = jnp.array([0.0, 0.37, 1.0])
    f = np.asarray(timestep_frequencies(t))
    freqs = np.exp(-math.log(1e4) * np.arange(128) / 128)
    args = np.asarray([0.0, 0.37, 1.0])[:, None] * 1000.0 * freqs[None]
    np.testing.assert_allclose(f, np.concatenate([np.cos(args), np.sin(args)], axis=1), atol=2e-4)
