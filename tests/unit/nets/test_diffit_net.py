"""raygen.nets.diffit (DiffiT, arXiv 2312.02139) against references written from the paper's equations:
- TMSA (Eq. 3-6) in float64 with SEPARATE spatial and time projection matrices (W_qs, W_qt, ...) cut
  from the fused weights, softmax(q k^T / sqrt(d) + B) v by hand, B filled pair by pair from the table;
- the relative position bias as an explicit per-pair table lookup, with the check that the pair (j, i)
  reads the entry of the opposite offset; the same check run on a Music-Transformer "skew" bias must
  fail (its upper triangle wraps onto entries of other offsets);
- the masked SDPA call against the explicit softmax path (values and the table's gradient), and the
  fused CPU kernel accepting the mask;
- windows: a window covering the grid is global attention; tokens in different windows never
  influence each other (perturbation and gradient);
- the blocks (Eq. 7-10) against functional float64 transcriptions;
- the networks: shapes (learn_sigma, non-square), the null class, zero output at init, time entering
  only through TMSA, raygen's DDPM loss driving them, NetSpec; the DiffiT-XL/2 parameter count on the
  meta device against a closed-form sum.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from raygen.core.contracts import NetSpec
from raygen.methods.ddpm import DDPM, DDPMConfig
from raygen.nets.diffit import (DIFFIT_UNETS, TMSA, DiffiTBlock, DiffiTLatent, DiffiTResBlock, DiffiTUNet, DiffiT_XL_2,
                                diffit, diffit_unet, param_count, relative_position_index, window_shape)


@torch.no_grad()
def _randomise(module, seed=1, std=0.3):
    """Give every parameter (zero-initialised ones included) a random value so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _tmsa(dim=16, heads=2, temb=12, window=4, seed=0):
    torch.manual_seed(seed)
    m = TMSA(dim, heads, temb, window).double()
    _randomise(m, seed + 1)
    return m


