"""FSDiT: a few-shot flow-matching DiT, conditioned on embeddings of a handful of support images.

The backbone is DiT (Peebles & Xie, arXiv 2212.09748): patch tokens, adaLN-Zero blocks, a zero-initialised
final layer. What differs, and why (docs/methods/fsdit.md has the whole method):

- The condition is not a class label but K support images of the class to generate, given as frozen
  encoder features: one pooled vector per support ([B, K, D]) and, optionally, its patch tokens
  ([B, K, T_s, D]). The pooled vectors are averaged over K (the order of the supports must not matter)
  and projected (`SupportProjector`); that vector joins the timestep in the adaLN condition.
- The support tokens carry what a single vector loses (layout, texture). A one-layer Perceiver
  (Jaegle et al., arXiv 2103.03206; `OneLayerPerceiver`) reads the K*T_s tokens into a fixed number of
  latents, so the cost of every block's cross-attention does not grow with K.
- A learnable CLS token is prepended to the patch tokens. With `cross_attn="cls"` only it reads the
  context and the patches see it through self-attention (the original FSDiT experiment); with "all"
  every token reads the context; with "none" the network is conditioned through adaLN only.
- The timestep is continuous, t in [0, 1] (flow matching, see raygen/jaxgen/flow.py).

Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) needs a null condition. It is made in one
place only, `FSDiT.encode_context`, by zeroing the supports of the samples whose `keep` is False before
anything reads them, so the dropped samples of training and the unconditional branch of the sampler are
the same computation (and the null depends on no support).

Layout is NHWC throughout: x is [B, H, W, C]. `dtype` is the computation dtype; parameters are float32
and the velocity is returned as float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CROSS_ATTN_MODES = ("all", "cls", "none")

# Named sizes: (hidden_size, depth, num_heads, mlp_ratio, patch_size). "big", "large", "xlarge" are
# DiT-B/2, DiT-L/2, DiT-XL/2 (DiT Table 1); "tiny" is the CPU default; "debug" is for tests.
SIZES: dict[str, tuple[int, int, int, float, int]] = {
    "debug": (64, 2, 2, 1, 8),
    "tiny": (128, 4, 4, 4, 4),
    "big": (768, 12, 12, 4, 2),
    "large": (1024, 24, 16, 4, 2),
    "xlarge": (1152, 28, 16, 4, 2),
}

# DiT initialises every transformer Linear xavier-uniform with zero bias.
xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
small_normal = nn.initializers.normal(stddev=0.02)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, [grid_size**2, embed_dim], row-major patches (MAE/DiT
    convention: the first half of the channels encodes the column index, the second half the row)."""
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for a 2-D sin-cos embedding")
    coords = np.arange(grid_size, dtype=np.float64)
    cols, rows = np.meshgrid(coords, coords)

    def embed_1d(pos: np.ndarray, dim: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(cols, embed_dim // 2), embed_1d(rows, embed_dim // 2)], axis=1)


def timestep_frequencies(t: Array, dim: int = 256, t_scale: float = 1000.0, max_period: float = 1e4) -> Array:
    """t [B] in [0, 1] -> [B, dim] features [cos(t_scale*t*f_i), sin(t_scale*t*f_i)], f_i = max_period^(-i/(dim/2)).

    Why t*1000 and not t*10000: the frequency ladder (periods 2*pi .. 2*pi*1e4) was designed for DDPM's
    1000 integer steps, which DiT embeds. Scaling t in [0, 1] by 1000 reproduces that range: the slowest
    component still changes monotonically over the whole of [0, 1] and the fastest turns ~160 times.
    Scaling by 1e4 makes every component ten times faster; then at the spacing of a few-step sampler
    (dt = 0.02 is 200 rad at the fastest frequency) most of the high components alias, different times
    look alike in them, and the MLP is fed features that are noise as a function of t.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * t_scale)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: per-sample shift and scale of [B, T, D] tokens; scale enters as (1 + scale) so a zero
    modulation is the identity."""
    return x * (1 + scale[:, None]) + shift[:, None]


def attend(q: Array, k: Array, v: Array, num_heads: int) -> Array:
    """Multi-head scaled dot-product attention on [B, T, D] projections -> [B, T_q, D]."""
    b, tq, d = q.shape
    split = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, d // num_heads)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    return out.reshape(b, tq, d)


def layer_norm(affine: bool, dtype: Any, name: Optional[str] = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype, name=name)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid (see `timestep_frequencies`) -> Dense -> SiLU -> Dense(hidden)."""

    hidden_size: int
    freq_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        f = timestep_frequencies(t, self.freq_dim).astype(self.dtype)
        h = nn.Dense(self.hidden_size, kernel_init=small_normal, dtype=self.dtype)(f)
        return nn.Dense(self.hidden_size, kernel_init=small_normal, dtype=self.dtype)(nn.silu(h))


class SupportProjector(nn.Module):
    """Pooled support features [B, K, D] -> mean over K -> Dense(2*hidden) -> GELU -> Dense(hidden).
    The mean makes the condition invariant to the order of the supports and defined for any K."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: Array) -> Array:
        y = pooled.astype(jnp.float32).mean(axis=1).astype(self.dtype)
        y = nn.Dense(2 * self.hidden_size, kernel_init=xavier, dtype=self.dtype)(y)
        return nn.Dense(self.hidden_size, kernel_init=xavier, dtype=self.dtype)(nn.gelu(y))


class SelfAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        qkv = nn.Dense(3 * self.hidden_size, kernel_init=xavier, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = attend(q, k, v, self.num_heads)
        return nn.Dense(self.hidden_size, kernel_init=xavier, dtype=self.dtype, name="proj")(out)


class CrossAttention(nn.Module):
    """Queries from x [B, T, D], keys and values from ctx [B, L, D] (both already normalised)."""

    hidden_size: int
    num_heads: int
    use_bias: bool = True
    zero_out: bool = False  # zero-initialised output projection: the layer starts as a no-op
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, ctx: Array) -> Array:
        dense = lambda n, name, init=xavier: nn.Dense(n, use_bias=self.use_bias, kernel_init=init,
                                                      dtype=self.dtype, name=name)
        q = dense(self.hidden_size, "q")(x)
        k, v = jnp.split(dense(2 * self.hidden_size, "kv")(ctx), 2, axis=-1)
        out = attend(q, k, v, self.num_heads)
        return dense(self.hidden_size, "proj", zeros if self.zero_out else xavier)(out)


class Mlp(nn.Module):
    hidden_size: int
    mlp_hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.mlp_hidden, kernel_init=xavier, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.hidden_size, kernel_init=xavier, dtype=self.dtype, name="fc2")(nn.gelu(h))


class OneLayerPerceiver(nn.Module):
    """Support tokens [B, N, support_dim] -> context [B, num_latents, hidden] (Perceiver, arXiv 2103.03206).

    One cross-attention from learned latents to the tokens, then an MLP, both residual. The tokens are
    first projected to hidden. The attention projections have no bias and the LayerNorms no affine
    parameters, so an all-zero input (the CFG null, see `FSDiT.encode_context`) gives exactly zero keys
    and values: the null context is then the latents passed through the MLP, a function of the
    parameters only.
    """

    hidden_size: int
    num_latents: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        ctx = nn.Dense(self.hidden_size, use_bias=False, kernel_init=xavier, dtype=self.dtype,
                       name="ctx_proj")(tokens.astype(self.dtype))
        ctx = layer_norm(False, self.dtype, "norm_ctx")(ctx)
        latents = self.param("latents", small_normal, (self.num_latents, self.hidden_size))
        lat = jnp.broadcast_to(latents.astype(self.dtype), (tokens.shape[0], *latents.shape))
        lat = lat + CrossAttention(self.hidden_size, self.num_heads, use_bias=False, dtype=self.dtype,
                                   name="cross_attn")(layer_norm(False, self.dtype, "norm_q")(lat), ctx)
        mlp = Mlp(self.hidden_size, int(self.hidden_size * self.mlp_ratio), dtype=self.dtype, name="mlp")
        return lat + mlp(layer_norm(False, self.dtype, "norm_mlp")(lat))


class FSDiTBlock(nn.Module):
    """DiT block with adaLN-Zero (modulated, gated self-attention and MLP; the gates start at zero, so the
    block starts as the identity) and, between them, an ungated cross-attention to the support context
    whose zero-initialised output projection also makes it start as a no-op.

    cross_attn: "all" (every token, CLS and patches, queries the context), "cls" (only the CLS token;
    the patches see the supports through it in the next block's self-attention), "none".
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    cross_attn: str = "all"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, context: Optional[Array]) -> Array:
        mod = nn.Dense(6 * self.hidden_size, kernel_init=zeros, dtype=self.dtype, name="adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

        h = modulate(layer_norm(False, self.dtype, "norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * SelfAttention(self.hidden_size, self.num_heads, self.dtype, name="attn")(h)

        if self.cross_attn != "none":
            queries = x if self.cross_attn == "all" else x[:, :1]
            update = CrossAttention(self.hidden_size, self.num_heads, use_bias=True, zero_out=True, dtype=self.dtype,
                                    name="cross_attn")(layer_norm(True, self.dtype, "norm_cross_q")(queries),
                                                       layer_norm(True, self.dtype, "norm_cross_kv")(context))
            if self.cross_attn == "all":
                x = x + update
            else:
                x = jnp.concatenate([x[:, :1] + update, x[:, 1:]], axis=1)

        h = modulate(layer_norm(False, self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        mlp = Mlp(self.hidden_size, int(self.hidden_size * self.mlp_ratio), dtype=self.dtype, name="mlp")
        return x + gate_mlp[:, None] * mlp(h)


class FinalLayer(nn.Module):
    """Drop the CLS token -> adaLN (shift, scale) -> zero-initialised Dense(p*p*C) -> unpatchify to
    [B, H, W, C]. Its zero init makes a fresh network predict exactly zero velocity (adaLN-Zero)."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        x = x[:, 1:]
        shift, scale = jnp.split(nn.Dense(2 * self.hidden_size, kernel_init=zeros, dtype=self.dtype,
                                          name="adaLN_modulation")(nn.silu(c)), 2, axis=-1)
        x = modulate(layer_norm(False, self.dtype, "norm_final")(x), shift, scale)
        x = nn.Dense(self.patch_size ** 2 * self.out_channels, kernel_init=zeros, dtype=self.dtype, name="linear")(x)
        b, n, _ = x.shape
        g, p, ch = math.isqrt(n), self.patch_size, self.out_channels
        x = x.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)  # [B, gy, py, gx, px, C]
        return x.reshape(b, g * p, g * p, ch)


