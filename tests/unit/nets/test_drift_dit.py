"""raygen.nets.drift_dit: the drifting generator (docs/methods/drifting.md) against closed forms written here in
float64 (RoPE as complex rotation, RMSNorm, attention), plus zero-init, shape, conditioning, style-RNG and
size checks. No Ray."""
import math

import pytest
import torch

from raygen.nets.drift_dit import (
    DRIFT_DIT_SIZES, STYLE_TOKENS, STYLE_VOCAB, Attention, DriftDiT, DriftDiT_B_2, DriftDiT_L_16, DriftDiT_T_2,
    FP32AdaLN, RMSNorm, StyleEmbedder, apply_rope, draw_style, drift_dit, rms_normalize, rope_tables, swiglu_hidden,
)

TINY = dict(hidden_size=32, depth=2, num_heads=2)


def _inputs(net: DriftDiT, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.in_channels, net.input_size, net.input_size, generator=g)
    y = torch.randint(0, net.num_classes, (n,), generator=g)
    w = 1 + 3 * torch.rand(n, generator=g)
    return x, y, w, draw_style(n, g)


@pytest.mark.parametrize("channels,size,patch", [(1, 16, 2), (4, 32, 2), (3, 32, 4), (3, 32, 16), (2, 8, 8)])
def test_zero_output_at_init_shapes_and_cond_tokens_dropped(channels, size, patch):
    net = drift_dit(f"DriftDiT-T/{patch}", size, channels, 7, **TINY)
    x, y, w, s = _inputs(net, 3)
    seen = {}
    net.final_layer.linear.register_forward_hook(lambda m, i, o: seen.update(final=o.shape))
    out = net(x, y, w, s)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-init adaLN + final linear
    # the final layer sees exactly the H*W/p^2 patch tokens (the 16 in-context tokens were dropped)
    assert seen["final"] == (3, (size // patch) ** 2, patch * patch * channels)
    assert net.rope(x.device)[0].shape[0] == net.cond_tokens + (size // patch) ** 2  # RoPE spans all tokens
    torch.testing.assert_close(net.unpatchify(net.patchify(x)), x, rtol=0, atol=0)
    # patchify takes row-major p x p patches: the first token is the top-left patch
    assert torch.equal(net.patchify(x)[:, 0].view(3, patch, patch, channels), x[:, :, :patch, :patch].permute(0, 2, 3, 1))


def test_output_depends_on_labels_omega_style_after_training():
    torch.manual_seed(0)
    net = DriftDiT_T_2(input_size=8, in_channels=2, num_classes=5, **TINY)
    x, y, w, s = _inputs(net, 6)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)

    def variants():
        with torch.no_grad():
            base = net(x, y, w, s)
            assert torch.equal(base, net(x, y, w, s))  # deterministic: a difference below is real
            return base, [net(x, (y + 1) % 5, w, s), net(x, y, w + 1.0, s), net(x, y, w, (s + 1) % STYLE_VOCAB)]

    def step():
        opt.zero_grad()
        (net(x, y, w, s) - target).square().mean().backward()
        opt.step()

    step()  # adaLN-Zero + zero final layer: the first step moves only the final linear ...
    base, changed = variants()
    assert base.abs().max() > 0 and all(torch.equal(base, c) for c in changed)  # ... so no conditioning yet
    for _ in range(3):
        step()
    base, changed = variants()
    for c, name in zip(changed, ["labels", "omega", "style"]):
        assert (c - base).abs().max() > 1e-6, f"output does not depend on {name}"
    for name, p in net.named_parameters():  # every parameter learns once the gates are open
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_draw_style_uses_only_the_given_generator():
    net = DriftDiT_T_2(input_size=8, in_channels=1, num_classes=3, **TINY)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = draw_style(500, torch.Generator().manual_seed(7))
    b = draw_style(500, torch.Generator().manual_seed(7))
    c = draw_style(500, torch.Generator().manual_seed(8))
    x, y, w, s = _inputs(net, 4)
    net(x, y, w, s)  # the forward draws nothing either (a forward that called torch.randint would not repeat)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (500, STYLE_TOKENS) == (500, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < STYLE_VOCAB == 64
    assert len(a.unique()) == 64  # covers the whole range
    assert draw_style(3, torch.Generator().manual_seed(0), device="meta").device.type == "meta"


def test_each_style_position_has_its_own_table():
    emb = StyleEmbedder(8)
    with torch.no_grad():
        emb.embedding.weight.normal_()
    style = torch.randint(0, 64, (5, 32), generator=torch.Generator().manual_seed(0))
    want = sum(emb.embedding.weight[i * 64 + style[:, i]] for i in range(32))
    torch.testing.assert_close(emb(style), want)
    # the same indices in swapped positions: equal under one shared codebook (as in an earlier port), not here
    swapped = style.clone()
    swapped[:, [0, 1]] = style[:, [1, 0]]
    assert (style[:, 0] != style[:, 1]).any()
    assert (emb(style) - emb(swapped)).abs().max() > 1e-3
    same_idx = torch.zeros(1, 32, dtype=torch.long)
    assert not torch.allclose(emb.embedding.weight[0], emb.embedding.weight[64])  # index 0 at positions 0, 1
    with pytest.raises(ValueError):
        emb(same_idx[:, :31])


def _rope_reference(x: torch.Tensor, base: float = 1e4) -> torch.Tensor:
    """Rotate-half RoPE as complex rotation in float64: pair (x_j, x_{j+d/2}) is the complex number
    x_j + i x_{j+d/2}, multiplied by exp(i * pos * base^(-2j/d)); x [..., T, d], positions 0..T-1."""
    x = x.double()
    t, d = x.shape[-2:]
    half = d // 2
    z = torch.complex(x[..., :half], x[..., half:])
    theta = base ** (-2 * torch.arange(half, dtype=torch.float64) / d)
    z = z * torch.polar(torch.ones(t, half, dtype=torch.float64), torch.arange(t, dtype=torch.float64)[:, None] * theta)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_complex_rotation_reference():
    g = torch.Generator().manual_seed(0)
    for t, d in [(80, 32), (272, 64), (5, 2)]:
        x = torch.randn(3, t, d, generator=g, dtype=torch.float64)
        cos, sin = rope_tables(d, t, dtype=torch.float64)
        torch.testing.assert_close(apply_rope(x, cos, sin), _rope_reference(x), atol=1e-12, rtol=0)
        cos32, sin32 = rope_tables(d, t)  # the float32 tables the model caches
        torch.testing.assert_close(apply_rope(x.float(), cos32, sin32).double(), _rope_reference(x), atol=1e-5, rtol=0)
        scale = torch.rand(d, generator=g, dtype=torch.float64) + 0.5  # the QK-norm scale folded into the tables
        torch.testing.assert_close(apply_rope(x, cos, sin, scale), _rope_reference(x * scale), atol=1e-12, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    net = DriftDiT_T_2(input_size=16, in_channels=1, num_classes=3, **TINY)
    cos, sin = (a[:, 0, 0] for a in net.rope("cpu"))  # the model's cached tables, [80, head_dim]
    t, d = cos.shape
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)

    def score(m, n):
        qs, ks = torch.zeros(t, d), torch.zeros(t, d)
        qs[m], ks[n] = q, k
        return (apply_rope(qs, cos, sin)[m] * apply_rope(ks, cos, sin)[n]).sum()

    for m, n, shift in [(3, 10, 20), (0, 79, 0), (40, 2, 37), (15, 16, 60)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-4, rtol=1e-4)
    assert abs(score(3, 10) - score(3, 11)) > 1e-3  # but they do depend on it


def _rms64(x, weight=None, eps=1e-6):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def _attention_reference(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """qkv (+bias) -> per-head RMSNorm of q and k with their scales -> complex-rotation RoPE over positions
    0..T-1 -> softmax(q k^T / sqrt(d)) v -> proj, all float64."""
    b, t, d = x.shape
    heads, h = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(b, t, 3, heads, h).unbind(2)
    q, k = _rms64(q, attn.qk_scale[0]), _rms64(k, attn.qk_scale[1])
    q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # [b, heads, t, h]
    q, k = _rope_reference(q), _rope_reference(k)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h), dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(b, t, d))


def test_attention_matches_float64_reference():
    torch.manual_seed(0)
    attn = Attention(16, 2).double()
    with torch.no_grad():
        attn.qk_scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    cos, sin = rope_tables(8, 20, dtype=torch.float64)
    got = attn(x, cos[:, None, None], sin[:, None, None])
    torch.testing.assert_close(got, _attention_reference(attn, x), atol=1e-10, rtol=1e-10)


@torch.no_grad()
def _forward_reference(net: DriftDiT, x, y, w, s):
    """The documented generator written out plainly (float64, loops over patches and blocks)."""
    b, c, size, _ = x.shape
    p, g, dim, nc = net.patch_size, net.grid, net.hidden_size, net.cond_tokens
    style_w = net.style_embedder.embedding.weight
    cond = (net.y_embedder.embedding.weight[y] + sum(style_w[i * 64 + s[:, i]] for i in range(32))
            + 0.02 * _rms64(net.omega_embedder(w), net.omega_norm.weight))
    patches = torch.stack([x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(b, -1)
                           for i in range(g) for j in range(g)], 1)
    h = torch.cat([net.cond_proj(cond)[:, None] + net.cls_embed, net.patch_embed(patches) + net.pos_embed], 1)
    mods = torch.nn.functional.linear(torch.nn.functional.silu(cond), net.adaln.linear.weight, net.adaln.linear.bias)
    for i, blk in enumerate(net.blocks):
        sh1, sc1, g1, sh2, sc2, g2 = mods[:, 6 * i * dim:6 * (i + 1) * dim, None].transpose(1, 2).chunk(6, -1)
        h = h + g1 * _attention_reference(blk.attn, _rms64(h, blk.norm1.weight) * (1 + sc1) + sh1)
        a, gate = blk.mlp.w12(_rms64(h, blk.norm2.weight) * (1 + sc2) + sh2).chunk(2, -1)
        h = h + g2 * blk.mlp.w3(torch.nn.functional.silu(a) * gate)
    shf, scf = mods[:, -2 * dim:, None].transpose(1, 2).chunk(2, -1)
    out = net.final_layer.linear(_rms64(h[:, nc:], net.final_layer.norm.weight) * (1 + scf) + shf)
    img = torch.zeros_like(x)
    for n in range(g * g):
        i, j = divmod(n, g)
        img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = out[:, n].view(b, p, p, c).permute(0, 3, 1, 2)
    return img


@pytest.mark.parametrize("channels,size,patch", [(1, 8, 2), (3, 16, 4)])
def test_forward_matches_float64_reference(channels, size, patch):
    torch.manual_seed(0)
    net = drift_dit(f"DriftDiT-T/{patch}", size, channels, 5, hidden_size=32, depth=2, num_heads=2, cond_tokens=3).double()
    with torch.no_grad():
        for name, prm in net.named_parameters():  # leave the zero init: every term must contribute
            prm.add_(torch.randn_like(prm) * (0.02 if "style" in name or "y_embedder" in name else 0.2))
    x, y, w, s = _inputs(net, 3)
    x, w = x.double(), w.double()
    got, want = net(x, y, w, s), _forward_reference(net, x, y, w, s)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_rmsnorm_matches_float64_closed_form_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(4, 5, 24, generator=g) * 3
    xd = x.double()
    want = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, atol=1e-5, rtol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    shift, scale1 = torch.randn(4, 1, 24, generator=g), torch.randn(4, 1, 24, generator=g)
    torch.testing.assert_close(norm.modulate(x, shift, scale1).double(), shift.double() + want * scale1.double(),
                               atol=1e-5, rtol=1e-5)
    # the hand-written backward
    xg = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: rms_normalize(a, 1e-6), (xg,))
    assert torch.autograd.gradcheck(lambda a: rms_normalize(a, 1e-6), (torch.full((2, 4), 1e-2, dtype=torch.float64,
                                                                                   requires_grad=True),))


