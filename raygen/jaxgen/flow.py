"""Flow matching for FSDiT: the training objective, the classifier-free-guidance drop, the Euler sampler.

Flow matching (Lipman et al., arXiv 2210.02747) with the straight-line path of rectified flow
(Liu et al., arXiv 2209.03003). Convention: t = 0 is noise, t = 1 is data,

    x_t = (1 - t) * eps + t * x1,        v = dx_t/dt = x1 - eps,

and the network regresses v from (x_t, t, supports). Sampling integrates dx/dt = v from noise at t = 0 to
t = 1. Training times are drawn logit-normal by default (SD3, Esser et al., arXiv 2403.03206), which
spends more of the training on the middle of the path where the velocity is hardest to predict.

Classifier-free guidance (Ho & Salimans, arXiv 2207.12598): in training a fraction `cfg_drop` of the
samples lose their supports (the network's `encode_context` zeroes them where `keep` is False); the
sampler runs both branches and extrapolates, v = v_u + w * (v_c - v_u). See docs/methods/fsdit.md.

`net` is an `FSDiT` (raygen/jaxgen/fsdit.py) or any Flax module with the same `__call__`,
`encode_context` and `velocity`; `params` is its "params" collection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

T_SAMPLERS = ("logit_normal", "uniform")


@dataclass(frozen=True)
class FlowConfig:
    t_sampler: str = "logit_normal"  # "logit_normal" | "uniform"
    logit_mean: float = 0.0  # logit(t) ~ N(logit_mean, logit_std^2) for "logit_normal"
    logit_std: float = 1.0
    t_clip: float = 0.99  # training times above this are clipped (see `clip_t`)
    cfg_drop: float = 0.1  # fraction of training samples trained unconditionally
    steps: int = 50  # Euler steps of the sampler
    cfg_scale: float = 3.0  # guidance weight w: 1 = conditional, 0 = unconditional

    def __post_init__(self):
        if self.t_sampler not in T_SAMPLERS:
            raise ValueError(f"t_sampler must be one of {T_SAMPLERS}, got {self.t_sampler!r}")
        if not 0.0 < self.t_clip <= 1.0:
            raise ValueError(f"t_clip must be in (0, 1], got {self.t_clip}")
        if not 0.0 <= self.cfg_drop <= 1.0:
            raise ValueError(f"cfg_drop must be in [0, 1], got {self.cfg_drop}")


def sample_t(key: Array, n: int, cfg: FlowConfig) -> Array:
    """n training times in (0, 1): sigmoid(N(logit_mean, logit_std^2)) (SD3's logit-normal) or uniform."""
    if cfg.t_sampler == "logit_normal":
        return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (n,), jnp.float32))
    if cfg.t_sampler == "uniform":
        return jax.random.uniform(key, (n,), jnp.float32)
    raise ValueError(f"t_sampler must be one of {T_SAMPLERS}, got {cfg.t_sampler!r}")


def clip_t(t: Array, t_clip: float) -> Array:
    """min(t, t_clip). The clip keeps a little noise (1 - t_clip of eps) in every training input, so no
    step trains on clean data. The target x1 - eps does not depend on t, so the clip changes only the
    input; and the network is told the clipped t, the time its input x_t actually sits at on the path
    (telling it the unclipped t would pair an input with a time it does not match). The sampler never
    asks for t above 1 - 1/steps, so nothing it needs is lost."""
    return jnp.minimum(t, t_clip)


def interpolate(x1: Array, eps: Array, t: Array, t_clip: float = 1.0) -> Array:
    """x_t = (1 - tc) * eps + tc * x1 with tc = min(t, t_clip); t is [B], x1 and eps [B, ...]."""
    tc = clip_t(t, t_clip).reshape(-1, *([1] * (x1.ndim - 1)))
    return (1 - tc) * eps + tc * x1


def velocity_target(x1: Array, eps: Array) -> Array:
    """The regression target v = x1 - eps (the derivative of the straight path; independent of t)."""
    return x1 - eps


