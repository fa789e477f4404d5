"""The EDM U-Nets (Karras et al., arXiv 2206.00364, Appendix F.2): `SongUNet` (DDPM++ / NCSN++ of Song
et al., arXiv 2011.13456) and `DhariwalUNet` (ADM of Dhariwal & Nichol, arXiv 2105.05233), the
backbones of EDM and of Beta diffusion / SDD (arXiv 2309.07867). docs/methods/unet.md describes them.

Small named blocks (`Linear`, `Conv2d`, `GroupNorm`, `Resample`, `UNetBlock` (with its attention),
`PositionalEmbedding`, `FourierEmbedding`) and named sizes (`ddpmpp`, `ncsnpp`, `adm`; `unet(arch)` for
a NetSpec). The function is EDM's (NVlabs/edm training/networks.py: same blocks, initialisation, module
and parameter names), with these differences:
- class conditioning is `nn.Embedding(num_classes + 1, dim)` indexed by int64 labels, where the index
  `num_classes` is the null class of classifier-free guidance (arXiv 2207.12598). EDM multiplies a
  one-hot vector by a Linear. A one-hot row times a matrix is a row of that matrix, so this is the same
  function class: for SongUNet (whose label Linear has a bias) row i = W[:, i] * sqrt(num_classes) + b
  and the null row = b (EDM's dropped label is the all-zero vector), the same parameter count; for
  DhariwalUNet (bias-free label Linear, where a dropped label adds 0) the null row is one extra learned
  vector of `emb_channels` parameters. Rows are initialised to the distribution EDM's init gives them,
  the null row to zero (as EDM's bias / zero vector). The network never drops labels itself: the method
  passes the null label.
- how, not what (each measured by bench/unet_step.py): attention runs on pixel tokens through
  `F.scaled_dot_product_attention` (EDM: two einsums and a hand-written softmax backward, in fp32 under
  fp16); skip_scale is folded into the weights of the layer before each residual add, so that
  `(a + b) * skip_scale` is one `torch.add(a', b, alpha=skip_scale)`.
- attention heads of `channels_per_head` (ADM) are at least one: EDM's `out // 64` silently drops
  attention below 64 channels (never in its configs; common in the small nets of tests and CPU runs).
- non-square images: see `SongUNet`.
EDM checkpoints map onto these modules by name, except `map_label` (one-hot Linear -> embedding rows,
above) and the FIR filter buffers, which are rebuilt from `resample_filter` rather than stored.
Dropout draws from torch's default generator, as every nn.Dropout does (seed it with the run).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Resolution = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------------
# Initialisation and the basic layers.

def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's initialisers (unit gain): xavier / kaiming, uniform / normal."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}; choose xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal")


class Linear(nn.Module):
    """Fully connected layer; weight [out, in] drawn by `weight_init` times `init_weight`, bias likewise
    (same fan) times `init_bias`. `init_weight=1e-5` is EDM's near-zero init of output layers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fan = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fan) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fan) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def fir_filter_2d(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR filter [1, 1, k, k] from 1-D taps, normalised to sum 1."""
    f = torch.as_tensor(taps, dtype=torch.float64)
    return (torch.outer(f, f) / f.sum() ** 2).float()[None, None]


