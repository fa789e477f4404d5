"""raygen.nets.unet (EDM's SongUNet / DhariwalUNet, arXiv 2206.00364) against independent references:
- a float64 functional transcription of EDM's formulation (FIR resampling as depthwise (transposed)
  convs with the tiled filter, attention as two einsums and a softmax, one-hot labels times a matrix),
  run over the net's own parameters, block by block and for the whole forward, where raygen computes
  average pooling / nearest upsampling, SDPA and an embedding lookup;
- parameter counts from a closed-form sum over the architecture (conv k*k*cin*cout + cout, GroupNorm
  2C, attention qkv/proj, embedding MLPs), never from instantiated modules, for full-size DDPM++ on
  CIFAR-10 and ADM on ImageNet-64 (the nets themselves are built on the meta device);
- shapes (conditional, null label, augment labels, non-square), EDM's near-zero output init, label paths.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from raygen.core.contracts import NetSpec
from raygen.nets.unet import (DhariwalUNet, PositionalEmbedding, SongUNet, UNetBlock, adm, ddpmpp, ncsnpp,
                              param_count, unet)

SMALL = {
    "ddpmpp": dict(model_channels=8, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,)),
    "ncsnpp": dict(model_channels=8, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,)),
    "adm": dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8, 4)),
}


def _small(arch, **kw):
    torch.manual_seed(0)
    return unet(arch, in_channels=3, **{**dict(img_resolution=16, dropout=0.0), **SMALL[arch], **kw})


@torch.no_grad()
def _randomise(net, seed=1, std=0.2):
    """Replace the near-zero / zero output inits so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ---------------------------------------------------------------------------------------------------
# float64 reference of EDM's formulation

def ref_resample(x, taps, mode, pad=None):
    f = torch.tensor(taps, dtype=torch.float64)
    f = (torch.outer(f, f) / f.sum() ** 2)[None, None]
    c = x.shape[1]
    pad = (len(taps) - 1) // 2 if pad is None else pad
    if mode == "down":
        return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, (f * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)


