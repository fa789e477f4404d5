"""DriftDiT: the one-step generator of Drifting models (arXiv 2602.04770), LightningDiT-style.

It computes `x = f(noise, class, omega, style)` in one pass, with x of the noise's shape [N, C, H, W].
What it computes (the official release lambertae/drifting, `models/generator.py`;
docs/methods/drifting.md, "The generator"):
- tokens: patchify (patch p) -> Linear -> + a learnable 2-D sin-cos `pos_embed` (initialised from
  `sincos_pos_embed_2d`); 16 in-context tokens `Linear(cond) + cls_embed` ([16, D], N(0, .02)) are
  prepended and dropped again before the final layer;
- conditioning vector `cond = Embed_class(c) + sum_{i=1..32} Embed_i(n_i) + 0.02 * RMSNorm(TimestepEmbed(omega))`.
  Each style index n_i in [0, 64) reads its own 64-row table (32 tables stored as one 2048-row table read
  with per-position offsets, summed by one `embedding_bag`). The indices are an input: the caller draws them
  with `draw_style(n, generator)` from an explicit torch.Generator; the network never draws random numbers;
- omega (the CFG strength, ~[1, 4]) is fed to DiT's TimestepEmbedder *directly* (times `omega_scale`,
  default 1): the sinusoid's fastest frequency is 1 rad per unit of omega, so over [1, 4] the high
  frequencies resolve omega and the slow ones are ~linear in it (scaling omega by 1000 like a DiT timestep
  would alias the fast ones);
- blocks: RMSNorm (learnable scale) pre-norms, adaLN-Zero with 6 modulation vectors from SiLU -> Linear
  (zero init, computed in fp32 also under autocast, and the modulation itself is applied in fp32);
  attention with qkv bias, QK-RMSNorm (learnable scale per head dim, separate for q and k), 1-D RoPE
  (rotate-half convention, base 1e4) over all 16 + H*W/p^2 tokens, `F.scaled_dot_product_attention`;
  SwiGLU MLP, hidden = round-up-to-32(int(2/3 * 4 * D)) (2048 at D = 768, 2752 at D = 1024);
- final layer: RMSNorm, adaLN (shift, scale) and Linear, both zero-initialised: the initial output is exactly 0.

Where it differs from the reference (none changes the function class):
- the adaLN modulations of all blocks and the final layer come from one matmul (dit.AdaLNModulations, run
  in fp32 here), instead of one `SiLU -> Linear` per block: same parameters, stacked;
- q and k are normalised and rotated together as one [B, T, 2, H, d] view of the qkv output; the RoPE
  tables are built once per (device, dtype) in float64, stored fp32, and cached, not rebuilt per call;
- the null class row (index `num_classes`, as in dit.LabelEmbedder) exists although drifting does not drop
  labels; it costs one row.
Deliberately *not* the generator of earlier public ports (docs/methods/drifting.md): biases kept, learnable QK-norm scales, rotate-half
(not interleaved) RoPE, absolute 2-D position embedding present, SwiGLU hidden 2/3*4D, omega through the
sinusoidal TimestepEmbedder, zero-init output, 32 separate style tables, style drawn by the caller.

Sizes (`DRIFT_DIT_SIZES`; names "DriftDiT-<size>/<patch>", patch 2, 4, 8 or 16). Parameters measured
(built on the meta device) at 32x32x4, 1000 classes, patch 2:

  | size | D    | depth | heads | SwiGLU | params          | paper estimate |
  |------|------|-------|-------|--------|-----------------|---------------|
  | T    | 64   | 2     | 2     | 192    | 406,096         | CPU tests / digits |
  | S    | 384  | 12    | 6     | 1024   | 33,915,280      |               |
  | B    | 768  | 12    | 12    | 2048   | 132,709,648     | ~133M         |
  | L    | 1024 | 24    | 16    | 2752   | 462,910,480     | ~463M         |

T/2 on CPU (1x16x16, 64 patches + 16 cond tokens, 640 samples, forward + backward), measured on this
project's shared 2-core box under a load average of ~3: 1.4-2.2 s with 1 thread, 3.7-5 s with 2 (0.8 s at
best when the box was quiet); matmuls alone are ~0.75 s of it, so "well under a second" needs an idle box.
torch.compile: ~1.05 s after a ~70 s compile. T/4 (16 + 16 tokens): 0.7-1.1 s with 1 thread.
Eager CPU choices made for it: a hand-written RMSNorm backward (2x faster than F.rms_norm's composite),
QK-norm scales folded into the small RoPE tables, `roll` instead of rotate_half's chunk/neg/cat, RoPE
tables cached per (device, dtype).
Pixel L/16 is `drift_dit("DriftDiT-L/16", input_size=256, in_channels=3)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from raygen.nets.dit import AdaLNModulations, LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d

STYLE_TOKENS = 32  # number of style indices per sample (n_1..n_32)
STYLE_VOCAB = 64  # entries per style table


def draw_style(n: int, generator: torch.Generator, style_tokens: int = STYLE_TOKENS,
               style_vocab: int = STYLE_VOCAB, device=None) -> torch.Tensor:
    """Style noise: LongTensor [n, style_tokens] of i.i.d. U{0..style_vocab-1}, drawn from `generator` only
    (on the generator's device unless `device` is given); the global RNG is never touched."""
    out = torch.randint(0, style_vocab, (n, style_tokens), generator=generator, device=generator.device)
    return out if device is None else out.to(device)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0, multiple: int = 32) -> int:
    """LightningDiT's SwiGLU width: int(2/3 * mlp_ratio * dim) rounded up to a multiple of `multiple`."""
    h = int(2 / 3 * mlp_ratio * dim)
    return multiple * math.ceil(h / multiple)