class FSDiT(nn.Module):
    """Few-shot flow-matching DiT. `__call__(x [B,H,W,C], t [B] in [0,1], pooled [B,K,D],
    tokens [B,K,T_s,D] | None, keep [B] bool | None) -> velocity [B,H,W,C]` (float32).

    `keep` is the classifier-free-guidance mask (True = conditional; None = all True). The sampler
    computes the conditioning once per sample with `encode_context` and then calls `velocity` every
    step, or passes the pair to `__call__` as `context=(y_cond, context)`.

    With `cross_attn="none"` the support tokens are not used (no Perceiver is built); any other mode needs
    `use_support_tokens=True` and tokens.
    """

    input_size: int
    in_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    support_dim: int
    mlp_ratio: float = 4.0
    cross_attn: str = "all"  # "all" | "cls" | "none"
    perceiver_latents: int = 0  # 0 = number of patches
    use_support_tokens: bool = True
    dtype: Any = jnp.float32

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def has_context(self) -> bool:
        return self.cross_attn != "none"

    def setup(self):
        if self.cross_attn not in CROSS_ATTN_MODES:
            raise ValueError(f"cross_attn must be one of {CROSS_ATTN_MODES}, got {self.cross_attn!r}")
        if self.has_context and not self.use_support_tokens:
            raise ValueError(f"cross_attn={self.cross_attn!r} needs support tokens; with "
                             "use_support_tokens=False set cross_attn='none'")
        if self.input_size % self.patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        p, h = self.patch_size, self.hidden_size
        # kernel [p, p, C, hidden]: xavier over the flattened patch (fan_in p*p*C, fan_out hidden), as DiT
        self.x_embedder = nn.Conv(h, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                                  kernel_init=nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                                               in_axis=(0, 1, 2), out_axis=-1))
        self.pos_embed = jnp.asarray(sincos_pos_embed_2d(h, self.grid_size), jnp.float32)[None]  # fixed
        self.cls_token = self.param("cls_token", small_normal, (1, 1, h))
        self.t_embedder = TimestepEmbedder(h, dtype=self.dtype)
        self.y_embedder = SupportProjector(h, dtype=self.dtype)
        # c = LN(t_emb) + s * LN(y_emb): the two embeddings enter at the same scale, and s (learned,
        # starting at 2) lets the supports outweigh the timestep in the condition from the start.
        self.t_norm = layer_norm(True, jnp.float32)
        self.y_norm = layer_norm(True, jnp.float32)
        self.y_scale = self.param("y_scale", nn.initializers.constant(2.0), ())
        if self.has_context:
            self.perceiver = OneLayerPerceiver(h, self.perceiver_latents or self.num_patches, self.num_heads,
                                               dtype=self.dtype)
        self.blocks = [FSDiTBlock(h, self.num_heads, self.mlp_ratio, self.cross_attn, dtype=self.dtype)
                       for _ in range(self.depth)]
        self.final_layer = FinalLayer(h, p, self.in_channels, dtype=self.dtype)

    def encode_context(self, pooled: Array, tokens: Optional[Array], keep: Optional[Array] = None
                       ) -> tuple[Array, Optional[Array]]:
        """-> (y_cond [B, hidden], context [B, L, hidden] or None). The one place the CFG null is made:
        where keep is False the pooled vectors and the support tokens are zeroed before the projector
        and the Perceiver read them, so a dropped training sample and the sampler's unconditional branch
        are the same computation and the null does not depend on the supports."""
        if pooled.ndim == 2:  # one support vector per sample
            pooled = pooled[:, None]
        b = pooled.shape[0]
        keep = jnp.ones((b,), bool) if keep is None else jnp.asarray(keep, bool)
        pooled = jnp.where(keep[:, None, None], pooled, 0)
        y_cond = self.y_embedder(pooled)
        if not self.has_context:
            return y_cond, None
        if tokens is None:
            raise ValueError(f"cross_attn={self.cross_attn!r} needs support tokens; got tokens=None")
        tokens = tokens.reshape(b, -1, tokens.shape[-1])  # [B, K, T_s, D] -> [B, K*T_s, D]
        tokens = jnp.where(keep[:, None, None], tokens, 0)
        return y_cond, self.perceiver(tokens)

    def velocity(self, x: Array, t: Array, y_cond: Array, context: Optional[Array]) -> Array:
        """The DiT given precomputed conditioning (from `encode_context`) -> velocity [B, H, W, C]."""
        if self.has_context and context is None:
            raise ValueError(f"cross_attn={self.cross_attn!r} needs a context")
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        h = self.x_embedder(x.astype(self.dtype)).reshape(b, self.num_patches, self.hidden_size)
        h = h + self.pos_embed.astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, self.hidden_size))
        h = jnp.concatenate([cls, h], axis=1)  # T = num_patches + 1
        c = self.t_norm(self.t_embedder(t).astype(jnp.float32)) \
            + self.y_scale * self.y_norm(y_cond.astype(jnp.float32))
        c = c.astype(self.dtype)
        if context is not None:
            context = context.astype(self.dtype)
        for block in self.blocks:
            h = block(h, c, context)
        return self.final_layer(h, c).astype(jnp.float32)

    def __call__(self, x: Array, t: Array, pooled: Optional[Array], tokens: Optional[Array] = None,
                 keep: Optional[Array] = None, *, context: Optional[tuple] = None) -> Array:
        """`context`: a precomputed `(y_cond, context)` pair from `encode_context`; then pooled, tokens
        and keep are not read."""
        y_cond, ctx = context if context is not None else self.encode_context(pooled, tokens, keep)
        return self.velocity(x, t, y_cond, ctx)


