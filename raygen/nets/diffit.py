"""DiffiT: diffusion vision transformers with time-dependent self-attention (Hatamizadeh et al.,
arXiv 2312.02139). docs/methods/diffit.md describes the equations as implemented, the shapes and sizes.

Small named blocks and two networks:
- `TMSA`: time-dependent multi-head self-attention (paper Eq. 3-6). q, k, v are a projection of the
  spatial tokens plus a projection of the time token, softmax(q k^T / sqrt(d) + B) v, B a Swin-style
  2-D relative position bias; attention within w x w windows of the token grid (global when the
  window covers the grid).
- `DiffiTBlock` (Eq. 7-8), `DiffiTResBlock` (Eq. 9-10), `PatchEmbed`, `FinalLayer`, `Downsample`,
  `Upsample`; the time and label embedders are raygen.nets.dit's `TimestepEmbedder` / `LabelEmbedder`.
- `DiffiTUNet`: the image-space U-shaped network of DiffiT ResBlocks (per-pixel tokens, windowed TMSA);
  presets `diffit_unet("cifar10" | "imagenet64" | "digits")`.
- `DiffiTLatent`: the latent network, a DiT-shaped stack of DiffiT blocks with global TMSA; named
  sizes `diffit("DiffiT-XL/2")`, `DiffiT_XL_2(...)`, ... (the NVlabs/DiffiT release is XL/2).

Both take `forward(x [B,C,H,W], t [B] (int or float timesteps), y [B] int64 or None)`, the call of
raygen.methods.ddpm; `y = num_classes` (or None) is the null class of classifier-free guidance. The
network never drops labels itself: the method passes the null class.

How it differs from the public code (NVlabs/DiffiT diffit/diffit.py), see docs/methods/diffit.md:
- the relative position index is built lazily per window shape as an int32 tensor, cached outside the
  state dict; it is never a persistent w^2 x w^2 int64 buffer (1M entries at 512 px);
- the bias goes to `F.scaled_dot_product_attention` as an additive float mask, so fused kernels run;
- the spatial qkv matmul and the time term are one batched matmul (the time term folded into a
  per-sample bias); the public `temb=None` branch (unreachable) does not exist here;
- the time projection `qkv_temb` is zero-initialised by default (`time_init="xavier"` is the public
  init): every TMSA starts as plain multi-head attention;
- `learn_sigma` defaults to False (raygen's DDPM predicts eps only); the public release uses True.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from raygen.nets.dit import DIT_PATCHES, DIT_SIZES, LabelEmbedder, Mlp, TimestepEmbedder, sincos_pos_embed_2d
from raygen.nets.dit import parse_arch as dit_parse_arch

Resolution = Union[int, Sequence[int]]
TIME_INITS = ("zero", "xavier")


# ---------------------------------------------------------------------------------------------------
# Relative position bias and windows.

_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def relative_position_index(wh: int, ww: int, window_size: int,
                            device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """int32 [wh*ww * wh*ww]: for tokens i, j of a wh x ww window (row-major), the row of the
    (2w-1)^2-entry bias table of their offset (dy, dx) = (y_i - y_j, x_i - x_j):
    (dy + w - 1) * (2w - 1) + (dx + w - 1), w = `window_size` >= wh, ww (the table's window).
    Built on first use per (window shape, device) and kept in a module-level cache, never in a state
    dict (a plain dict rather than functools.lru_cache, which torch.compile warns about and bypasses)."""
    key = (wh, ww, window_size, torch.device(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if wh > window_size or ww > window_size:
            raise ValueError(f"a {wh}x{ww} window does not fit the bias table of window {window_size}")
        ys = torch.arange(wh, dtype=torch.int32, device=device).repeat_interleave(ww)
        xs = torch.arange(ww, dtype=torch.int32, device=device).repeat(wh)
        dy = ys[:, None] - ys[None, :] + (window_size - 1)
        dx = xs[:, None] - xs[None, :] + (window_size - 1)
        idx = _INDEX_CACHE[key] = (dy * (2 * window_size - 1) + dx).reshape(-1)
    return idx


def window_shape(hw: tuple[int, int], window_size: int) -> tuple[int, int]:
    """The window actually used on an H x W token grid: w x w, clamped to the grid per axis (a window
    that covers an axis makes attention global along it). The grid must split into whole windows."""
    h, w = hw
    wh, ww = min(window_size, h), min(window_size, w)
    if h % wh or w % ww:
        raise ValueError(f"a {h}x{w} token grid does not split into {wh}x{ww} windows (window_size={window_size}); "
                         "use a grid divisible by the window or a window that covers it")
    return wh, ww


# ---------------------------------------------------------------------------------------------------
# TMSA and the DiffiT blocks.

def init_time_projection(lin: nn.Linear, time_init: str) -> None:
    """The projection of the time token: zero ("zero": the block starts time-independent) or xavier."""
    (nn.init.zeros_ if time_init == "zero" else nn.init.xavier_uniform_)(lin.weight)
    nn.init.zeros_(lin.bias)


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention (arXiv 2312.02139 Eq. 3-6) on a token grid:
        q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt
        Attention = softmax(q k^T / sqrt(d) + B) v  per head, within each w x w window, then `proj`.
    `qkv` = Linear(C, 3C) holds [W_qs; W_ks; W_vs] (rows q | k | v, each split into heads of d = C/heads),
    `qkv_temb` = Linear(temb_dim, 3C) the time part [W_qt; W_kt; W_vt], broadcast over the tokens.
    B[h, i, j] = table[index(dy, dx), h] (see `relative_position_index`), a learned
    (2w-1)^2 x heads table (Swin, arXiv 2103.14030), passed to SDPA as an additive float mask.

    `time_init`: "zero" (default) zero-initialises `qkv_temb`, so TMSA starts as plain attention and
    the time dependence grows from the gradient (the gradient of `qkv_temb` is the token-summed q/k/v
    gradient times the time token, not zero); "xavier" is the public release's init.
    `time_dependent=False` drops `qkv_temb`: plain windowed multi-head self-attention with the same bias
    (the ablation's "TMSA off", where `DiffiTBlock` adds the time token to the spatial tokens instead)."""

    def __init__(self, dim: int, num_heads: int, temb_dim: int, window_size: int, qkv_bias: bool = True,
                 time_init: str = "zero", time_dependent: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if time_init not in TIME_INITS:
            raise ValueError(f"time_init must be one of {TIME_INITS}, got {time_init!r}")
        self.dim, self.num_heads, self.window_size, self.time_init = dim, num_heads, window_size, time_init
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.qkv_temb = nn.Linear(temb_dim, 3 * dim) if time_dependent else None
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.qkv, self.proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.qkv_temb is not None:
            init_time_projection(self.qkv_temb, self.time_init)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self, wh: int, ww: int) -> torch.Tensor:
        """B as [1, heads, n, n] (n = wh*ww), gathered from the table (differentiable). The leading 1
        broadcasts over batch x windows; the 4-D form is what SDPA's CPU flash kernel accepts."""
        n = wh * ww
        table = self.relative_position_bias_table
        idx = relative_position_index(wh, ww, self.window_size, table.device)
        return table.t().index_select(1, idx).view(1, self.num_heads, n, n)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x [B, N, C] tokens of an H x W grid (row-major, N = H*W), temb [B, temb_dim] -> [B, N, C]."""
        b, n, c = x.shape
        h, w = hw
        if n != h * w or c != self.dim:
            raise ValueError(f"expected tokens [B, {h * w}, {self.dim}] for a {h}x{w} grid, got {list(x.shape)}")
        heads, d = self.num_heads, c // self.num_heads
        wh, ww = window_shape(hw, self.window_size)
        if self.qkv_temb is None:
            qkv = F.linear(x, self.qkv.weight.to(x.dtype), None if self.qkv.bias is None else self.qkv.bias.to(x.dtype))
        else:
            # x_s W_s + (x_t W_t + b): the time term is a per-sample bias of the one batched matmul
            tbias = F.linear(temb.to(x.dtype), self.qkv_temb.weight.to(x.dtype), self.qkv_temb.bias.to(x.dtype))
            if self.qkv.bias is not None:
                tbias = tbias + self.qkv.bias.to(x.dtype)
            qkv = torch.baddbmm(tbias.unsqueeze(1), x, self.qkv.weight.to(x.dtype).t().expand(b, c, 3 * c))
        bias = self.relative_bias(wh, ww).to(qkv.dtype)  # SDPA wants the mask in q's dtype (autocast)
        if (wh, ww) == (h, w):  # one window: q, k, v are views of qkv (as raygen.nets.dit.Attention)
            q, k, v = (u.transpose(1, 2) for u in qkv.view(b, n, 3, heads, d).unbind(2))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out = out.transpose(1, 2).reshape(b, n, c)
        else:
            nh, nw = h // wh, w // ww
            qkv = qkv.view(b, nh, wh, nw, ww, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
            q, k, v = qkv.reshape(3, b * nh * nw, heads, wh * ww, d).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B * windows, heads, n_w, d]
            out = out.view(b, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, n, c)
        return self.proj(out)


class DiffiTBlock(nn.Module):
    """DiffiT transformer block (Eq. 7-8): x^ = TMSA(LN(x), x_t) + x; x = MLP(LN(x^)) + x^.
    LayerNorms without affine, eps 1e-6; MLP Linear -> tanh-GELU -> Linear (as the public release).

    `tmsa=False` is the ablation without time-dependent attention: the time token is projected to the
    width and added to the spatial tokens, x <- x + x_t W_t, then plain self-attention (as ViT-style
    diffusion backbones that condition by adding the time embedding; `time_proj`, initialised as TMSA's
    time projection)."""

    def __init__(self, dim: int, num_heads: int, temb_dim: int, window_size: int, mlp_ratio: float = 4.0,
                 time_init: str = "zero", tmsa: bool = True):
        super().__init__()
        self.time_proj = None
        if not tmsa:
            self.time_proj = nn.Linear(temb_dim, dim)
            init_time_projection(self.time_proj, time_init)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, num_heads, temb_dim, window_size, time_init=time_init, time_dependent=tmsa)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        for lin in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if self.time_proj is not None:
            x = x + self.time_proj(temb).to(x.dtype).unsqueeze(1)
        x = x + self.attn(self.norm1(x), temb, hw)
        return x + self.mlp(self.norm2(x))


def group_count(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """GroupNorm groups: at most 32, at least 4 channels a group, and dividing the channels."""
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g:
        g -= 1
    return g


class DiffiTResBlock(nn.Module):
    """DiffiT ResBlock (Eq. 9-10) on a feature map: x^ = Conv3x3(Swish(GN(x))); x = DiffiTBlock(x^, x_t) + x.
    The transformer block sees one token per pixel (C channels), with windowed TMSA."""

    def __init__(self, channels: int, num_heads: int, temb_dim: int, window_size: int, mlp_ratio: float = 4.0,
                 time_init: str = "zero", tmsa: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels), channels, eps=1e-6)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, num_heads, temb_dim, window_size, mlp_ratio, time_init, tmsa)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xh = self.conv(F.silu(self.norm(x)))
        tokens = xh.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = self.block(tokens, temb, (h, w))
        return out.view(b, h, w, c).permute(0, 3, 1, 2) + x


class Downsample(nn.Module):
    """2x down: 3x3 conv at stride 2 (channels in -> out)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """2x up: nearest-neighbour upsampling, then a 3x3 conv (channels in -> out)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Conditioning(nn.Module):
    """x_t: time embedding (+ label embedding), raygen.nets.dit's embedders with the DiT / DiffiT init
    (MLP weights N(0, 0.02), biases 0; label rows N(0, 0.02), the null row included)."""

    def _setup_conditioning(self, temb_dim: int, freq_dim: int, num_classes: int):
        self.num_classes = num_classes
        self.t_embedder = TimestepEmbedder(temb_dim, freq_dim)
        self.y_embedder = LabelEmbedder(num_classes, temb_dim)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def condition(self, t: torch.Tensor, y: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=t.device)
        return self.t_embedder(t) + self.y_embedder(y)


# ---------------------------------------------------------------------------------------------------
# Image-space DiffiT.

def _hw(resolution: Resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = (int(v) for v in resolution)
    return h, w


class DiffiTUNet(_Conditioning):
    """Image-space DiffiT: a symmetric U-shaped encoder/decoder of DiffiT ResBlocks.

        stem Conv3x3(in -> C m_0)
        encoder, level l = 0..L-1: [Downsample(C m_{l-1} -> C m_l) if l > 0], `num_blocks` ResBlocks;
                                    its output is the skip of level l
        middle: `num_mid_blocks` ResBlocks at the lowest level
        decoder, level l = L-1..0: Conv1x1(concat(h, skip_l): 2 C m_l -> C m_l), `num_blocks` ResBlocks,
                                    [Upsample(C m_l -> C m_{l-1}) if l > 0]
        head GN -> SiLU -> Conv3x3(C m_0 -> out), zero-initialised (output exactly 0 at init)

    Every ResBlock attends over `window_size` x `window_size` windows of its level's pixels (clamped to
    the map, so small maps attend globally), heads of `channels_per_head` channels (at least one).
    x_t = TimestepEmbedder(sinusoid of `model_channels` -> MLP to `emb_mult * model_channels`) plus the
    label row. out_channels = in_channels (eps), or 2x with `learn_sigma` (eps | variance).
    `img_resolution` (int or (H, W)) is what the net is built for; the forward accepts any H, W that
    halve `len(channel_mult) - 1` times and split into windows at every level."""

    def __init__(self, img_resolution: Resolution = 32, in_channels: int = 3, num_classes: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2), num_blocks: int = 2,
                 num_mid_blocks: int = 2, window_size: int = 8, channels_per_head: int = 32, mlp_ratio: float = 4.0,
                 emb_mult: int = 4, learn_sigma: bool = False, time_init: str = "zero", tmsa: bool = True):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_size = _hw(img_resolution)
        self.in_channels, self.learn_sigma = in_channels, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.levels = len(channel_mult)
        self.window_size = window_size
        self._check_size(*self.img_size)
        temb = emb_mult * model_channels
        self._setup_conditioning(temb, model_channels, num_classes)
        chans = [model_channels * m for m in channel_mult]

        def res_blocks(c: int, n: int) -> nn.ModuleList:
            heads = max(1, c // channels_per_head)
            return nn.ModuleList([DiffiTResBlock(c, heads, temb, window_size, mlp_ratio, time_init, tmsa)
                                  for _ in range(n)])

        self.stem = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList([Downsample(chans[i - 1], chans[i]) for i in range(1, self.levels)])
        self.enc = nn.ModuleList([res_blocks(c, num_blocks) for c in chans])
        self.mid = res_blocks(chans[-1], num_mid_blocks)
        self.fuse = nn.ModuleList([nn.Conv2d(2 * c, c, 1) for c in chans])
        self.dec = nn.ModuleList([res_blocks(c, num_blocks) for c in chans])
        self.up = nn.ModuleList([Upsample(chans[i], chans[i - 1]) for i in range(1, self.levels)])
        self.head_norm = nn.GroupNorm(group_count(chans[0]), chans[0], eps=1e-6)
        self.head_conv = nn.Conv2d(chans[0], self.out_channels, 3, padding=1)
        nn.init.zeros_(self.head_conv.weight)
        nn.init.zeros_(self.head_conv.bias)

    def _check_size(self, h: int, w: int) -> None:
        m = 1 << (self.levels - 1)
        if h % m or w % m:
            raise ValueError(f"image size {h}x{w} must be divisible by {m} ({self.levels} levels)")
        for level in range(self.levels):
            window_shape((h >> level, w >> level), self.window_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x [B, {self.in_channels}, H, W], got {list(x.shape)}")
        self._check_size(x.shape[2], x.shape[3])
        c = self.condition(t, y, x.shape[0])
        h = self.stem(x)
        skips = []
        for level, blocks in enumerate(self.enc):
            if level:
                h = self.down[level - 1](h)
            for blk in blocks:
                h = blk(h, c)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, c)
        for level in reversed(range(self.levels)):
            h = self.fuse[level](torch.cat([h, skips.pop()], dim=1))
            for blk in self.dec[level]:
                h = blk(h, c)
            if level:
                h = self.up[level - 1](h)
        return self.head_conv(F.silu(self.head_norm(h)))


# Image-space presets. `docs/methods/diffit.md` marks which values are the paper's and which are ours.
DIFFIT_UNETS = {
    # CIFAR-10 32x32: base 128, mults (1, 2, 2, 2), window 8 as read from the paper's supplementary
    # (unverified here); 2 blocks a level, 2 middle blocks, heads of 32 channels: our choice.
    "cifar10": dict(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2,
                    num_mid_blocks=2, window_size=8, channels_per_head=32),
    # ImageNet-64 (the paper reports FFHQ-64, not ImageNet-64): ADM-like widths, our choice.
    "imagenet64": dict(img_resolution=64, in_channels=3, num_classes=1000, model_channels=192,
                       channel_mult=(1, 2, 3, 4), num_blocks=2, num_mid_blocks=2, window_size=8, channels_per_head=64),
    # the embedded digits (16x16, 1 channel, 10 classes): ~0.8M parameters, trains on 2 CPU cores.
    "digits": dict(img_resolution=16, in_channels=1, num_classes=10, model_channels=32, channel_mult=(1, 2, 2),
                   num_blocks=1, num_mid_blocks=1, window_size=4, channels_per_head=16),
}


def diffit_unet(arch: str, **kwargs) -> DiffiTUNet:
    """Image-space DiffiT by preset name (the NetSpec builder "raygen.nets.diffit:diffit_unet"), e.g.
    `diffit_unet("cifar10", num_classes=10)`; kwargs override the preset."""
    if arch not in DIFFIT_UNETS:
        raise ValueError(f"unknown DiffiT U-Net preset {arch!r}; choose one of {', '.join(DIFFIT_UNETS)}")
    return DiffiTUNet(**{**DIFFIT_UNETS[arch], **kwargs})


def diffit_cifar10(**kw) -> DiffiTUNet: return diffit_unet("cifar10", **kw)
def diffit_imagenet64(**kw) -> DiffiTUNet: return diffit_unet("imagenet64", **kw)
def diffit_digits(**kw) -> DiffiTUNet: return diffit_unet("digits", **kw)


# ---------------------------------------------------------------------------------------------------
# Latent DiffiT.

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens [B, N, D], N = (H/p)(W/p) row-major. The parameters are
    a stride-p Conv2d (`proj`); it runs as one matmul on (c, i, j)-flattened patches, which leaves the
    residual stream contiguous (raygen.nets.dit.DiT.patchify)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p, weight = self.patch_size, self.proj.weight
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        return F.linear(x, weight.view(weight.shape[0], -1), self.proj.bias)


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) -> SiLU -> Linear(D -> p*p*out), the Linear zero-initialised."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(self.norm_final(x)))


class DiffiTLatent(_Conditioning):
    """Latent DiffiT: patchify -> + fixed 2-D sin-cos position embedding -> `depth` DiffiT blocks
    (TMSA over the whole token grid unless `window_size` is smaller) -> FinalLayer -> unpatchify.
    x_t = c = t_emb + y_emb (D-wide; timestep sinusoid of 256, [cos | sin]). Output channels
    in_channels, or 2x with `learn_sigma`. Square inputs of `input_size` only (the position embedding
    is built for that grid)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 learn_sigma: bool = False, window_size: Optional[int] = None, time_init: str = "zero",
                 tmsa: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.grid = input_size // patch_size
        self.window_size = self.grid if window_size is None else window_size
        window_shape((self.grid, self.grid), self.window_size)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self._setup_conditioning(hidden_size, 256, num_classes)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden_size, self.grid)).float()
                             .unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([DiffiTBlock(hidden_size, num_heads, hidden_size, self.window_size, mlp_ratio,
                                                 time_init, tmsa) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, c, g = self.patch_size, self.out_channels, self.grid
        return x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"expected x [B, {self.in_channels}, {self.input_size}, {self.input_size}], "
                             f"got {list(x.shape)}")
        c = self.condition(t, y, x.shape[0])
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            h = blk(h, c, (self.grid, self.grid))
        return self.unpatchify(self.final_layer(h))


def parse_arch(name: str) -> dict:
    """"DiffiT-<size>/<patch>" (DiT's sizes T, S, B, L, XL and patches 2, 4, 8) -> constructor args."""
    try:
        if not name.startswith("DiffiT-"):  # only DiffiT names: "DiT-B/2" is not one
            raise ValueError(name)
        return dit_parse_arch("DiT-" + name.removeprefix("DiffiT-"))
    except ValueError:
        names = [f"DiffiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCHES]
        raise ValueError(f"unknown DiffiT size {name!r}; choose one of {', '.join(names)}") from None


def diffit(name: str, **kwargs) -> DiffiTLatent:
    """Latent DiffiT by name (the NetSpec builder "raygen.nets.diffit:diffit"), e.g.
    `diffit("DiffiT-XL/2", input_size=32, in_channels=4, num_classes=1000)`; kwargs override the size."""
    return DiffiTLatent(**{**parse_arch(name), **kwargs})


def DiffiT_T_2(**kw): return diffit("DiffiT-T/2", **kw)
def DiffiT_T_4(**kw): return diffit("DiffiT-T/4", **kw)
def DiffiT_S_2(**kw): return diffit("DiffiT-S/2", **kw)
def DiffiT_B_2(**kw): return diffit("DiffiT-B/2", **kw)
def DiffiT_L_2(**kw): return diffit("DiffiT-L/2", **kw)
def DiffiT_XL_2(**kw): return diffit("DiffiT-XL/2", **kw)


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