class _RMSNormFn(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) with a hand-written backward dx = r * (g - y * mean(g * y)):
    half the full-size ops of the composite F.rms_norm on CPU (one norm pass forward, three ops back)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.linalg.vector_norm(x, 2, -1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        y, r = ctx.saved_tensors
        m = (g * y).mean(-1, keepdim=True)
        return torch.addcmul(g, y, m, value=-1).mul_(r), None


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps), in fp32 (or float64 for float64 input), no scale."""
    return _RMSNormFn.apply(x if x.dtype == torch.float64 else x.float(), eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last dim, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = rms_normalize(x, self.eps)
        return (xn * self.weight.to(xn.dtype)).to(x.dtype)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
        """fp32 `shift + forward(x) * scale1` (scale1 = 1 + scale), with the learnable scale folded into the
        small [B, 1, D] factor: one full-size op fewer, forward and backward."""
        xn = rms_normalize(x, self.eps)
        return torch.addcmul(shift, xn, self.weight.to(xn.dtype) * scale1)


def rope_tables(head_dim: int, seq_len: int, base: float = 1e4, device=None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed_sin), each [seq_len, head_dim] in `dtype` (built in float64), for 1-D rotate-half RoPE:
    dimensions j and j + head_dim/2 form a pair rotated by the angle pos * base^(-2j/head_dim).
    signed_sin = [-sin, +sin] over the two halves, so that rotate_half(x) * sin == roll(x) * signed_sin."""
    assert head_dim % 2 == 0, "RoPE needs an even head dim"
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    ang = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    return torch.cat([ang.cos(), ang.cos()], 1).to(dtype), torch.cat([-ang.sin(), ang.sin()], 1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate-half RoPE of (x * scale): (x*scale) * cos + rotate_half(x*scale) * sin, with
    rotate_half(y) = [-y2, y1]. Computed as x * (scale*cos) + roll(x) * (roll(scale)*signed_sin): the
    per-dim scale (QK-norm's) rides on the small tables, and roll replaces rotate_half's chunk/neg/cat.
    cos/signed_sin broadcast against x with positions on x's token axis; the last dim is head_dim."""
    half = x.shape[-1] // 2
    if scale is not None:
        cos, signed_sin = scale * cos, scale.roll(half, -1) * signed_sin
    return torch.addcmul(x * cos, x.roll(half, -1), signed_sin)


class Attention(nn.Module):
    """Self-attention with qkv bias, QK-RMSNorm (learnable per-head-dim scales) and 1-D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_scale = nn.Parameter(torch.ones(2, 1, self.head_dim))  # [q; k] RMSNorm scales
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; cos/signed_sin [T, 1, 1, head_dim] (positions 0..T-1)."""
        b, t, c = x.shape
        # split (not slicing): its backward is one cat, slicing's is a zero-fill + copy per slice
        qk, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).split([2, 1], dim=2)
        qk = rms_normalize(qk, self.eps)  # QK-RMSNorm; its scale goes into RoPE
        q, k = apply_rope(qk, cos, signed_sin, self.qk_scale.to(qk.dtype)).to(v.dtype).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    """w3(silu(a) * g), (a, g) = w12(x): LightningDiT's gated MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * g)


class DriftBlock(nn.Module):
    """RMSNorm pre-norm block with adaLN-Zero; its modulations (shift, 1 + scale, gate) x 2 come from
    outside in fp32 (see FP32AdaLN); the normalised, modulated input is formed in fp32."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps)
        self.attn = Attention(hidden_size, num_heads, eps)
        self.norm2 = RMSNorm(hidden_size, eps)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shift_a, scale1_a, gate_a, shift_m, scale1_m, gate_m = mod.unsqueeze(1).chunk(6, dim=2)
        dt = x.dtype
        h = self.norm1.modulate(x, shift_a, scale1_a).to(dt)
        x = torch.addcmul(x, gate_a.to(dt), self.attn(h, cos, sin).to(dt))
        h = self.norm2.modulate(x, shift_m, scale1_m).to(dt)
        return torch.addcmul(x, gate_m.to(dt), self.mlp(h).to(dt))


class FP32AdaLN(AdaLNModulations):
    """dit.AdaLNModulations (one zero-initialised SiLU -> Linear for all blocks + the final layer, the
    "1 +" of every scale pre-added) evaluated in (at least) fp32 with autocast off, whatever the module dtype."""

    def forward(self, c: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        dt = torch.promote_types(c.dtype, torch.float32)  # fp32 (fp64 for a float64 net)
        with torch.autocast(c.device.type, enabled=False):
            out = F.linear(F.silu(c.to(dt)), self.linear.weight.to(dt), self.linear.bias.to(dt))
            out = out + self.scale_offset.to(dt)
        d = c.shape[1]
        return list(out[:, : 6 * self.depth * d].chunk(self.depth, dim=1)), out[:, 6 * self.depth * d :]


class FinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale; zero-init rows of FP32AdaLN) and a zero-initialised Linear to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale1 = mod.unsqueeze(1).chunk(2, dim=2)
        return self.linear(self.norm.modulate(x, shift, scale1).to(x.dtype))


class StyleEmbedder(nn.Module):
    """sum_i Embed_i(n_i): `tokens` tables of `vocab` rows each, stored as one [tokens*vocab, D] table;
    position i reads rows i*vocab + n_i."""

    def __init__(self, hidden_size: int, tokens: int = STYLE_TOKENS, vocab: int = STYLE_VOCAB):
        super().__init__()
        self.tokens, self.vocab = tokens, vocab
        self.embedding = nn.Embedding(tokens * vocab, hidden_size)
        self.register_buffer("offsets", torch.arange(tokens) * vocab, persistent=False)

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        if style.shape[1:] != (self.tokens,):
            raise ValueError(f"style must be [N, {self.tokens}], got {tuple(style.shape)}")
        return F.embedding_bag(style + self.offsets, self.embedding.weight, mode="sum")


class DriftDiT(nn.Module):
    """forward(noise [N,C,H,W], labels [N] int, omega [N] float (or a scalar), style [N,32] int) -> [N,C,H,W]."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        cond_tokens: int = 16,
        style_tokens: int = STYLE_TOKENS,
        style_vocab: int = STYLE_VOCAB,
        omega_scale: float = 1.0,
        rope_base: float = 1e4,
        eps: float = 1e-6,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"image size {input_size} is not divisible by patch size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_classes, self.cond_tokens = num_classes, cond_tokens
        self.omega_scale, self.rope_base = omega_scale, rope_base
        self.grid = input_size // patch_size
        self.num_patches = self.grid ** 2

        self.patch_embed = nn.Linear(in_channels * patch_size ** 2, hidden_size)
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches, hidden_size))
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.style_embedder = StyleEmbedder(hidden_size, style_tokens, style_vocab)
        self.omega_embedder = TimestepEmbedder(hidden_size)
        self.omega_norm = RMSNorm(hidden_size, eps)
        self.cond_proj = nn.Linear(hidden_size, hidden_size)
        self.cls_embed = nn.Parameter(torch.empty(cond_tokens, hidden_size))
        self.blocks = nn.ModuleList([DriftBlock(hidden_size, num_heads, mlp_ratio, eps) for _ in range(depth)])
        self.adaln = FP32AdaLN(hidden_size, depth)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, eps)
        self._rope_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._init_weights()

    def _init_weights(self):
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.patch_embed, self.cond_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        with torch.no_grad():
            pe = torch.from_numpy(sincos_pos_embed_2d(self.hidden_size, self.grid)).float()
            self.pos_embed.copy_(pe.unsqueeze(0).to(self.pos_embed.device))
        nn.init.normal_(self.cls_embed, std=0.02)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        nn.init.normal_(self.style_embedder.embedding.weight, std=0.02)
        for layer in (self.omega_embedder.mlp[0], self.omega_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def rope(self, device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (cos, signed_sin) [T, 1, 1, head_dim] over all T = cond_tokens + num_patches positions,
        in fp32 (fp64 for a float64 net): built once per (device, dtype), not per call."""
        key = (torch.device(device), dtype)
        if key not in self._rope_cache:
            cos, sin = rope_tables(self.hidden_size // self.num_heads, self.cond_tokens + self.num_patches,
                                   self.rope_base, device=key[0], dtype=dtype)
            self._rope_cache[key] = (cos[:, None, None], sin[:, None, None])
        return self._rope_cache[key]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C] flattened patches, row-major patches, (i, j, c) inside one."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`: [B, N, p*p*C] -> [B, C, H, W]."""
        b = x.shape[0]
        p, c, g = self.patch_size, self.out_channels, self.grid
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def condition(self, labels: torch.Tensor, omega, style: torch.Tensor) -> torch.Tensor:
        """cond [B, D] = Embed_class(labels) + sum_i Embed_i(style_i) + 0.02 * RMSNorm(TimestepEmbed(omega))."""
        omega = torch.as_tensor(omega, dtype=torch.float32, device=labels.device).expand(labels.shape[0])
        w = self.omega_norm(self.omega_embedder(omega * self.omega_scale))
        return self.y_embedder(labels) + self.style_embedder(style) + 0.02 * w

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, omega, style: torch.Tensor) -> torch.Tensor:
        if noise.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"noise must be [N, {self.in_channels}, {self.input_size}, {self.input_size}], "
                             f"got {tuple(noise.shape)}")
        cond = self.condition(labels, omega, style)
        x = self.patch_embed(self.patchify(noise)) + self.pos_embed
        ctx = self.cond_proj(cond).unsqueeze(1) + self.cls_embed
        x = torch.cat([ctx.to(x.dtype), x], dim=1)
        block_mods, final_mod = self.adaln(cond)
        cos, sin = self.rope(x.device, torch.promote_types(x.dtype, torch.float32))
        for block, mod in zip(self.blocks, block_mods):
            x = block(x, mod, cos, sin)
        return self.unpatchify(self.final_layer(x[:, self.cond_tokens:], final_mod))