def fsdit(name: str, input_size: int, in_channels: int, support_dim: int, **overrides) -> FSDiT:
    """Build an FSDiT by size name (see `SIZES`), e.g. `fsdit("big", 28, 4, 768, cross_attn="cls")`.
    `overrides` replace any field, the named ones included (hidden_size, depth, patch_size, ...)."""
    if name not in SIZES:
        raise ValueError(f"unknown FSDiT size {name!r}; choose one of {', '.join(SIZES)}")
    hidden, depth, heads, mlp_ratio, patch = SIZES[name]
    fields = dict(hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, patch_size=patch)
    fields.update(overrides)
    return FSDiT(input_size=input_size, in_channels=in_channels, support_dim=support_dim, **fields)


def FSDiT_debug(**kw): return fsdit("debug", **kw)
def FSDiT_tiny(**kw): return fsdit("tiny", **kw)
def FSDiT_big(**kw): return fsdit("big", **kw)
def FSDiT_large(**kw): return fsdit("large", **kw)
def FSDiT_xlarge(**kw): return fsdit("xlarge", **kw)


def param_count(params) -> int:
    """Number of parameters in a pytree (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def dummy_inputs(net: FSDiT, batch_shapes: dict) -> tuple:
    """Zero inputs for `net.init`: batch_shapes has "x" [B,H,W,C], "pooled" [B,K,D] and optionally
    "tokens" [B,K,T_s,D] (shapes only)."""
    x = jnp.zeros(batch_shapes["x"], jnp.float32)
    b = x.shape[0]
    pooled = jnp.zeros(batch_shapes["pooled"], jnp.float32)
    tokens = jnp.zeros(batch_shapes["tokens"], jnp.float32) if batch_shapes.get("tokens") is not None else None
    return x, jnp.zeros((b,), jnp.float32), pooled, tokens, jnp.ones((b,), bool)


def init_params(net: FSDiT, rng: Array, batch_shapes: dict):
    """-> the "params" collection of a freshly initialised `net` (apply with `{"params": params}`).
    Traced once under jit; `jax.eval_shape(lambda r: init_params(net, r, shapes), rng)` gives the shapes
    without allocating."""
    inputs = dummy_inputs(net, batch_shapes)
    return jax.jit(lambda r, args: net.init(r, *args)["params"])(rng, inputs)