def cfg_keep_mask(key: Array, n: int, cfg_drop: float) -> Array:
    """[n] bool, True = conditional: each sample is dropped (trained unconditionally) with probability cfg_drop."""
    return jax.random.uniform(key, (n,)) >= cfg_drop


def flow_draws(key: Array, x1: Array, cfg: FlowConfig) -> tuple[Array, Array, Array]:
    """The random draws of one training step, each from its own split of `key`: (eps like x1, t [B], keep [B])."""
    k_eps, k_t, k_keep = jax.random.split(key, 3)
    b = x1.shape[0]
    eps = jax.random.normal(k_eps, x1.shape, jnp.float32)
    return eps, sample_t(k_t, b, cfg), cfg_keep_mask(k_keep, b, cfg.cfg_drop)


def flow_loss(net, params, batch: dict, key: Array, cfg: FlowConfig) -> tuple[Array, dict]:
    """Flow-matching loss: mean over all elements of (v_pred - (x1 - eps))^2.

    batch: "x" [B,H,W,C] data, "pooled" [B,K,D], optionally "tokens" [B,K,T,D]. Returns (loss, aux) with
    aux["loss"] the per-sample loss [B], aux["t"] the time the network was given (clipped) [B], for a
    t-binned validation loss, and aux["keep"] the CFG mask [B].
    """
    x1 = batch["x"].astype(jnp.float32)
    eps, t, keep = flow_draws(key, x1, cfg)
    tc = clip_t(t, cfg.t_clip)
    x_t = interpolate(x1, eps, t, cfg.t_clip)
    v = net.apply({"params": params}, x_t, tc, batch["pooled"], batch.get("tokens"), keep)
    err = jnp.square(v.astype(jnp.float32) - velocity_target(x1, eps))
    per_sample = err.reshape(err.shape[0], -1).mean(axis=1)  # equal sizes: the mean of these is the element mean
    return per_sample.mean(), {"loss": per_sample, "t": tc, "keep": keep}


def euler_loop(velocity_fn: Callable[[Array, Array], Array], x0: Array, steps: int) -> Array:
    """Integrate dx/dt = velocity_fn(x, t) from t = 0 to 1 with `steps` Euler steps:
    x <- x + v(x, t_i) / N at t_i = i / N, i = 0 .. N-1. `t` is passed as a float32 scalar.
    A `lax.fori_loop`, so the body is traced and compiled once whatever N is."""

    def body(i, x):
        t = i.astype(jnp.float32) / steps
        return x + velocity_fn(x, t) / steps

    return jax.lax.fori_loop(0, steps, body, x0)


def euler_sample(net, params, noise: Array, pooled: Array, tokens: Optional[Array] = None, steps: int = 50,
                 cfg_scale=3.0) -> Array:
    """noise [B,H,W,C] at t = 0 -> samples at t = 1, guided: v = v_u + w * (v_c - v_u), w = cfg_scale.

    w = 1 is the purely conditional flow and w = 0 the purely unconditional one (the null supports);
    w > 1 extrapolates away from the unconditional prediction. Both branches run as one doubled batch
    every step. The conditioning (projector and Perceiver) does not depend on x or t, so it is computed
    once, before the loop, by `encode_context` with keep = [True]*B + [False]*B: the unconditional half
    is exactly the null that training's dropped samples saw.

    Jit with `steps` (and `net`) static: `jax.jit(euler_sample, static_argnames=("net", "steps"))`, or
    use `euler_sample_jit`. `cfg_scale` may be traced.
    """
    variables = {"params": params}
    b = noise.shape[0]
    keep = jnp.concatenate([jnp.ones((b,), bool), jnp.zeros((b,), bool)])
    double = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
    y_cond, context = net.apply(variables, double(pooled), double(tokens), keep, method="encode_context")

    def guided_velocity(x, t):
        v = net.apply(variables, double(x), jnp.full((2 * b,), t, jnp.float32), y_cond, context,
                      method="velocity")
        v_c, v_u = v[:b], v[b:]
        return v_u + cfg_scale * (v_c - v_u)

    return euler_loop(guided_velocity, noise.astype(jnp.float32), steps)


euler_sample_jit = jax.jit(euler_sample, static_argnames=("net", "steps"))