class Resample(nn.Module):
    """2x down- or upsampling of every channel with the separable FIR filter `taps` (EDM / StyleGAN2
    style): down = depthwise conv with the filter at stride 2; up = depthwise transposed conv at stride 2
    with 4x the filter (so a constant image stays constant). With [1, 1] these are 2x2 average pooling
    and nearest upsampling; the depthwise convs compute them faster on CPU than avg_pool2d / interpolate
    (bench/unet_step.py). `fused=True` drops the filter's own padding: the second half of EDM's fused
    "conv (padded by both) then filter-down"."""

    def __init__(self, mode: str, taps: Sequence[float] = (1, 1), fused: bool = False):
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"resample mode must be 'down' or 'up', got {mode!r}")
        self.mode = mode
        self.taps = tuple(float(t) for t in taps)
        self.pad = 0 if fused else (len(self.taps) - 1) // 2
        f = fir_filter_2d(self.taps)
        self.register_buffer("filter", f if mode == "down" else f * 4, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        f = self.filter.to(x.dtype).expand(c, 1, -1, -1)
        if self.mode == "down":
            return F.conv2d(x, f, groups=c, stride=2, padding=self.pad)
        return F.conv_transpose2d(x, f, groups=c, stride=2, padding=self.pad)


class Conv2d(nn.Module):
    """k x k convolution ('same' padding) with optional 2x resampling before it (`up` / `down`), EDM's
    init modes; `kernel=0` is a resampler with no weights. `fused_resample` (down only, used by NCSN++'s
    residual encoder) convolves first with the padding of both and filters without padding after, as
    EDM does: not the same function as resample-then-conv, so it is kept as such."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        if fused_resample and (up or not kernel):
            raise ValueError("fused_resample is implemented for a weighted down-sampling conv only")
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        fan = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fan) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fan) * init_bias) if kernel and bias else None
        self.fused = fused_resample
        self.resample = Resample("up" if up else "down", resample_filter, fused=fused_resample) if (up or down) else None

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """conv(x) * scale, the scale folded into the (small) weight and bias instead of the activations."""
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if scale != 1.0:
            w = None if w is None else w * scale
            b = None if b is None else b * scale
            if w is None:
                x = x * scale
        if self.fused:  # conv padded by (kernel pad + filter pad), then filter-down unpadded, bias last
            x = F.conv2d(x, w, padding=self.kernel // 2 + (len(self.resample.taps) - 1) // 2)
            x = self.resample(x)
            return x if b is None else x + b[:, None, None]
        if self.resample is not None:
            x = self.resample(x)
        if w is not None:
            x = F.conv2d(x, w, b, padding=self.kernel // 2)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with EDM's group rule: min(32, C // 4) groups (at least 4 channels per group)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# ---------------------------------------------------------------------------------------------------
# Noise-level embeddings.

class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of a scalar: frequencies (1 / max_positions) ** (i / (n/2 - endpoint)),
    i < n/2; output [cos | sin] (or [sin | cos] with `sin_first`: SongUNet swaps the halves, as EDM does)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False, sin_first: bool = False):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions
        self.endpoint, self.sin_first = endpoint, sin_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        args = torch.outer(x.float(), freqs)
        parts = (args.sin(), args.cos()) if self.sin_first else (args.cos(), args.sin())
        return torch.cat(parts, dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++): fixed frequencies ~ N(0, scale^2), a persistent
    buffer drawn at construction; output [cos | sin] (or [sin | cos] with `sin_first`)."""

    def __init__(self, num_channels: int, scale: float = 16.0, sin_first: bool = False):
        super().__init__()
        self.sin_first = sin_first
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = torch.outer(x.float(), (2 * math.pi * self.freqs).float())
        parts = (args.sin(), args.cos()) if self.sin_first else (args.cos(), args.sin())
        return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------------
# The U-Net block.

class UNetBlock(nn.Module):
    """EDM's U-Net residual block (the union of DDPM++, NCSN++ and ADM blocks):
        h = conv0(SiLU(norm0(x)))                       (conv0 resamples first when up/down)
        h = SiLU(norm1(h) * (1 + scale) + shift)         adaptive_scale (ADM): (scale, shift) = affine(emb)
          = SiLU(norm1(h + affine(emb)))                 otherwise (DDPM++/NCSN++)
        h = conv1(dropout(h))                             (conv1 near-zero init)
        x = (h + skip(x)) * skip_scale                   skip: identity, or 1x1 conv / resample when the
                                                           channels or the resolution change
        x = (x + attention(x)) * skip_scale              if attention (num_heads heads; 1 in
                                                           SongUNet, out_channels // 64 in DhariwalUNet)
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: Optional[int] = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Optional[dict] = None, init_zero: Optional[dict] = None, init_attn: Optional[dict] = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        # heads of `channels_per_head` channels (ADM), at least one: EDM's out // 64 would silently drop
        # attention below 64 channels (never the case in its configs, common in small test nets)
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else max(1, out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"{out_channels} channels do not split into {self.num_heads} heads")
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).to(x.dtype)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = F.dropout(x, p=self.dropout, training=self.training)
        skip = self.skip(orig) if self.skip is not None else orig
        # (conv1(x) + skip) * skip_scale as one add: skip_scale is folded into conv1's weights
        x = torch.add(self.conv1(x, scale=self.skip_scale), skip, alpha=self.skip_scale)
        if self.num_heads:
            x = self.attention(x)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(x + proj(softmax(q^T k / sqrt(d)) v)) * skip_scale, q/k/v = 1x1 qkv(norm2(x)) per head, over
        the H*W pixels. The parameters keep EDM's layout (1x1 conv weights, qkv rows ordered (head,
        channel, q|k|v)), but the work runs on pixel tokens: the qkv rows are regrouped (a copy of the
        small weight) so one batched matmul gives q, k, v as [B, heads, L, d] with unit stride, which
        SDPA's fused kernel needs (channel-first q/k/v make it fall back to the unfused path); the proj
        matmul writes [B, C, L] back, and the residual and skip_scale are one add."""
        b, c, h, w = x.shape
        n, d, L = self.num_heads, c // self.num_heads, h * w
        s = self.skip_scale
        tokens = self.norm2(x).flatten(2).transpose(1, 2)  # [B, L, C] view
        wqkv = self.qkv.weight.to(x.dtype).view(n, d, 3, c).permute(2, 0, 1, 3).reshape(3 * c, c)
        bqkv = self.qkv.bias.to(x.dtype).view(n, d, 3).permute(2, 0, 1).reshape(3 * c)
        qkv = torch.baddbmm(bqkv, tokens, wqkv.t().expand(b, c, 3 * c)).view(b, L, 3, n, d)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, heads, L, d]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, L, c)
        wp = self.proj.weight.to(x.dtype).view(c, c) * s
        bp = self.proj.bias.to(x.dtype) * s
        out = torch.baddbmm(bp[:, None], wp.expand(b, c, c), a.transpose(1, 2))  # [B, C, L]
        return torch.add(out.view(b, c, h, w), x, alpha=s)


