"""Latent-MAE: the frozen feature encoder phi of drifting generators (arXiv 2602.04770, paper A.3).

A ResNet-34-layout convolutional encoder with GroupNorm, trained as a masked autoencoder on VAE latents
(or, in CPU configs, on small images), whose multi-scale activations are the feature space of the drift
loss (docs/methods/drifting.md, "The feature network").

- Encoder: stem conv3x3-GN-ReLU ("conv1"), then four stages of `BasicBlock`s (`layers`, default [3,4,6,3]),
  widths W/2W/4W/8W, strides 1/2/2/2, and one extra GroupNorm after each stage. A stage's output
  ("layer1".."layer4") is taken after that GroupNorm; a block output ("layer2_blk4") before it.
- Decoder: a U-Net from layer4 back up to the conv1 resolution. Levels 3, 2, 1 each do a bilinear x2
  upsample, concat the skip of that level (layer3, layer2, layer1), GN, then 2x(conv3x3-GN-ReLU) down to
  that stage's width. Stage 1 has stride 1, so layer1 already sits at conv1's resolution; a fourth level
  (no upsample) concats the conv1 skip, so the decoder reaches the conv1 level (arXiv 2602.04770 A.3; a
  decoder that stops at stage 1 leaves the stem's features untrained). A 1x1 head maps W channels back to `in_channels`.
- Objective: zero a random set of exactly round(mask_ratio * num_patches) non-overlapping 2x2 patches per
  sample (Python's round, half to even), reconstruct, MSE over the masked elements only. Masks are drawn from
  an explicit `torch.Generator`, never from the global RNG. `forward(x, generator)` is that per-sample loss
  (so a DDP wrapper sees a forward call); `autoencode(x)` is the plain encode + decode.
- `features`: the official key set (arXiv 2602.04770 A.5), one encoder pass on the *unmasked* input. For each selected map
  [N,C,H,W], 7 keys, all [N, L, C]:
    `<map>` per location [N, H*W, C] (row-major locations);  `<map>_mean`, `<map>_std` over all locations
    [N, 1, C];  `<map>_p{s}_mean`, `<map>_p{s}_std` over non-overlapping s x s patches [N, HW/s^2, C]
    (row-major patches) for s in `patch_sizes` (2, 4).
  Every std is sqrt(var + 1e-6) with the population variance (the eps keeps gradients finite on constant
  channels). A patch size that does not tile the map (s > H, or H % s != 0) is skipped: with the tiny
  16x16 digits config layer4 is 2x2 and has no p4 keys; with 32x32 latents every map keeps all 7 (86 keys).
  Input keys (first, when `include_input`): `x_norm` = sqrt(mean_hw(x^2) + 1e-6) [N,1,C_in] and `x_global`
  = the raw flattened input [N,1,C_in*H*W]. Maps come in encoder (depth) order: conv1, layer1_blk2, layer1,
  layer2_blk2, layer2_blk4, layer2, layer3_blk2/4/6, layer3, layer4_blk2, layer4; "every 2nd block" means
  blocks 2, 4, 6, ... of each stage (1-based), which for [3,4,6,3] is 7 block maps.
  All feature tensors are contiguous float32 (the stats are computed in fp32 even under autocast: the drift
  runs in fp32). Statistics come from one channels-last [N, H*W, C] copy per map by reshape + centred
  moments, coarser ones combined from finer cells (no Python loops over data); the encoder stops after the
  deepest selected stage.

Sizes (measured by `count_params` and torch's FlopCounterMode, in_channels 4, input 32): W=256 (ablation)
has 391.6M parameters, encoder 340.2M (= ResNet-34's 21.3M body at 16x the widths; the paper's ≈340M
counts the encoder) + decoder 51.3M; 18.5 GMAC per latent for `features`, 27.6 for encode + decode.
W=640 (SOTA): 2.45B parameters (encoder 2.13B), 116 GMAC for `features`.
Written from the paper; the official torch port (`mae_model.py`) is a different net (torchvision ResNet-50 +
transformer decoder) and was not followed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STD_EPS = 1e-6


def num_groups(c: int, max_groups: int = 32) -> int:
    """The largest divisor of c that is <= max_groups."""
    return next(g for g in range(min(c, max_groups), 0, -1) if c % g == 0)


def group_norm(c: int) -> nn.GroupNorm:
    """GroupNorm over c channels with the largest divisor of c that is <= 32 as the group count."""
    return nn.GroupNorm(num_groups(c), c)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class ConvGNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(conv3x3(c_in, c_out, stride), group_norm(c_out), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN + shortcut, ReLU after the add. The shortcut is the identity, or a
    1x1 conv + GN projection when the stride or the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.gn1 = group_norm(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.gn2 = group_norm(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), group_norm(c_out))
            if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn1(self.conv1(x)), inplace=True)
        return F.relu(self.gn2(self.conv2(h)) + self.shortcut(x), inplace=True)


class Stage(nn.Module):
    """`depth` BasicBlocks (the first one strided) followed by the extra per-stage GroupNorm."""

    def __init__(self, c_in: int, c_out: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList([BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(depth)])
        self.norm = group_norm(c_out)


class Encoder(nn.Module):
    """Stem ("conv1") + 4 stages. `forward` returns every named map in depth order: conv1, then per stage
    layer{i}_blk{j} for every block j (1-based, before the stage GN) and layer{i} (after it)."""

    def __init__(self, in_channels: int, width: int, layers: tuple[int, ...]):
        super().__init__()
        self.stem = ConvGNReLU(in_channels, width)
        widths = [width * 2 ** i for i in range(len(layers))]
        self.widths = widths
        self.stages = nn.ModuleList([
            Stage(widths[i - 1] if i else width, widths[i], depth, 1 if i == 0 else 2)
            for i, depth in enumerate(layers)
        ])

    def forward(self, x: torch.Tensor, num_stages: int | None = None) -> dict[str, torch.Tensor]:
        h = self.stem(x)
        maps = {"conv1": h}
        for i, stage in enumerate(self.stages[:num_stages]):
            for j, block in enumerate(stage.blocks):
                h = block(h)
                maps[f"layer{i + 1}_blk{j + 1}"] = h
            h = stage.norm(h)
            maps[f"layer{i + 1}"] = h
        return maps


class UpLevel(nn.Module):
    """(bilinear x2 upsample if `upsample`) + concat skip -> GN -> 2x(conv3x3-GN-ReLU)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.norm = group_norm(c_in + c_skip)
        self.convs = nn.Sequential(ConvGNReLU(c_in + c_skip, c_out), ConvGNReLU(c_out, c_out))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.convs(self.norm(torch.cat([x, skip], dim=1)))