def _coords(h, w):
    return [(i // w, i % w) for i in range(h * w)]


def _lookup(table, window):
    """The bias of offset (dy, dx) by the definition: table[(dy + w - 1) * (2w - 1) + (dx + w - 1)]."""
    return lambda dy, dx: table[(dy + window - 1) * (2 * window - 1) + (dx + window - 1)]


def _explicit_bias(table, window, h, w, wh, ww):
    """[heads, N, N] for an h x w grid split into wh x ww windows, pair by pair: the table entry of the
    pair's offset inside a window, -inf across windows."""
    look, cs = _lookup(table, window), _coords(h, w)
    n = h * w
    b = torch.full((table.shape[1], n, n), -math.inf, dtype=table.dtype)
    for i, (yi, xi) in enumerate(cs):
        for j, (yj, xj) in enumerate(cs):
            if (yi // wh, xi // ww) == (yj // wh, xj // ww):
                b[:, i, j] = look(yi - yj, xi - xj)
    return b


def _reference_tmsa(m, x, temb, hw):
    """Eq. 3-6 with separate projection matrices cut from the fused weights."""
    c, heads = m.dim, m.num_heads
    d = c // heads
    ws, bs = m.qkv.weight.detach(), m.qkv.bias.detach()
    wt, bt = m.qkv_temb.weight.detach(), m.qkv_temb.bias.detach()
    W_qs, W_ks, W_vs = ws[:c], ws[c:2 * c], ws[2 * c:]
    W_qt, W_kt, W_vt = wt[:c], wt[c:2 * c], wt[2 * c:]
    b_qs, b_ks, b_vs = bs[:c], bs[c:2 * c], bs[2 * c:]
    b_qt, b_kt, b_vt = bt[:c], bt[c:2 * c], bt[2 * c:]
    xt = temb[:, None, :]
    q = x @ W_qs.T + b_qs + xt @ W_qt.T + b_qt
    k = x @ W_ks.T + b_ks + xt @ W_kt.T + b_kt
    v = x @ W_vs.T + b_vs + xt @ W_vt.T + b_vt
    split = lambda u: u.view(u.shape[0], u.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    wh, ww = min(m.window_size, hw[0]), min(m.window_size, hw[1])
    bias = _explicit_bias(m.relative_position_bias_table.detach(), m.window_size, hw[0], hw[1], wh, ww)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], c)
    return out @ m.proj.weight.detach().T + m.proj.bias.detach()


# ---------------------------------------------------------------------------------------------------
# TMSA

@pytest.mark.parametrize("hw,window", [((4, 4), 4), ((4, 4), 8), ((8, 8), 4), ((4, 8), 4), ((2, 4), 2)])
def test_tmsa_matches_equations_float64(hw, window):
    m = _tmsa(window=window)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, hw[0] * hw[1], 16, generator=g, dtype=torch.float64)
    temb = torch.randn(3, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got, want = m(x, temb, hw), _reference_tmsa(m, x, temb, hw)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # the time token matters: another x_t gives another output
    assert (m(x, temb.flip(0), hw) - got).abs().max() > 1e-3


def _pairwise_mismatches(bias, look, coords):
    """Pairs (i, j) where bias[i, j] is not the entry of offset (dy, dx) = p_i - p_j, or bias[j, i] is
    not the entry of (-dy, -dx). A correct relative bias has none."""
    bad = []
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            dy, dx = yi - yj, xi - xj
            if bias[i, j] != look(dy, dx) or bias[j, i] != look(-dy, -dx):
                bad.append((i, j))
    return bad


def _skew_bias(e_rel):
    """The Music-Transformer "skew" (arXiv 1809.04281 Sec. 3.4.1) of a relative term whose column r is
    distance r - (N - 1) (N columns: distances -(N-1)..0, causal): pad a zero column on the left,
    reshape [N + 1, N], drop the first row. Correct on and below the diagonal only."""
    n = e_rel.shape[0]
    padded = F.pad(e_rel, (1, 0))
    return padded.reshape(n + 1, n)[1:]


def test_relative_bias_is_a_table_lookup_and_opposite_offsets_read_opposite_entries():
    m = _tmsa(window=4)
    table = m.relative_position_bias_table.detach()
    for wh, ww in [(4, 4), (2, 4), (4, 1)]:  # full window, and windows clamped to smaller grids
        bias = m.relative_bias(wh, ww)[0]
        assert bias.shape == (2, wh * ww, wh * ww)
        for h in range(2):
            look = _lookup(table[:, h], 4)
            assert _pairwise_mismatches(bias[h], look, _coords(wh, ww)) == []
    # opposite offsets are different learned entries, so B is not forced symmetric ...
    bias = m.relative_bias(4, 4)[0]
    assert not torch.equal(bias, bias.transpose(1, 2))
    # ... and the same check catches a causal skew. On a 1 x N row, give the skew the entries of the
    # causal offsets of the same table: column r is key-minus-query distance r - (N - 1), i.e. the
    # entry of offset p_i - p_j = (N - 1) - r. It is right on and below the diagonal, and wraps above
    n, look = 4, _lookup(table[:, 0], 4)
    e_rel = torch.stack([look(0, (n - 1) - r) for r in range(n)])
    skew = _skew_bias(e_rel.expand(n, n))
    assert all(skew[i, j] == look(0, i - j) for i in range(n) for j in range(i + 1))  # lower triangle right
    assert all(skew[i, j] != look(0, i - j) for i in range(n) for j in range(i + 1, n))  # upper wrong:
    assert all(skew[i, i + 1] == 0 for i in range(n - 1))  # +1 reads the zero pad,
    assert all(skew[i, i + k] == e_rel[k - 2] for k in range(2, n) for i in range(n - k))  # +k: distance k-N-1
    bad = _pairwise_mismatches(skew, look, _coords(1, n))
    assert sorted(bad) == [(i, j) for i in range(n) for j in range(n) if i != j]  # every off-diagonal pair
    ours = m.relative_bias(1, n)[0, 0]
    assert _pairwise_mismatches(ours, look, _coords(1, n)) == []


def test_relative_index_is_small_cached_and_never_in_the_state_dict():
    idx = relative_position_index(16, 16, 16)
    assert idx.dtype == torch.int32 and idx.shape == (256 * 256,)
    assert int(idx.max()) == 31 * 31 - 1 and int(idx.min()) == 0
    assert relative_position_index(16, 16, 16) is idx  # built once per window shape
    with torch.device("meta"):
        net = DiffiT_XL_2(input_size=64, in_channels=4, num_classes=1000)  # IN-512: 32 x 32 tokens
    params = dict(net.named_parameters())
    assert set(net.state_dict()) == set(params)  # no index (nor any other) buffer is saved
    assert params["blocks.0.attn.relative_position_bias_table"].shape == (63 * 63, 16)


def test_masked_sdpa_equals_explicit_softmax_path():
    m = _tmsa(window=4)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, 2, 16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bias = m.relative_bias(4, 4)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    fused.square().sum().backward()
    g_fused = m.relative_position_bias_table.grad.clone()
    m.relative_position_bias_table.grad = None
    explicit = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + m.relative_bias(4, 4), -1) @ v
    explicit.square().sum().backward()
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_fused, m.relative_position_bias_table.grad, atol=1e-6, rtol=0)
    assert g_fused.abs().max() > 1e-3
    # the [1, heads, n, n] float mask is accepted by the fused CPU kernel (inference, float32)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q32, k32, v32 = (u.float() for u in (q, k, v))
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=m.relative_bias(4, 4).float())
    torch.testing.assert_close(flash.double(), explicit.detach(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Windows

def test_window_covering_the_grid_is_global_attention():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 12, generator=g, dtype=torch.float64)
    for window in (8, 11):  # exactly the grid, and larger (clamped to it)
        m = _tmsa(window=window)
        assert window_shape((8, 8), window) == (8, 8)
        # every pair present in the explicit bias: one window, no -inf
        ref_bias = _explicit_bias(m.relative_position_bias_table.detach(), window, 8, 8, 8, 8)
        assert torch.isfinite(ref_bias).all()
        with torch.no_grad():
            torch.testing.assert_close(m(x, temb, (8, 8)), _reference_tmsa(m, x, temb, (8, 8)), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="does not split"):
        window_shape((12, 8), 8)


def test_tokens_in_different_windows_do_not_interact():
    m = _tmsa(window=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 12, generator=g, dtype=torch.float64)
    win = torch.tensor([(y // 4) * 2 + (xx // 4) for y, xx in _coords(8, 8)])  # window id of each token
    with torch.no_grad():
        base = m(x, temb, (8, 8))
        x2 = x.clone()
        x2[:, 9] += 1.0  # token (1, 1): window 0
        moved = (m(x2, temb, (8, 8)) - base).abs().amax(dim=(0, 2))
    assert torch.all(moved[win != 0] == 0)
    assert torch.all(moved[win == 0] > 0)
    # gradient: one output token of window 3 depends on the inputs of window 3 only
    xg = x.clone().requires_grad_(True)
    m(xg, temb, (8, 8))[:, 63].sum().backward()
    reach = xg.grad.abs().amax(dim=(0, 2))
    assert torch.all(reach[win != 3] == 0) and torch.all(reach[win == 3] > 0)


# ---------------------------------------------------------------------------------------------------
# Blocks

def test_diffit_block_and_resblock_match_equations():
    torch.manual_seed(0)
    rb = DiffiTResBlock(16, 2, 12, 4).double()
    _randomise(rb, 6, std=0.2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 12, generator=g, dtype=torch.float64)
    blk = rb.block

    def ref_block(tok):  # Eq. 7-8
        ln = lambda u: F.layer_norm(u, (16,), eps=1e-6)  # noqa: E731
        xh = _reference_tmsa(blk.attn, ln(tok), temb, (8, 8)) + tok
        hid = F.gelu(ln(xh) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias, approximate="tanh")
        return hid @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias + xh

    with torch.no_grad():
        # Eq. 9-10: x^ = Conv3x3(Swish(GN(x))), x = DiffiT-Block(x^, x_t) + x, one token per pixel
        xh = F.conv2d(F.silu(F.group_norm(x, 4, rb.norm.weight, rb.norm.bias, 1e-6)), rb.conv.weight, rb.conv.bias,
                      padding=1)
        tok = xh.flatten(2).transpose(1, 2)
        want = ref_block(tok).transpose(1, 2).reshape(2, 16, 8, 8) + x
        assert rb.norm.num_groups == 4
        torch.testing.assert_close(rb(x, temb), want, atol=1e-10, rtol=0)
        assert isinstance(blk, DiffiTBlock)
        torch.testing.assert_close(blk(tok, temb, (8, 8)), ref_block(tok), atol=1e-10, rtol=0)


def test_block_without_tmsa_adds_the_time_token_to_the_tokens():
    """The ablation's "TMSA off": x <- x + x_t W_t + b_t, then Eq. 7-8 with time-independent attention
    (the reference TMSA with its time part zero), and no time projection inside the attention."""
    torch.manual_seed(0)
    blk = DiffiTBlock(16, 2, 12, 4, tmsa=False).double()
    assert blk.attn.qkv_temb is None and "attn.qkv_temb.weight" not in blk.state_dict()
    assert torch.equal(blk.time_proj.weight, torch.zeros_like(blk.time_proj.weight))  # time_init "zero"
    _randomise(blk, 11, std=0.2)
    ref_attn = _tmsa(dim=16, heads=2, temb=12, window=4)
    ref_attn.load_state_dict({**blk.attn.state_dict(), "qkv_temb.weight": torch.zeros(48, 12, dtype=torch.float64),
                              "qkv_temb.bias": torch.zeros(48, dtype=torch.float64)})
    g = torch.Generator().manual_seed(12)
    tok = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 12, generator=g, dtype=torch.float64)
    ln = lambda u: F.layer_norm(u, (16,), eps=1e-6)  # noqa: E731
    with torch.no_grad():
        x = tok + (temb @ blk.time_proj.weight.T + blk.time_proj.bias)[:, None, :]
        xh = _reference_tmsa(ref_attn, ln(x), temb, (8, 8)) + x
        want = F.gelu(ln(xh) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias, approximate="tanh") @ blk.mlp.fc2.weight.T \
            + blk.mlp.fc2.bias + xh
        torch.testing.assert_close(blk(tok, temb, (8, 8)), want, atol=1e-10, rtol=0)
        # the attention itself ignores time: only the added token carries it
        torch.testing.assert_close(blk.attn(tok, temb, (8, 8)), blk.attn(tok, temb.flip(0), (8, 8)), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Networks

UNET_SMALL = dict(img_resolution=16, in_channels=3, num_classes=5, model_channels=16, channel_mult=(1, 2),
                  num_blocks=1, num_mid_blocks=1, window_size=4, channels_per_head=8)
LATENT_SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def _nets(**kw):
    torch.manual_seed(0)
    return [DiffiTUNet(**{**UNET_SMALL, **kw}), DiffiTLatent(**{**LATENT_SMALL, **kw})]


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_shapes_and_zero_output_at_init(learn_sigma):
    t = torch.tensor([0, 999])
    for net in _nets(learn_sigma=learn_sigma):
        c = net.in_channels
        s = 16 if isinstance(net, DiffiTUNet) else 8
        x = torch.randn(2, c, s, s)
        out = net(x, t, torch.tensor([0, net.null_class]))
        assert out.shape == (2, c * (2 if learn_sigma else 1), s, s) and net.out_channels == out.shape[1]
        assert torch.equal(out, torch.zeros_like(out))  # zero-initialised head / final layer
    unet = _nets()[0]
    assert unet(torch.randn(2, 3, 16, 32), t).shape == (2, 3, 16, 32)  # non-square
    with pytest.raises(ValueError, match="divisible"):
        unet(torch.randn(1, 3, 16, 18), t[:1])


def test_labels_null_class_and_time_enter_through_tmsa():
    for net in _nets():
        _randomise(net, 8, std=0.1)
        net.train()  # the net never drops labels itself, even in train mode
        s = 16 if isinstance(net, DiffiTUNet) else 8
        x, t = torch.randn(3, net.in_channels, s, s), torch.tensor([5, 500, 900])
        null = torch.full((3,), net.null_class)
        with torch.no_grad():
            out_null = net(x, t, null)
            torch.testing.assert_close(net(x, t, None), out_null, atol=0, rtol=0)  # None = null class
            torch.testing.assert_close(net(x, t, null), out_null, atol=0, rtol=0)  # deterministic
            assert (net(x, t, torch.tensor([0, 1, 2])) - out_null).abs().max() > 1e-4
            assert (net(x, t.flip(0), null) - out_null).abs().max() > 1e-4
            # DiffiT conditions only through TMSA's time projection: without it, t and y do nothing
            for mod in net.modules():
                if isinstance(mod, TMSA):
                    mod.qkv_temb.weight.zero_()
                    mod.qkv_temb.bias.zero_()
            base = net(x, t, null)
            torch.testing.assert_close(net(x, t.flip(0), torch.tensor([0, 1, 2])), base, atol=0, rtol=0)


def test_nets_without_tmsa_condition_through_the_added_token():
    """tmsa=False everywhere: no TMSA time projection in the state dict, one width-sized time projection a
    block (3x fewer time parameters), and t and y still reach the output (through `time_proj` alone)."""
    for on, off in zip(_nets(), _nets(tmsa=False)):
        keys_on, keys_off = set(on.state_dict()), set(off.state_dict())
        assert any(k.endswith("attn.qkv_temb.weight") for k in keys_on)
        assert not any("qkv_temb" in k for k in keys_off) and any(k.endswith("time_proj.weight") for k in keys_off)
        per_block = lambda net, name: [p.numel() for n, p in net.named_parameters() if name in n]  # noqa: E731
        assert [3 * n for n in per_block(off, "time_proj.weight")] == per_block(on, "qkv_temb.weight")
        _randomise(off, 13, std=0.1)
        s = 16 if isinstance(off, DiffiTUNet) else 8
        x, t = torch.randn(3, off.in_channels, s, s), torch.tensor([5, 500, 900])
        null = torch.full((3,), off.null_class)
        with torch.no_grad():
            base = off(x, t, null)
            assert (off(x, t.flip(0), null) - base).abs().max() > 1e-4
            assert (off(x, t, torch.tensor([0, 1, 2])) - base).abs().max() > 1e-4
            for mod in off.modules():
                if isinstance(mod, DiffiTBlock):
                    mod.time_proj.weight.zero_()
                    mod.time_proj.bias.zero_()
            torch.testing.assert_close(off(x, t.flip(0), torch.tensor([0, 1, 2])), off(x, t, null), atol=0, rtol=0)


def test_ddpm_loss_trains_every_parameter():
    """raygen's DDPM calls net(x_t, t, labels); the zero head, then the zero time projection, open
    over two steps (as adaLN-Zero), after which every parameter has gradient."""
    method = DDPM(DDPMConfig(), num_classes=5)
    for net in _nets():
        s = 16 if isinstance(net, DiffiTUNet) else 8
        g = torch.Generator().manual_seed(9)
        batch = {"image": torch.randn(8, net.in_channels, s, s, generator=g), "label": torch.arange(8) % 5}
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = method.loss(net, batch, torch.Generator().manual_seed(10)).mean()
            loss.backward()
            losses.append(loss.item())
            opt.step()
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert losses[-1] < losses[0]


def _closed_form_latent(D, depth, heads, patch, cin, cout, classes, grid, mlp_ratio=4, freq=256):
    """Parameters of latent DiffiT from its architecture (Linear: in*out + out)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    hid = int(D * mlp_ratio)
    block = lin(D, 3 * D) + lin(D, 3 * D) + lin(D, D) + (2 * grid - 1) ** 2 * heads + lin(D, hid) + lin(hid, D)
    embed = cin * patch * patch * D + D
    temb = lin(freq, D) + lin(D, D)
    label = (classes + 1) * D  # the null class row
    final = lin(D, patch * patch * cout)
    return depth * block + embed + temb + label + final


def test_diffit_xl2_parameter_count_closed_form():
    with torch.device("meta"):
        net = DiffiT_XL_2(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    want = _closed_form_latent(1152, 28, 16, 2, 4, 8, 1000, 16)
    assert param_count(net) == want == 561_035_232  # the public release: ~561M (its frozen pos_embed
    # Parameter adds 256 * 1152 = 294,912 more when counted: 561,330,144)
    assert net.window_size == net.grid == 16 and net.out_channels == 8
    assert len(net.blocks) == 28 and net.blocks[0].attn.num_heads == 16


def test_presets_netspec_and_names():
    spec = NetSpec("raygen.nets.diffit:diffit", {"name": "DiffiT-T/2", "input_size": 8, "in_channels": 4,
                                                 "num_classes": 10})
    net = NetSpec.from_dict(spec.to_dict()).build()
    assert isinstance(net, DiffiTLatent) and net.grid == 4 and len(net.blocks) == 4
    spec = NetSpec("raygen.nets.diffit:diffit_unet", {"arch": "digits", "num_classes": 10})
    digits = spec.build()
    assert isinstance(digits, DiffiTUNet) and 500_000 <= param_count(digits) <= 1_000_000
    assert digits(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 10])).shape == (2, 1, 16, 16)
    with torch.device("meta"):
        cifar = diffit_unet("cifar10", num_classes=10)
        assert cifar.img_size == (32, 32) and cifar.window_size == 8 and cifar.levels == 4
        assert isinstance(diffit_unet("imagenet64"), DiffiTUNet)
    assert set(DIFFIT_UNETS) == {"cifar10", "imagenet64", "digits"}
    with pytest.raises(ValueError, match="DiffiT-XL/2"):
        diffit("DiffiT-Q/3")
    with pytest.raises(ValueError, match="unknown DiffiT U-Net preset"):
        diffit_unet("cifar100")