def test_swiglu_hidden_rule():
    assert swiglu_hidden(768) == 2048  # 2/3 * 4 * 768 exactly
    assert swiglu_hidden(1024) == 2752  # 2730.67 -> 2730 -> up to a multiple of 32
    assert swiglu_hidden(64) == 192 and swiglu_hidden(100) == 288  # 170 -> 192, 266 -> 288
    net = DriftDiT_T_2(input_size=8, in_channels=1, num_classes=2, hidden_size=96, depth=1, num_heads=2)
    assert net.blocks[0].mlp.w12.out_features == 2 * 256 and net.blocks[0].mlp.w3.in_features == 256


def test_param_counts_of_b2_and_l2_match_spec_estimates():
    with torch.device("meta"):
        b2 = DriftDiT_B_2(input_size=32, in_channels=4, num_classes=1000)
        l2 = drift_dit("DriftDiT-L/2", 32, 4, 1000)
    assert next(b2.parameters()).device.type == "meta"
    nb, nl = (sum(p.numel() for p in m.parameters()) for m in (b2, l2))
    assert abs(nb / 133e6 - 1) < 0.01, nb  # spec: ~133M
    assert abs(nl / 463e6 - 1) < 0.01, nl  # spec: ~463M
    assert (b2.hidden_size, len(b2.blocks), b2.num_heads) == (768, 12, 12)
    assert (l2.hidden_size, len(l2.blocks), l2.num_heads) == (1024, 24, 16)