class Decoder(nn.Module):
    """U-Net decoder: layer4 -> (up + layer3) -> (up + layer2) -> (up + layer1) -> (+ conv1) -> 1x1 head."""

    def __init__(self, widths: list[int], out_channels: int):
        super().__init__()
        levels = [UpLevel(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))]
        levels.append(UpLevel(widths[0], widths[0], widths[0], upsample=False))  # conv1 skip, same resolution
        self.levels = nn.ModuleList(levels)
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(self.levels)  # number of stages: (n - 1) upsampling levels + the conv1 level
        skips = [maps[f"layer{i}"] for i in range(n - 1, 0, -1)] + [maps["conv1"]]
        h = maps[f"layer{n}"]
        for level, skip in zip(self.levels, skips):
            h = level(h, skip)
        return self.head(h)


def _std(var: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(var + STD_EPS)


def _pool_stats(mean: torch.Tensor, var: torch.Tensor | None, rh: int, rw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance over non-overlapping rh x rw groups of cells.

    mean, var: [N, Hc, Wc, C] statistics of equal-sized cells (var None: single elements) -> [N, L, C]
    each, groups row-major. Law of total variance: var = E[var_cell] + Var[mean_cell], with the second term
    two-pass (centred). The centring mean is detached: d Var / d centre = -2 E[m - centre] = 0, so the
    gradient is unchanged and that backward path is skipped."""
    n, hc, wc, c = mean.shape

    def groups(t):  # [N, Hc, Wc, C] -> [N, groups, rh*rw, C]
        return t.view(n, hc // rh, rh, wc // rw, rw, c).transpose(2, 3).reshape(n, -1, rh * rw, c)

    cells = groups(mean)
    out_mean = cells.mean(2, keepdim=True)
    out_var = (cells - out_mean.detach()).square().mean(2)
    if var is not None:
        out_var = out_var + groups(var).mean(2)
    return out_mean.squeeze(2), out_var


def map_features(h: torch.Tensor, name: str, patch_sizes=(2, 4)) -> dict[str, torch.Tensor]:
    """The 7 (or fewer) keys of one map h [N,C,H,W], all contiguous [N, L, C] in h's dtype.

    One channels-last copy [N, H*W, C] is the per-location key; only the finest patch statistics read it,
    coarser ones (and the global ones) combine finer cells (`_pool_stats`): 4x4 from the 2x2 cells, global
    from the 4x4 cells, a pass over a 4x / 16x smaller tensor instead of over the whole map (features
    forward + input backward of the tiny digits net at batch 256, one thread, interleaved A/B: 0.50 s -> 0.35 s)."""
    n, c, hh, ww = h.shape
    t = h.permute(0, 2, 3, 1).reshape(n, hh * ww, c).contiguous()  # reshape alone gives a strided view
    out = {name: t}
    levels = {1: (t.view(n, hh, ww, c), None)}  # cell size -> (mean grid, var grid or None)
    patch_stats = {}
    for p in sorted(set(patch_sizes)):
        if p > hh or p > ww or hh % p or ww % p:
            continue  # no exact tiling by p x p patches
        s = max(k for k in levels if p % k == 0)
        mean, var = _pool_stats(*levels[s], p // s, p // s)
        levels[p] = (mean.view(n, hh // p, ww // p, c), var.view(n, hh // p, ww // p, c))
        patch_stats[p] = (mean, var)
    s = max(levels)
    mean, var = _pool_stats(*levels[s], hh // s, ww // s)
    out[f"{name}_mean"], out[f"{name}_std"] = mean, _std(var)
    for p in patch_sizes:
        if p in patch_stats:
            mean, var = patch_stats[p]
            out[f"{name}_p{p}_mean"], out[f"{name}_p{p}_std"] = mean, _std(var)
    return out


class LatentMAE(nn.Module):
    """Masked autoencoder whose encoder is the drift loss's feature extractor (module docstring)."""

    def __init__(
        self,
        in_channels: int = 4,
        width: int = 256,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        input_size: int = 32,
        patch: int = 2,
        mask_ratio: float = 0.5,
    ):
        super().__init__()
        down = 2 ** (len(layers) - 1)
        if input_size % down or input_size % patch:
            raise ValueError(f"input_size {input_size} must be divisible by {down} (stage strides) "
                             f"and by patch {patch}")
        self.in_channels = in_channels
        self.width = width
        self.layers = tuple(layers)
        self.input_size = input_size
        self.patch = patch
        self.mask_ratio = mask_ratio
        self.num_patches = (input_size // patch) ** 2
        self.num_masked = int(round(mask_ratio * self.num_patches))
        if not 0 < self.num_masked <= self.num_patches:
            raise ValueError(f"mask_ratio {mask_ratio} masks {self.num_masked} of {self.num_patches} patches")
        self.encoder = Encoder(in_channels, width, self.layers)
        self.decoder = Decoder(self.encoder.widths, in_channels)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # the reconstruction starts at 0 (kaiming fan-out on the 1x1 head would start it at a random
        # field of variance ~ 2 * W / in_channels, which the first steps only spend undoing)
        nn.init.zeros_(self.decoder.head.weight)
        nn.init.zeros_(self.decoder.head.bias)

    # ---- feature maps and keys (no data needed) ----

    def map_names(self) -> list[str]:
        """The default feature maps in depth order: conv1, every 2nd block of each stage, each stage (after GN)."""
        names = ["conv1"]
        for i, depth in enumerate(self.layers):
            names += [f"layer{i + 1}_blk{j}" for j in range(2, depth + 1, 2)]
            names.append(f"layer{i + 1}")
        return names

    def map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of every named encoder map for an `input_size` input."""
        s = self.input_size
        shapes = {"conv1": (self.width, s, s)}
        for i, depth in enumerate(self.layers):
            s = s if i == 0 else s // 2
            c = self.encoder.widths[i]
            shapes.update({f"layer{i + 1}_blk{j}": (c, s, s) for j in range(1, depth + 1)})
            shapes[f"layer{i + 1}"] = (c, s, s)
        return shapes

    def feature_keys(self, layers=None, patch_sizes=(2, 4), include_input=True) -> dict[str, tuple[int, int]]:
        """Key -> (L, C) of `features(x, layers, patch_sizes, include_input)` for an `input_size` input,
        in the same order, without running data."""
        names = self._select(layers)
        shapes = self.map_shapes()
        out = {}
        if include_input:
            s = self.input_size
            out["x_norm"] = (1, self.in_channels)
            out["x_global"] = (1, self.in_channels * s * s)
        for name in names:
            c, h, w = shapes[name]
            out[name] = (h * w, c)
            out[f"{name}_mean"] = out[f"{name}_std"] = (1, c)
            for p in patch_sizes:
                if p <= h and p <= w and h % p == 0 and w % p == 0:
                    out[f"{name}_p{p}_mean"] = out[f"{name}_p{p}_std"] = (h * w // (p * p), c)
        return out

    def _select(self, layers) -> list[str]:
        if layers is None:
            return self.map_names()
        known = self.map_shapes()
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f"unknown feature maps {unknown}; choose from {list(known)}")
        order = list(known)
        return sorted(dict.fromkeys(layers), key=order.index)

    # ---- feature extraction ----

    def features(self, x: torch.Tensor, layers=None, patch_sizes=(2, 4), include_input=True) -> dict[str, torch.Tensor]:
        """x [N,C_in,H,W] (unmasked) -> {key: [N, L, C] float32} (module docstring; keys as `feature_keys`).
        Differentiable with respect to x: the drift loss backprops through the frozen encoder."""
        names = self._select(layers)
        stages = [int(n[5:].split("_")[0]) for n in names if n.startswith("layer")]
        maps = self.encoder(x, num_stages=max(stages, default=0))
        out = {}
        if include_input:
            xf = x.float()
            out["x_norm"] = torch.sqrt(xf.square().mean(dim=(2, 3)) + STD_EPS).unsqueeze(1)
            out["x_global"] = xf.reshape(xf.shape[0], 1, -1)
        for name in names:
            out.update(map_features(maps[name].float(), name, patch_sizes))
        return out

    # ---- masked-autoencoder objective ----

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The per-sample training loss [N] (= `loss`), so that a DDP wrapper sees a forward call."""
        return self.loss(x, generator)

    def autoencode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode + decode x as given (no masking applied here) -> [N,C_in,H,W]."""
        return self.decoder(self.encoder(x))

    def mask(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[N,1,H,W] in x's dtype: 1 on the `num_masked` randomly chosen patch x patch squares of each sample."""
        n, _, h, w = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        scores = torch.rand(n, gh * gw, generator=generator, device=generator.device)
        idx = scores.argsort(dim=1)[:, : int(round(self.mask_ratio * gh * gw))]
        m = torch.zeros(n, gh * gw, device=generator.device).scatter_(1, idx, 1.0).to(device=x.device, dtype=x.dtype)
        return m.view(n, 1, gh, 1, gw, 1).expand(n, 1, gh, p, gw, p).reshape(n, 1, h, w)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (masked input, reconstruction), both [N,C_in,H,W]; the masked patches of the input are 0."""
        masked = x * (1 - self.mask(x, generator))
        return masked, self.autoencode(masked)

    def loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per-sample MSE [N] over the masked elements (masked patches x channels)."""
        m = self.mask(x, generator)
        pred = self.autoencode(x * (1 - m))
        sq = (pred.float() - x.float()).square() * m
        return sq.sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * x.shape[1])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Named sizes: W = 256 is the paper's ablation encoder, W = 640 the SOTA one; W16/W64 are CPU-sized.
MAE_SIZES = {
    "W16": dict(width=16),
    "W64": dict(width=64),
    "W256": dict(width=256),
    "W640": dict(width=640),
}


def latent_mae(name: str | int = "W256", **kwargs) -> LatentMAE:
    """Build a LatentMAE by size name ("W256", "MAE-W256") or width (256); kwargs override the named size."""
    if isinstance(name, int):
        spec = dict(width=name)
    else:
        try:
            spec = dict(MAE_SIZES[name.removeprefix("MAE-")])
        except KeyError:
            raise ValueError(f"unknown MAE size {name!r}; choose one of {list(MAE_SIZES)} or an int width") from None
    spec.update(kwargs)
    return LatentMAE(**spec)


def LatentMAE_W16(**kw): return latent_mae("W16", **kw)
def LatentMAE_W64(**kw): return latent_mae("W64", **kw)
def LatentMAE_W256(**kw): return latent_mae("W256", **kw)
def LatentMAE_W640(**kw): return latent_mae("W640", **kw)
