"""raygen.nets.dit against the reference DiT (facebookresearch/DiT models.py), checked numerically
through diffusers' port `DiTTransformer2DModel`, plus shape / adaLN-Zero / gradient checks.

Where diffusers deviates from the reference code, the test puts diffusers back on the reference
(the DiT paper code is the spec, diffusers is only the port):
- timestep sinusoid: reference `freqs = exp(-log(10000) * arange(half) / half)`, order [cos, sin].
  diffusers builds `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`, i.e. it divides by
  `half - 1` (order [cos, sin] matches). The test sets `downscale_freq_shift = 0` on diffusers' Timesteps;
  `test_timestep_sinusoid_matches_reference` checks raygen against the reference formula directly.
- the pre-MLP LayerNorm: reference eps 1e-6, diffusers' `norm3` uses `norm_eps` (default 1e-5):
  the test builds diffusers with `norm_eps=1e-6`.
- diffusers gives each block its own timestep/label embedder (`norm1.emb`) and draws label dropout
  inside the net in train mode; the reference (and raygen) has one embedder and the null class
  index `num_classes`. The test copies block 0's embedder into all blocks and runs in eval mode.
Everything else maps one-to-one: q/k/v -> fused qkv (stacked q;k;v), per-block `norm1.linear` and
`proj_out_1` -> rows of raygen's single adaLN matmul, `proj_out_2` -> final_layer.linear.
"""
import math

import numpy as np
import pytest
import torch

from raygen.nets.dit import DIT_SIZES, DiT, TimestepEmbedder, dit, sincos_pos_embed_2d

diffusers = pytest.importorskip("diffusers")

CFG = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)


def _diffusers_dit(cfg):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=cfg["in_channels"], out_channels=cfg["in_channels"], num_layers=cfg["depth"],
        sample_size=cfg["input_size"], patch_size=cfg["patch_size"], num_embeds_ada_norm=cfg["num_classes"],
        activation_fn="gelu-approximate", norm_eps=1e-6,
    )


@torch.no_grad()
def _randomise(module, gen):
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@torch.no_grad()
def _load_from_diffusers(ours: DiT, ref) -> None:
    emb = ref.transformer_blocks[0].norm1.emb
    ours.x_embedder.weight.copy_(ref.pos_embed.proj.weight)
    ours.x_embedder.bias.copy_(ref.pos_embed.proj.bias)
    ours.t_embedder.mlp[0].load_state_dict(emb.timestep_embedder.linear_1.state_dict())
    ours.t_embedder.mlp[2].load_state_dict(emb.timestep_embedder.linear_2.state_dict())
    ours.y_embedder.embedding.weight.copy_(emb.class_embedder.embedding_table.weight)
    ada_w = [b.norm1.linear.weight for b in ref.transformer_blocks] + [ref.proj_out_1.weight]
    ada_b = [b.norm1.linear.bias for b in ref.transformer_blocks] + [ref.proj_out_1.bias]
    ours.adaln.linear.weight.copy_(torch.cat(ada_w))
    ours.adaln.linear.bias.copy_(torch.cat(ada_b))
    for blk, rb in zip(ours.blocks, ref.transformer_blocks):
        a = rb.attn1
        blk.attn.qkv.weight.copy_(torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]))
        blk.attn.qkv.bias.copy_(torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
        blk.attn.proj.load_state_dict(a.to_out[0].state_dict())
        blk.mlp.fc1.load_state_dict(rb.ff.net[0].proj.state_dict())
        blk.mlp.fc2.load_state_dict(rb.ff.net[2].state_dict())
    ours.final_layer.linear.load_state_dict(ref.proj_out_2.state_dict())


@pytest.mark.parametrize("patch_size", [2, 4])
def test_matches_diffusers_port(patch_size):
    cfg = dict(CFG, patch_size=patch_size)
    gen = torch.Generator().manual_seed(0)
    ref = _diffusers_dit(cfg).eval()
    _randomise(ref, gen)
    emb0 = ref.transformer_blocks[0].norm1.emb
    for b in ref.transformer_blocks:  # one shared embedder, as in the reference DiT
        b.norm1.emb.load_state_dict(emb0.state_dict())
        b.norm1.emb.time_proj.downscale_freq_shift = 0  # reference sinusoid: divide by half, not half - 1
    ours = DiT(**cfg).eval()
    _load_from_diffusers(ours, ref)
    assert len(list(ours.parameters())) > 0 and all(p.abs().sum() > 0 for p in ours.parameters())

    b, s = 3, cfg["input_size"]
    x = torch.randn(b, cfg["in_channels"], s, s, generator=gen)
    t = torch.tensor([0.0, 417.0, 999.0])
    y = torch.tensor([1, 7, cfg["num_classes"]])  # the last one is the null class
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
        got_int_t = ours(x, t.long(), y)
    assert want.abs().max() > 0.1  # the comparison is not trivially 0 == 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_int_t, got)


def test_pos_embed_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for dim, grid in [(64, 8), (384, 16)]:
        want = get_2d_sincos_pos_embed(dim, grid, base_size=grid).double().numpy()
        assert abs(sincos_pos_embed_2d(dim, grid) - want).max() < 1e-5


def _reference_pos_embed(embed_dim, grid_size):
    """facebookresearch/DiT models.py get_2d_sincos_pos_embed (from MAE), verbatim apart from names."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_reference():
    for dim, grid in [(64, 8), (384, 16)]:
        assert abs(sincos_pos_embed_2d(dim, grid) - _reference_pos_embed(dim, grid)).max() < 1e-6


def test_timestep_sinusoid_matches_reference():
    t = torch.tensor([0.0, 3.0, 250.5, 999.0])
    half = 128  # facebookresearch/DiT models.py TimestepEmbedder.timestep_embedding, dim=256
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(TimestepEmbedder.sinusoid(t, 256), want)


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_shape_and_zero_output_at_init(patch_size):
    net = DiT(input_size=16, patch_size=patch_size, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([1, 500]), torch.tensor([0, 5]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero + zero final layer
    assert net.null_class == 5


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"DiT-S/2.*DiT-XL/8"):
        dit("DiT-Q/3")
    with pytest.raises(ValueError, match="DiT-T/2"):
        dit("nonsense")
    net = dit("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    assert len(net.blocks) == DIT_SIZES["T"]["depth"] and net.patch_size == 4


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    x, t, y = torch.randn(4, 2, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        net.final_layer.linear.weight.normal_(0, 0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    (net(x, t, y) - x).square().mean().backward()
    assert net.adaln.linear.weight.grad.abs().sum() > 0  # the zero gates get gradient from the final layer
    opt.step()  # ... so one step opens them, and every parameter gets gradient
    opt.zero_grad()
    (net(x, t, y) - x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