DRIFT_DIT_SIZES = {
    "T": dict(hidden_size=64, depth=2, num_heads=2),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
}
DRIFT_DIT_PATCHES = (2, 4, 8, 16)


def parse_arch(name: str) -> dict:
    """"DriftDiT-<size>/<patch>" -> the size's constructor arguments with `patch_size`; ValueError otherwise."""
    try:
        size, patch = name.removeprefix("DriftDiT-").split("/")
        if int(patch) not in DRIFT_DIT_PATCHES:
            raise ValueError(patch)
        return dict(DRIFT_DIT_SIZES[size], patch_size=int(patch))
    except (KeyError, ValueError):
        names = [f"DriftDiT-{s}/{p}" for s in DRIFT_DIT_SIZES for p in DRIFT_DIT_PATCHES]
        raise ValueError(f"unknown DriftDiT size {name!r}; choose one of {', '.join(names)}") from None


def drift_dit(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, **overrides) -> DriftDiT:
    """Build a DriftDiT by name, e.g. `drift_dit("DriftDiT-B/2", 32, 4, 1000)`. Keyword overrides
    (hidden_size, depth, cond_tokens, ...) replace the named size's values."""
    spec = parse_arch(name)
    spec.update(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    spec.update(overrides)
    return DriftDiT(**spec)


def DriftDiT_T_2(**kw): return drift_dit("DriftDiT-T/2", **kw)
def DriftDiT_T_4(**kw): return drift_dit("DriftDiT-T/4", **kw)
def DriftDiT_S_2(**kw): return drift_dit("DriftDiT-S/2", **kw)
def DriftDiT_S_4(**kw): return drift_dit("DriftDiT-S/4", **kw)
def DriftDiT_B_2(**kw): return drift_dit("DriftDiT-B/2", **kw)
def DriftDiT_B_4(**kw): return drift_dit("DriftDiT-B/4", **kw)
def DriftDiT_B_16(**kw): return drift_dit("DriftDiT-B/16", **kw)
def DriftDiT_L_2(**kw): return drift_dit("DriftDiT-L/2", **kw)
def DriftDiT_L_4(**kw): return drift_dit("DriftDiT-L/4", **kw)
def DriftDiT_L_16(**kw): return drift_dit("DriftDiT-L/16", **kw)