def test_factory_names_and_overrides():
    with pytest.raises(ValueError, match=r"DriftDiT-T/2.*DriftDiT-L/16"):
        drift_dit("DriftDiT-Q/2")
    with pytest.raises(ValueError, match="DriftDiT-B/2"):
        drift_dit("DriftDiT-B/3")
    with torch.device("meta"):
        pix = DriftDiT_L_16(input_size=256, in_channels=3, num_classes=1000, depth=1)
    assert pix.patch_size == 16 and pix.num_patches == 256 and pix.in_channels == 3 and len(pix.blocks) == 1
    net = drift_dit("DriftDiT-T/4", 16, 1, 10, cond_tokens=4)
    assert net.cond_tokens == 4 and net.cls_embed.shape == (4, DRIFT_DIT_SIZES["T"]["hidden_size"])
    with pytest.raises(ValueError):
        drift_dit("DriftDiT-T/4", 10, 1, 10)  # 10 is not divisible by the patch


def test_modulations_stay_fp32_under_autocast():
    net = DriftDiT_T_2(input_size=8, in_channels=1, num_classes=3, **TINY)
    with torch.no_grad():
        net.adaln.linear.weight.normal_()
    assert isinstance(net.adaln, FP32AdaLN)
    x, y, w, s = _inputs(net, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = net.condition(y, w, s)
        blocks, final = net.adaln(cond.bfloat16())
        out = net(x, y, w, s)
    assert all(m.dtype == torch.float32 for m in blocks) and final.dtype == torch.float32
    ref = torch.nn.functional.linear(torch.nn.functional.silu(cond.bfloat16().double()), net.adaln.linear.weight.double(),
                                     net.adaln.linear.bias.double()) + net.adaln.scale_offset.double()
    torch.testing.assert_close(torch.cat(blocks + [final], 1).double(), ref, atol=1e-5, rtol=1e-5)
    assert out.shape == x.shape and torch.isfinite(out).all()