# ---------------------------------------------------------------------------------------------------
# Shared pieces of both nets.

def _hw(img_resolution: Resolution) -> tuple[int, int]:
    if isinstance(img_resolution, int):
        return img_resolution, img_resolution
    h, w = (int(v) for v in img_resolution)
    return h, w


class LabelEmbedding(nn.Module):
    """Class index -> vector; index `num_classes` is the null class (see the module docstring)."""

    def __init__(self, num_classes: int, dim: int, row_init: torch.Tensor):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.cat([row_init, torch.zeros(1, dim)]))  # null row starts at 0

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return F.embedding(labels, self.weight)


class _EDMUNet(nn.Module):
    """Conditioning inputs and shape checks shared by SongUNet and DhariwalUNet."""

    def _setup(self, img_resolution, in_channels, out_channels, num_classes, augment_dim, levels):
        self.img_resolution = img_resolution
        self.img_size = _hw(img_resolution)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_classes, self.augment_dim, self.levels = num_classes, augment_dim, levels
        h, w = self.img_size
        if h % (1 << (levels - 1)) or w % (1 << (levels - 1)):
            raise ValueError(f"image size {h}x{w} must be divisible by 2^{levels - 1} for {levels} resolution levels")

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _check(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x [B, {self.in_channels}, H, W], got {list(x.shape)}")
        m = 1 << (self.levels - 1)
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"H and W must be divisible by {m} ({self.levels} levels), got {x.shape[2]}x{x.shape[3]}")

    def _label_emb(self, labels: Optional[torch.Tensor], batch: int, device) -> Optional[torch.Tensor]:
        if self.map_label is None:
            return None
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.map_label(labels)

    def _augment_emb(self, augment_labels: Optional[torch.Tensor], batch: int, device) -> Optional[torch.Tensor]:
        if self.map_augment is None:
            return None
        if augment_labels is None:  # zeros: the bias-free map then adds 0, and its weight still takes part
            augment_labels = torch.zeros(batch, self.augment_dim, device=device)
        return self.map_augment(augment_labels.float())


# ---------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++.