def ref_conv(conv, x):
    w = None if conv.weight is None else conv.weight.double()
    b = None if conv.bias is None else conv.bias.double()
    taps = None if conv.resample is None else conv.resample.taps
    if conv.fused:
        x = F.conv2d(x, w, padding=conv.kernel // 2 + (len(taps) - 1) // 2)
        x = ref_resample(x, taps, "down", pad=0)
        return x + b[:, None, None]
    if taps is not None:
        x = ref_resample(x, taps, conv.resample.mode)
    if w is not None:
        x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if b is not None:
            x = x + b[:, None, None]
    return x


def ref_gn(gn, x):
    b, c = x.shape[:2]
    g = x.reshape(b, gn.num_groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps)
    return g.reshape(x.shape) * gn.weight.double()[:, None, None] + gn.bias.double()[:, None, None]


def ref_block(blk: UNetBlock, x, emb):
    silu = F.silu
    orig = x
    x = ref_conv(blk.conv0, silu(ref_gn(blk.norm0, x)))
    params = (emb @ blk.affine.weight.double().t() + blk.affine.bias.double())[:, :, None, None]
    if blk.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        x = silu(shift + ref_gn(blk.norm1, x) * (scale + 1))
    else:
        x = silu(ref_gn(blk.norm1, x + params))
    x = ref_conv(blk.conv1, x)
    x = (x + (ref_conv(blk.skip, orig) if blk.skip is not None else orig)) * blk.skip_scale
    if blk.num_heads:
        n, c, h, w = x.shape
        qkv = ref_conv(blk.qkv, ref_gn(blk.norm2, x))
        q, k, v = qkv.reshape(n * blk.num_heads, c // blk.num_heads, 3, h * w).unbind(2)
        wts = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", wts, v)
        x = (ref_conv(blk.proj, a.reshape(n, c, h, w)) + x) * blk.skip_scale
    return x


def ref_noise_embedding(net, noise):
    if isinstance(net.map_noise, PositionalEmbedding):
        n = net.map_noise.num_channels
        ep = 1 if net.map_noise.endpoint else 0
        freqs = (1 / 10000) ** (torch.arange(n // 2, dtype=torch.float64) / (n // 2 - ep))
    else:
        freqs = 2 * math.pi * net.map_noise.freqs.double()
    a = torch.outer(noise.double(), freqs)
    emb = torch.cat([a.cos(), a.sin()], dim=1)
    if isinstance(net, SongUNet):  # EDM swaps the halves
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
    return emb


def ref_label_term(net, labels):
    """one-hot (the null class = all-zero) @ rows, plus the null row as EDM's bias (SongUNet) or as the
    learned null vector added only for null labels (DhariwalUNet; EDM adds 0 there)."""
    rows = net.map_label.weight.double()
    onehot = F.one_hot(labels, net.num_classes + 1).double()
    return onehot[:, : net.num_classes] @ rows[: net.num_classes] + onehot[:, net.num_classes :] @ rows[net.num_classes :]


def ref_forward(net, x, noise, labels, aug):
    """EDM's forward (training/networks.py) walking the net's module dicts with EDM's own rules."""
    x = x.double()
    lin = lambda m, v: v @ m.weight.double().t() + (0 if m.bias is None else m.bias.double())  # noqa: E731
    emb = ref_noise_embedding(net, noise)
    song = isinstance(net, SongUNet)
    if song:
        if net.map_label is not None:
            emb = emb + ref_label_term(net, labels)
        if net.map_augment is not None:
            emb = emb + lin(net.map_augment, aug.double())
        emb = F.silu(lin(net.map_layer1, F.silu(lin(net.map_layer0, emb))))
    else:
        if net.map_augment is not None:
            emb = emb + lin(net.map_augment, aug.double())
        emb = lin(net.map_layer1, F.silu(lin(net.map_layer0, emb)))
        if net.map_label is not None:
            emb = emb + ref_label_term(net, labels)
        emb = F.silu(emb)
    skips, aux = [], x
    for name, blk in net.enc.items():
        if "aux_down" in name:
            aux = ref_conv(blk, aux)
        elif "aux_skip" in name:
            x = skips[-1] = x + ref_conv(blk, aux)
        elif "aux_residual" in name:
            x = skips[-1] = aux = (x + ref_conv(blk, aux)) / math.sqrt(2)
        else:
            x = ref_block(blk, x, emb) if isinstance(blk, UNetBlock) else ref_conv(blk, x)
            skips.append(x)
    aux = tmp = None
    for name, blk in net.dec.items():
        if "aux_up" in name:
            aux = ref_conv(blk, aux)
        elif "aux_norm" in name:
            tmp = ref_gn(blk, x)
        elif "aux_conv" in name:
            tmp = ref_conv(blk, F.silu(tmp))
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != blk.in_channels:  # EDM's rule for "this block takes a skip"
                x = torch.cat([x, skips.pop()], dim=1)
            x = ref_block(blk, x, emb)
    if song:
        return aux
    return ref_conv(net.out_conv, F.silu(ref_gn(net.out_norm, x)))


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
@pytest.mark.parametrize("size", [(16, 16), (16, 32)])
def test_forward_matches_edm_reference(arch, size):
    net = _small(arch, num_classes=5, augment_dim=9, img_resolution=size).eval()
    _randomise(net)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, *size, generator=g)
    noise = torch.randn(3, generator=g)
    labels = torch.tensor([0, 4, 5])  # 5 = null
    aug = torch.randn(3, 9, generator=g)
    with torch.no_grad():
        out = net(x, noise, labels, aug)
        ref = ref_forward(net, x, noise, labels, aug)
    assert out.shape == (3, 3, *size)
    scale = ref.abs().max().item()
    assert scale > 1e-2
    assert (out.double() - ref).abs().max().item() < 2e-4 * max(scale, 1.0)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("updown", ["up", "down"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_block_matches_edm_reference(taps, updown, adaptive):
    torch.manual_seed(0)
    kw = dict(up=updown == "up", down=updown == "down", resample_filter=taps, adaptive_scale=adaptive,
              skip_scale=math.sqrt(0.5) if not adaptive else 1.0, resample_proj=not adaptive)
    blk = UNetBlock(32, 32, 24, attention=False, **kw).eval()
    attn = UNetBlock(32, 48, 24, attention=True, num_heads=None if adaptive else 1, channels_per_head=16,
                     adaptive_scale=adaptive, resample_filter=taps).eval()
    assert attn.num_heads == (3 if adaptive else 1)
    for b in (blk, attn):
        _randomise(b)
    x = torch.randn(2, 32, 8, 12)
    emb = torch.randn(2, 24)
    with torch.no_grad():
        h = blk(x, emb)
        assert h.shape == (2, 32, *((16, 24) if updown == "up" else (4, 6)))
        torch.testing.assert_close(h.double(), ref_block(blk, x.double(), emb.double()), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(attn(x, emb).double(), ref_block(attn, x.double(), emb.double()), rtol=1e-4, atol=1e-4)


def test_positional_embedding_closed_form():
    t = torch.tensor([0.0, 0.3, -2.5, 7.0])
    e = PositionalEmbedding(8, endpoint=True, sin_first=True)(t)
    for i, ti in enumerate(t.tolist()):
        for j in range(4):
            f = (1 / 10000) ** (j / 3)  # endpoint: the last frequency is exactly 1/max_positions
            assert e[i, j].item() == pytest.approx(math.sin(ti * f), abs=1e-6)
            assert e[i, 4 + j].item() == pytest.approx(math.cos(ti * f), abs=1e-6)
    e = PositionalEmbedding(8)(t)  # ADM: no endpoint, [cos | sin]
    assert e[2, 1].item() == pytest.approx(math.cos(-2.5 * (1 / 10000) ** (1 / 4)), abs=1e-6)
    assert e[2, 5].item() == pytest.approx(math.sin(-2.5 * (1 / 10000) ** (1 / 4)), abs=1e-6)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_shapes_labels_augment_nonsquare(arch):
    net = _small(arch, num_classes=10, augment_dim=9, num_blocks=1)
    assert (net.num_classes, net.null_label, net.img_resolution, net.in_channels) == (10, 10, 16, 3)
    for h, w in ((16, 16), (8, 24)):
        x = torch.randn(2, 3, h, w)
        assert net(x, torch.randn(2), torch.tensor([3, 10]), torch.randn(2, 9)).shape == (2, 3, h, w)
        assert net(x, torch.randn(2)).shape == (2, 3, h, w)  # labels None = null, augment None = zeros
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 3, 16, 10), torch.zeros(1))
    with pytest.raises(ValueError, match=r"\[B, 3"):
        net(torch.randn(1, 4, 16, 16), torch.zeros(1))
    out4 = _small(arch, out_channels=4)(torch.randn(1, 3, 16, 16), torch.zeros(1))
    assert out4.shape == (1, 4, 16, 16)


def test_attention_levels_follow_height():
    net = _small("ddpmpp", img_resolution=(8, 32))  # levels: 8x32, 4x16, 2x8 -> attention at 8 = level 0
    assert [k for k in net.enc if k.endswith("_block0")] == ["8x32_block0", "4x16_block0", "2x8_block0"]
    assert net.enc["8x32_block0"].num_heads == 1 and net.enc["4x16_block0"].num_heads == 0
    assert net.dec["8x32_block2"].num_heads == 1 and net.dec["8x32_block1"].num_heads == 0  # last block only
    assert net.dec["2x8_in0"].num_heads == 1  # the bottleneck always attends
    a = _small("adm", img_resolution=(16, 8), attn_resolutions=(8,))  # levels 16x8, 8x4, 4x2
    assert a.enc["8x4_block1"].num_heads == 1 and a.enc["16x8_block1"].num_heads == 0  # 32 ch: max(1, 32 // 64)
    assert all(a.dec[f"8x4_block{i}"].num_heads == 1 for i in range(3))  # ADM: every decoder block
    with pytest.raises(ValueError, match="divisible"):
        _small("ddpmpp", img_resolution=(10, 16))


def test_init_output_near_zero():
    x = torch.randn(4, 3, 16, 16)
    for arch in ("ddpmpp", "ncsnpp"):  # conv1 / proj / out conv: xavier x 1e-5
        net = _small(arch, num_classes=10)
        out = net(x, torch.randn(4), torch.tensor([0, 1, 2, 10]))
        assert 0 < out.abs().max().item() < 1e-3
    net = _small("adm", num_classes=10)  # ADM: exact zero init
    assert net(x, torch.randn(4), torch.tensor([0, 1, 2, 10])).abs().max().item() == 0.0


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_label_paths(arch):
    net = _small(arch, num_classes=10).eval()
    _randomise(net)
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    null = torch.full((2,), net.null_label)
    with torch.no_grad():
        out_null = net(x, noise, null)
        torch.testing.assert_close(net(x, noise), out_null, rtol=0, atol=0)  # None = all null
        assert (net(x, noise, torch.tensor([3, 3])) - out_null).abs().max() > 1e-3
        net.map_label.weight[10] += 1.0  # perturb only the null row: only the null path moves
        assert (net(x, noise, null) - out_null).abs().max() > 1e-3
        net.map_label.weight[3] += 1.0
        before = net(x, noise, null)
        torch.testing.assert_close(net(x, noise, null), before)
    # init: the null row starts at zero (EDM's bias / zero one-hot), class rows do not
    fresh = _small(arch, num_classes=10)
    assert fresh.map_label.weight[10].abs().max() == 0 and fresh.map_label.weight[:10].abs().max() > 0
    uncond = _small(arch)
    assert uncond.map_label is None and uncond.null_label == 0
    with torch.no_grad():
        torch.testing.assert_close(uncond(x, noise, torch.tensor([1, 7])), uncond(x, noise))


def test_augment_none_is_zeros_and_backward():
    net = _small("ddpmpp", num_classes=3, augment_dim=9, dropout=0.1).train()
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    torch.manual_seed(5)
    a = net(x, noise, torch.tensor([0, 3]))
    torch.manual_seed(5)
    b = net(x, noise, torch.tensor([0, 3]), torch.zeros(2, 9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())  # map_augment takes part even for None


def test_netspec_and_named_sizes():
    spec = NetSpec("raygen.nets.unet:unet", {"arch": "ddpmpp", "img_resolution": 16, "in_channels": 3,
                                             "model_channels": 16, "channel_mult": [1, 2]})
    net = spec.build()
    assert isinstance(net, SongUNet) and net.out_channels == 3
    with torch.device("meta"):
        n = ncsnpp(img_resolution=32, in_channels=3)
        assert n.map_noise.freqs.shape == (128,)  # channel_mult_noise 2 -> 256 Fourier channels
        assert "16x16_aux_residual" in n.enc and n.enc["16x16_aux_residual"].fused
        assert n.enc["16x16_down"].conv0.resample.taps == (1.0, 3.0, 3.0, 1.0)
        d = ddpmpp(img_resolution=32, in_channels=3)
        assert d.enc["16x16_down"].dropout == pytest.approx(0.13) and d.enc["16x16_block0"].num_heads == 1
        assert isinstance(adm(img_resolution=64, in_channels=3), DhariwalUNet)
    with pytest.raises(ValueError, match="unknown U-Net arch"):
        unet("ddpm", img_resolution=32, in_channels=3)


# ---------------------------------------------------------------------------------------------------
# parameter counts from the architecture, in closed form

def conv(k, cin, cout):
    return k * k * cin * cout + cout


def gn(c):
    return 2 * c


def block(cin, cout, emb, *, updown=False, attn=False, adaptive, resample_proj):
    n = gn(cin) + conv(3, cin, cout) + emb * cout * (2 if adaptive else 1) + cout * (2 if adaptive else 1)
    n += gn(cout) + conv(3, cout, cout)
    if cin != cout or (updown and resample_proj):
        n += conv(1, cin, cout)  # 1x1 skip projection (a bare resample has no weights)
    if attn:
        n += gn(cout) + conv(1, cout, 3 * cout) + conv(1, cout, cout)
    return n


def ddpmpp_cifar10_count(label_dim, augment_dim, edm=False):
    """DDPM++ at 32x32x3: 128 base channels, mult (2,2,2) -> 256 channels at 32/16/8, 4 blocks, attention
    at 16, embedding 512. Labels: EDM's Linear(label_dim, 128) with bias vs raygen's (label_dim + 1) rows."""
    base, c, emb, nb = 128, 256, 512, 4
    b = lambda cin, cout, **kw: block(cin, cout, emb, adaptive=False, resample_proj=True, **kw)  # noqa: E731
    n = (label_dim * base + base) if label_dim else 0  # same number either way: (n+1) rows == W + bias
    n += augment_dim * base + (base * emb + emb) + (emb * emb + emb)
    n += conv(3, 3, base)
    # encoder: level 32: 128->256, 3x 256->256; levels 16 (attn) and 8: down block + 4 blocks
    n += b(base, c) + 3 * b(c, c)
    n += b(c, c, updown=True) + 4 * b(c, c, attn=True)
    n += b(c, c, updown=True) + 4 * b(c, c)
    # decoder: level 8: in0 (attn) + in1 + 5 blocks 512->256; level 16: up + 5 blocks 512->256 (last attn);
    # level 32: up + 4 blocks 512->256 + the last 384->256 (skip from the 128-channel input conv)
    n += b(c, c, attn=True) + b(c, c) + 5 * b(2 * c, c)
    n += b(c, c, updown=True) + 4 * b(2 * c, c) + b(2 * c, c, attn=True)
    n += b(c, c, updown=True) + 4 * b(2 * c, c) + b(c + base, c)
    n += gn(c) + conv(3, c, 3)
    return n


def adm_imagenet64_count(label_dim, edm=False):
    """ADM at 64x64x3: 192 base, mult (1,2,3,4) -> 192/384/576/768 at 64/32/16/8, 3 blocks, attention at
    32/16/8 (heads of 64 channels do not change the count), embedding 768, adaptive (scale, shift)."""
    ch, emb, nb = [192, 384, 576, 768], 768, 3
    b = lambda cin, cout, **kw: block(cin, cout, emb, adaptive=True, resample_proj=False, **kw)  # noqa: E731
    n = 192 * emb + emb + emb * emb + emb
    n += label_dim * emb + (0 if edm else emb)  # EDM: bias-free Linear; raygen: + the null row
    n += conv(3, 3, ch[0])
    skips = [ch[0]]
    attn = [False, True, True, True]
    for lvl, c in enumerate(ch):
        cin = ch[lvl - 1] if lvl else ch[0]
        if lvl:
            n += b(cin, cin, updown=True)
            skips.append(cin)
        n += b(cin, c, attn=attn[lvl]) + (nb - 1) * b(c, c, attn=attn[lvl])
        skips += [c] * nb
    n += b(ch[3], ch[3], attn=True) + b(ch[3], ch[3])
    cur = ch[3]
    for lvl in (3, 2, 1, 0):
        if lvl < 3:
            n += b(cur, cur, updown=True)
        for _ in range(nb + 1):
            n += b(cur + skips.pop(), ch[lvl], attn=attn[lvl])
            cur = ch[lvl]
    assert not skips
    n += gn(cur) + conv(3, cur, 3)
    return n


def test_param_counts_full_size_closed_form():
    with torch.device("meta"):
        cond = ddpmpp(img_resolution=32, in_channels=3, num_classes=10, augment_dim=9)
        uncond = ddpmpp(img_resolution=32, in_channels=3)
        imnet = adm(img_resolution=64, in_channels=3, num_classes=1000)
    assert param_count(cond) == ddpmpp_cifar10_count(10, 9) == 55_735_299  # EDM: 55.73M, the same
    assert param_count(uncond) == ddpmpp_cifar10_count(0, 0) == 55_732_739
    assert param_count(imnet) == adm_imagenet64_count(1000) == 295_900_035
    assert adm_imagenet64_count(1000, edm=True) == 295_900_035 - 768  # EDM: 295.90M, no null row
