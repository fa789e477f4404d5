"""raygen.nets.mae: the latent-MAE feature encoder of drifting generators (docs/methods/drifting.md).

Features are checked against the encoder's own maps, captured with forward hooks, and a float64 numpy
computation of every statistic; the key set against the documented list; masking, the masked MSE, a short
training run that has to beat the best context-free prediction, and gradients to the input.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raygen.nets.mae import (
    MAE_SIZES, LatentMAE, LatentMAE_W256, count_params, group_norm, latent_mae, map_features, num_groups,
)

# the feature maps: conv1, layer1..4 (after the stage GN), every 2nd block output
SPEC_MAPS = ["conv1", "layer1", "layer2", "layer3", "layer4",
             "layer1_blk2", "layer2_blk2", "layer2_blk4", "layer3_blk2", "layer3_blk4", "layer3_blk6", "layer4_blk2"]
# 16x16 digits: conv1 and layer1 16^2, layer2 8^2, layer3 4^2, layer4 2^2
TINY = dict(in_channels=1, width=16, input_size=16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These nets are tiny: on a shared 2-core machine an intra-op thread pool of 2 measured 7x slower than 1
    (38 s vs 5 s for the training test) whenever another process held the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LatentMAE(**TINY).eval()


def _hooked_maps(model: LatentMAE, x: torch.Tensor) -> tuple[dict, dict]:
    """(every named map, captured from the module that produces it while `features` runs; the features)."""
    enc = model.encoder
    modules = {"conv1": enc.stem}
    for i, stage in enumerate(enc.stages):
        modules[f"layer{i + 1}"] = stage.norm
        for j, block in enumerate(stage.blocks):
            modules[f"layer{i + 1}_blk{j + 1}"] = block
    maps, handles = {}, []
    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(lambda m, i, o, name=name: maps.__setitem__(name, o.detach().clone())))
    try:
        feats = model.features(x)
    finally:
        for h in handles:
            h.remove()
    return maps, feats


def _np_stats(h: np.ndarray, patch_sizes=(2, 4)) -> dict[str, np.ndarray]:
    """float64 reference for one map [N,C,H,W] -> {suffix: [N,L,C]}."""
    n, c, hh, ww = h.shape
    tokens = h.transpose(0, 2, 3, 1).reshape(n, hh * ww, c)
    out = {"": tokens, "_mean": tokens.mean(1, keepdims=True), "_std": np.sqrt(tokens.var(1, keepdims=True) + 1e-6)}
    for p in patch_sizes:
        if p > hh:
            continue
        # [N,C,H/p,p,W/p,p] -> [N, H/p, W/p, C, p*p]
        patches = h.reshape(n, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, hh // p, ww // p, c, p * p)
        out[f"_p{p}_mean"] = patches.mean(-1).reshape(n, -1, c)
        out[f"_p{p}_std"] = np.sqrt(patches.var(-1) + 1e-6).reshape(n, -1, c)
    return out


def test_group_norm_groups():
    cases = [(1, 1), (7, 7), (16, 16), (32, 32), (48, 24), (64, 32), (96, 32), (100, 25), (640, 32), (2048, 32),
             (5120, 32)]
    for c, g in cases:
        assert num_groups(c) == g, c
        assert group_norm(c).num_groups == g and group_norm(c).num_channels == c
    assert num_groups(62) == 31 and num_groups(66) == 22


def test_feature_keys_and_shapes(tiny):
    x = torch.randn(3, 1, 16, 16)
    feats = tiny.features(x)
    sizes = {"conv1": 16, "layer1": 16, "layer2": 8, "layer3": 4, "layer4": 2}
    widths = {"conv1": 16, "layer1": 16, "layer2": 32, "layer3": 64, "layer4": 128}
    expected = {"x_norm": (3, 1, 1), "x_global": (3, 1, 256)}
    for m in SPEC_MAPS:
        stage = m.split("_")[0]
        s, c = sizes[stage], widths[stage]
        expected.update({m: (3, s * s, c), f"{m}_mean": (3, 1, c), f"{m}_std": (3, 1, c)})
        for p in (2, 4):
            if p <= s:  # layer4 (2x2) has no 4x4 patches
                expected[f"{m}_p{p}_mean"] = expected[f"{m}_p{p}_std"] = (3, s * s // (p * p), c)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    assert len(feats) == 12 * 7 - 2 * 2 + 2 == 82
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in feats.values())
    # the data-free listing has the same keys, in the same (deterministic) order, with the same shapes
    listing = tiny.feature_keys()
    assert list(listing) == list(feats) == list(tiny.features(x))
    assert all(tuple(feats[k].shape[1:]) == shape for k, shape in listing.items())
    assert list(feats)[:2] == ["x_norm", "x_global"]
    # documented total for 32x32x4 latents: 86 keys (every map keeps its 4x4 patches)
    assert len(LatentMAE(in_channels=4, width=8, input_size=32).feature_keys()) == 86
    assert "x_norm" not in tiny.features(x, include_input=False)


def test_features_equal_maps_and_float64_stats(tiny):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=g) * 1.5 + 0.3
    x[3] = 0  # x_norm's eps shows: sqrt(0 + 1e-6) = 1e-3
    maps, feats = _hooked_maps(tiny, x)
    for m in SPEC_MAPS:
        ref = _np_stats(maps[m].double().numpy())
        for suffix, want in ref.items():
            got = feats[m + suffix].detach().double().numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=m + suffix)
        # the per-location key is the map itself, locations row-major
        assert torch.equal(feats[m], maps[m].flatten(2).transpose(1, 2))
    xd = x.double().numpy()
    x_norm = np.sqrt((xd ** 2).mean(axis=(2, 3)) + 1e-6)[:, None, :]
    np.testing.assert_allclose(feats["x_norm"].detach().numpy(), x_norm, rtol=1e-6)
    assert feats["x_norm"][3].item() == pytest.approx(1e-3)
    assert torch.equal(feats["x_global"], x.reshape(4, 1, 256))


def test_map_statistics_gradients_match_direct_formula():
    """map_features combines coarse statistics from finer cells and detaches the centring means; in float64
    its values and input gradients must equal the textbook per-patch var_mean on a rectangular 8x16 map."""
    g = torch.Generator().manual_seed(5)
    h = (torch.randn(2, 3, 8, 16, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    got = map_features(h, "m", patch_sizes=(4, 2, 8))
    want = {"m": h.flatten(2).transpose(1, 2)}
    var, mean = torch.var_mean(h.flatten(2), dim=2, correction=0)
    want["m_mean"], want["m_std"] = mean[:, None], torch.sqrt(var + 1e-6)[:, None]
    for p in (4, 2, 8):
        patches = h.reshape(2, 3, 8 // p, p, 16 // p, p).permute(0, 2, 4, 1, 3, 5).reshape(2, -1, 3, p * p)
        var, mean = torch.var_mean(patches, dim=3, correction=0)
        want[f"m_p{p}_mean"], want[f"m_p{p}_std"] = mean, torch.sqrt(var + 1e-6)
    assert list(got) == ["m", "m_mean", "m_std", "m_p4_mean", "m_p4_std", "m_p2_mean", "m_p2_std",
                         "m_p8_mean", "m_p8_std"]
    assert got.keys() == want.keys()
    weights = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in want.items()}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
        (g_got,) = torch.autograd.grad((got[k] * weights[k]).sum(), h, retain_graph=True)
        (g_want,) = torch.autograd.grad((want[k] * weights[k]).sum(), h, retain_graph=True)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12, msg=k)


def test_stage_outputs_are_after_the_extra_group_norm(tiny):
    x = torch.randn(8, 1, 16, 16)
    maps, feats = _hooked_maps(tiny, x)
    for i, depth in enumerate(tiny.layers):
        name = f"layer{i + 1}"
        last_block = maps[f"{name}_blk{depth}"]
        c = last_block.shape[1]
        assert torch.allclose(maps[name], F.group_norm(last_block, num_groups(c), eps=1e-5), atol=1e-5)
        # affine is the identity at init, so each (sample, group) is normalised ...
        grouped = feats[name].transpose(1, 2).reshape(8, num_groups(c), -1)
        assert grouped.mean(-1).abs().max() < 1e-4
        assert (grouped.var(-1, unbiased=False) - 1).abs().max() < 1e-2
        # ... while the block output before it is not (post-ReLU: nonnegative, mean > 0)
        assert last_block.min() >= 0 and last_block.reshape(8, num_groups(c), -1).mean(-1).min() > 0.05


def test_layer_selection_and_non_default_stage_depths(tiny):
    x = torch.randn(2, 1, 16, 16)
    full = tiny.features(x)
    sub = tiny.features(x, layers=["layer2", "conv1"], patch_sizes=(2,), include_input=False)
    assert list(sub) == ["conv1", "conv1_mean", "conv1_std", "conv1_p2_mean", "conv1_p2_std",
                         "layer2", "layer2_mean", "layer2_std", "layer2_p2_mean", "layer2_p2_std"]
    for k, v in sub.items():
        assert torch.allclose(v, full[k], atol=1e-6), k
    # the encoder stops after the deepest selected stage
    ran = []
    handles = [b.register_forward_pre_hook(lambda *a, i=i: ran.append(i))
               for i, stage in enumerate(tiny.encoder.stages) for b in stage.blocks]
    try:
        tiny.features(x, layers=["layer2"])
    finally:
        for h in handles:
            h.remove()
    assert sorted(set(ran)) == [0, 1]
    with pytest.raises(ValueError, match="unknown feature maps"):
        tiny.features(x, layers=["layer5"])
    # a non-default stage config: every 2nd block of each stage
    m = LatentMAE(in_channels=1, width=8, layers=(1, 2, 5, 2), input_size=16)
    assert m.map_names() == ["conv1", "layer1", "layer2_blk2", "layer2", "layer3_blk2", "layer3_blk4", "layer3",
                             "layer4_blk2", "layer4"]
    assert list(m.features(x)) == list(m.feature_keys())


def test_mask_counts_alignment_and_rng():
    m = LatentMAE(in_channels=2, width=8, input_size=16, mask_ratio=0.45)  # 64 patches -> round(28.8) = 29
    x = torch.randn(5, 2, 16, 16)
    state = torch.get_rng_state()
    mask = m.mask(x, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert mask.shape == (5, 1, 16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
    patches = mask.reshape(5, 8, 2, 8, 2)
    per_patch = patches.amax(dim=(2, 4))
    assert torch.equal(patches.amin(dim=(2, 4)), per_patch)  # whole 2x2 patches, aligned to the grid
    assert per_patch.sum(dim=(1, 2)).tolist() == [29] * 5
    assert not torch.equal(per_patch[0], per_patch[1])  # drawn per sample
    assert torch.equal(mask, m.mask(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(mask, m.mask(x, torch.Generator().manual_seed(8)))
    assert LatentMAE(in_channels=1, width=8, input_size=16).num_masked == 32


def test_loss_is_masked_mse_of_the_reconstruction():
    torch.manual_seed(0)
    m = LatentMAE(in_channels=2, width=8, layers=(1, 1, 1, 1), input_size=16)
    torch.nn.init.normal_(m.decoder.head.weight, std=0.5)  # a non-zero reconstruction
    x = torch.randn(3, 2, 16, 16)
    state = torch.get_rng_state()
    loss = m.loss(x, torch.Generator().manual_seed(3))
    masked, rec = m.reconstruct(x, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    mask = m.mask(x, torch.Generator().manual_seed(3))
    assert torch.equal(masked, x * (1 - mask))  # masked patches zeroed, the rest untouched
    want = ((rec - x) ** 2 * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * 2)
    assert loss.shape == (3,)
    assert torch.equal(m(x, torch.Generator().manual_seed(3)), loss)  # forward is the loss (DDP)
    torch.testing.assert_close(loss, want)
    full = ((rec - x) ** 2).mean(dim=(1, 2, 3))
    assert (loss - full).abs().min() > 1e-3  # the unmasked positions are not counted


def test_training_lowers_masked_mse_below_context_free_baseline():
    """80 Adam steps on 16x16 digits must beat, by 2x, the best prediction that ignores the visible context
    (the per-pixel mean image: 0.228), so the encoder-decoder really reads the unmasked neighbours.
    Measured: 0.057-0.074 over torch seeds 0-3 against the 0.114 bar."""
    from raygen.data.embedded import digits

    imgs, _ = digits(16, "train")
    data = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    model = LatentMAE(in_channels=1, width=8, layers=(1, 1, 1, 1), input_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    held = data[:256]

    def eval_loss():
        with torch.no_grad():
            return model.loss(held, torch.Generator().manual_seed(123)).mean().item()

    mask = model.mask(held, torch.Generator().manual_seed(123))
    baseline = (((data.mean(0, keepdim=True) - held) ** 2 * mask).sum() / mask.sum()).item()
    before = eval_loss()
    g, pick = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for _ in range(80):
        batch = data[torch.randint(0, len(data), (32,), generator=pick)]
        loss = model.loss(batch, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * baseline < 0.5 * before, (before, baseline, after)


def test_gradients_reach_the_input_through_frozen_features(tiny):
    tiny.requires_grad_(False)
    try:
        x = torch.randn(2, 1, 16, 16, requires_grad=True)
        feats = tiny.features(x)
        for key in ("layer3_p2_std", "conv1", "layer4_mean", "x_norm"):
            (grad,) = torch.autograd.grad(feats[key].square().sum(), x, retain_graph=True)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, key
        # constant input: every std sits at its eps floor, the gradient stays finite (the std's eps)
        z = torch.zeros(2, 1, 16, 16, requires_grad=True)
        feats = tiny.features(z)
        sum(v.sum() for k, v in feats.items() if k.endswith("_std")).backward()
        assert torch.isfinite(z.grad).all()
        assert all(p.grad is None for p in tiny.parameters())
    finally:
        tiny.requires_grad_(True)


def test_named_sizes():
    assert set(MAE_SIZES) >= {"W256", "W640"}
    with torch.device("meta"):
        m = LatentMAE_W256()
        assert (m.width, m.in_channels, m.input_size, m.layers) == (256, 4, 32, (3, 4, 6, 3))
        assert abs(count_params(m.encoder) / 1e6 - 340.2) < 0.1  # the paper: ≈340M
        assert abs(count_params(m) / 1e6 - 391.6) < 0.1  # the figure quoted in the module docstring
        assert latent_mae("MAE-W640").width == 640 and latent_mae(32, in_channels=1).width == 32
    with pytest.raises(ValueError):
        latent_mae("W7")
    with pytest.raises(ValueError):
        LatentMAE(input_size=12)  # not divisible by the 8x downsampling