class SongUNet(_EDMUNet):
    """DDPM++ (positional embedding, standard encoder, [1,1] filter) and NCSN++ (Fourier embedding,
    residual encoder, [1,3,3,1] filter) as EDM reimplements them (arXiv 2206.00364 App. F.2).

    forward(x [B, in, H, W], noise_labels [B] float (the preconditioner's c_noise), labels int64 [B] or
    None (= all null), augment_labels [B, augment_dim] or None (= zeros)) -> [B, out, H, W].

    Non-square images: `img_resolution` may be an int or (H, W). Which levels have attention is fixed at
    construction: level l (0 = full size) attends iff its height H >> l is in `attn_resolutions`. The
    forward accepts any H, W divisible by 2^(levels - 1) (everything else is convolutional).
    """

    def __init__(self, img_resolution: Resolution, in_channels: int, out_channels: int, num_classes: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        self._setup(img_resolution, in_channels, out_channels, num_classes, augment_dim, len(channel_mult))
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping: noise embedding (+ label + augment) -> 2-layer MLP
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True, sin_first=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, sin_first=True)
        self.map_label = None
        if num_classes:
            # EDM: Linear(one_hot * sqrt(n)) with xavier weight and zero bias -> rows sqrt(n) W[:, i]
            w = weight_init([noise_channels, num_classes], "xavier_uniform", num_classes, noise_channels)
            self.map_label = LabelEmbedding(num_classes, noise_channels, w.t() * math.sqrt(num_classes))
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        h0, w0 = self.img_size
        name = lambda level: f"{h0 >> level}x{w0 >> level}"  # noqa: E731

        # Encoder
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        skips = []
        for level, mult in enumerate(channel_mult):
            res = h0 >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{name(level)}_conv"] = Conv2d(cin, cout, kernel=3, **init)
                skips.append(cout)
            else:
                self.enc[f"{name(level)}_down"] = UNetBlock(cout, cout, down=True, **block)
                skips.append(cout)
                if encoder_type == "skip":
                    self.enc[f"{name(level)}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                                 resample_filter=resample_filter)
                    self.enc[f"{name(level)}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{name(level)}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{name(level)}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)

        # Decoder: the lowest level opens with two blocks (the first with attention); every level has
        # num_blocks + 1 blocks that each take one encoder skip, attention on its last block only
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = h0 >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{name(level)}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{name(level)}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{name(level)}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{name(level)}_block{idx}"] = UNetBlock(
                    cin, cout, attention=idx == num_blocks and res in attn_resolutions, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{name(level)}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                               resample_filter=resample_filter)
                self.dec[f"{name(level)}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{name(level)}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)
        # the decoder's "_blockN" blocks concatenate an encoder skip first (in0 / in1 / up / aux do not)
        self._dec_takes_skip = {k: k.rsplit("_", 1)[1].startswith("block") for k in self.dec}

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(x)
        b = x.shape[0]
        emb = self.map_noise(noise_labels.reshape(-1).expand(b) if noise_labels.numel() == 1 else noise_labels)
        emb = emb.to(self.map_layer0.weight.dtype)
        label = self._label_emb(labels, b, x.device)
        if label is not None:
            emb = emb + label
        aug = self._augment_emb(augment_labels, b, x.device)
        if aug is not None:
            emb = emb + aug
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        aux = x
        for key, block in self.enc.items():
            if "aux_down" in key:
                aux = block(aux)
            elif "aux_skip" in key:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in key:
                x = skips[-1] = aux = (x + block(aux)) * math.sqrt(0.5)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        out = tmp = None
        for key, block in self.dec.items():
            if "aux_up" in key:
                out = block(out)
            elif "aux_norm" in key:
                tmp = block(x)
            elif "aux_conv" in key:
                tmp = block(F.silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                if self._dec_takes_skip[key]:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


# ---------------------------------------------------------------------------------------------------
# ADM.

class DhariwalUNet(_EDMUNet):
    """ADM (arXiv 2105.05233) as EDM configures it: positional embedding of `model_channels`, adaptive
    (scale, shift) conditioning, attention heads of 64 channels, kaiming-uniform init scaled by sqrt(1/3),
    zero-init output layers, skip_scale 1. Same forward, labels and non-square rule as `SongUNet`."""

    def __init__(self, img_resolution: Resolution, in_channels: int, out_channels: int, num_classes: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10):
        super().__init__()
        self._setup(img_resolution, in_channels, out_channels, num_classes, augment_dim, len(channel_mult))
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if num_classes:
            # EDM: bias-free Linear(one_hot), kaiming-normal weight times sqrt(n) -> rows ~ N(0, 1)
            w = weight_init([emb_channels, num_classes], "kaiming_normal", num_classes, emb_channels)
            w = w * math.sqrt(num_classes)
            self.map_label = LabelEmbedding(num_classes, emb_channels, w.t())

        h0, w0 = self.img_size
        name = lambda level: f"{h0 >> level}x{w0 >> level}"  # noqa: E731
        self.enc = nn.ModuleDict()
        cout = in_channels
        skips = []
        for level, mult in enumerate(channel_mult):
            res = h0 >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{name(level)}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{name(level)}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{name(level)}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        self._dec_takes_skip = {}
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = h0 >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{name(level)}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{name(level)}_in1"] = UNetBlock(cout, cout, **block)
                self._dec_takes_skip[f"{name(level)}_in0"] = self._dec_takes_skip[f"{name(level)}_in1"] = False
            else:
                self.dec[f"{name(level)}_up"] = UNetBlock(cout, cout, up=True, **block)
                self._dec_takes_skip[f"{name(level)}_up"] = False
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{name(level)}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                self._dec_takes_skip[f"{name(level)}_block{idx}"] = True
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(x)
        b = x.shape[0]
        emb = self.map_noise(noise_labels.reshape(-1).expand(b) if noise_labels.numel() == 1 else noise_labels)
        emb = emb.to(self.map_layer0.weight.dtype)
        aug = self._augment_emb(augment_labels, b, x.device)
        if aug is not None:
            emb = emb + aug
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        label = self._label_emb(labels, b, x.device)
        if label is not None:
            emb = emb + label
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for key, block in self.dec.items():
            if self._dec_takes_skip[key]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# ---------------------------------------------------------------------------------------------------
# Named sizes (EDM's train.py --arch) and the NetSpec builder.

DDPMPP = dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
              dropout=0.13, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
              decoder_type="standard", resample_filter=(1, 1))
NCSNPP = dict(DDPMPP, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
              resample_filter=(1, 3, 3, 1))
ADM = dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
           dropout=0.10)  # EDM's ImageNet-64 command line (--dropout=0.10)
ARCHS = {"ddpmpp": (SongUNet, DDPMPP), "ncsnpp": (SongUNet, NCSNPP), "adm": (DhariwalUNet, ADM)}


def unet(arch: str, **kwargs) -> nn.Module:
    """Build an EDM U-Net by name, e.g. `unet("ddpmpp", img_resolution=32, in_channels=3, num_classes=10)`
    (the NetSpec builder "raygen.nets.unet:unet"). kwargs override the named config; `out_channels`
    defaults to `in_channels`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown U-Net arch {arch!r}; choose one of {', '.join(ARCHS)}")
    cls, config = ARCHS[arch]
    kwargs = dict(kwargs)
    if "out_channels" not in kwargs and "in_channels" in kwargs:
        kwargs["out_channels"] = kwargs["in_channels"]
    return cls(**{**config, **kwargs})


def ddpmpp(**overrides) -> SongUNet:
    """EDM's CIFAR-10 DDPM++ (128 channels, mult (2,2,2), 4 blocks, attention at 16, dropout 0.13).
    EDM trains it with augment_dim=9 when augmentation is on: pass it to match."""
    return unet("ddpmpp", **overrides)


def ncsnpp(**overrides) -> SongUNet:
    """EDM's NCSN++: DDPM++ with Fourier embedding (x2 channels), residual encoder, [1,3,3,1] filter."""
    return unet("ncsnpp", **overrides)


def adm(**overrides) -> DhariwalUNet:
    """EDM's ImageNet-64 ADM (192 channels, mult (1,2,3,4), 3 blocks, attention at 32/16/8)."""
    return unet("adm", **overrides)


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
