"""Tiny stand-ins for the hub encoders, so every ingest command runs offline: `raygen/tiny-vae` (an
`AutoencoderKL` with the SD-VAE layout at 0.7M parameters, briefly trained on the embedded digits and
shapes so its latents decode back to the image) and `raygen/tiny-siglip` (a small
`SiglipVisionModel` + its `SiglipImageProcessor`, trained briefly image-text on the embedded few-shot data).

They are built once into the cache with `save_pretrained` and then loaded with `from_pretrained`
like any hub checkpoint, so the real loading code is what runs.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

TINY = {"raygen/tiny-vae", "raygen/tiny-siglip"}


def resolve_model(name: str) -> str:
    """A hub id or local path unchanged; a `raygen/tiny-*` name -> its cached local directory."""
    if name not in TINY:
        return name
    from raygen.core.files import cache_dir

    path = cache_dir() / "models" / name.split("/")[1]
    if not (path / "config.json").is_file():
        build = tiny_vae if name == "raygen/tiny-vae" else tiny_siglip
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
        build(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def tiny_vae_config() -> dict:
    return dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                norm_num_groups=32, sample_size=32)


def tiny_vae(out_dir, steps: int = 300, resolution: int = 32, batch: int = 16, seed: int = 0) -> Path:
    """Train the tiny VAE to reconstruct 32x32 digits and shapes (MSE + a small KL, as the SD-VAE's
    objective minus the perceptual and GAN terms) and save it. About 80 s on 2 CPU cores, once per
    cache; afterwards 32x32 digits reconstruct with MSE ~0.006 (vs 0.46 to another image)."""
    from diffusers import AutoencoderKL

    from raygen.data import embedded

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config())
    digits, _ = embedded.digits(resolution, "train")
    shapes, _ = embedded.shapes(resolution, 2048, seed)
    data = np.concatenate([np.repeat(digits, 3, axis=-1), shapes])
    x_all = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=g)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_siglip(out_dir, image_size: int = 32, seed: int = 0, steps: int = 200, batch: int = 64) -> Path:
    """A `SiglipVisionModel` (hidden 64, 2 layers, patch 8) trained briefly with SigLIP's own objective,
    the pairwise sigmoid image-text loss (arXiv 2303.15343, Eq. 1), against short captions of the
    embedded few-shot images ("red cross stripes"): the stand-in for a SigLIP2 trained on web
    image-text pairs, so its embeddings name colour, shape and texture as a real one names concepts.
    Its random initialisation tells the 20 unseen few-shot classes apart only at 0.68 (5-shot
    nearest-prototype accuracy); trained, far better (docs/methods/fsdit.md). The images are a draw of
    their own (seed 7919), not the draws any job uses, and only the vision tower is saved.
    About 40 s on 2 CPU cores, once per cache."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from raygen.data import embedded

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=image_size, patch_size=8)
    model = SiglipVisionModel(cfg)
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    images, labels = embedded.fewshot(16, 40, 7919)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    # caption of class c: its colour, shape and texture words (vocabulary = all attribute words)
    names = embedded.fewshot_class_names()
    vocab = sorted({w for n in names for w in n.split("_")})
    words = torch.tensor([[vocab.index(w) for w in n.split("_")] for n in names])
    text = torch.nn.EmbeddingBag(len(vocab), 64, mode="sum")
    text_proj = torch.nn.Linear(64, 64)
    # the learnable temperature and bias of the sigmoid loss, initialised as in the paper (t'=log 10, b=-10)
    log_t, bias = torch.nn.Parameter(torch.tensor(np.log(10.0))), torch.nn.Parameter(torch.tensor(-10.0))
    params = [*model.parameters(), *text.parameters(), *text_proj.parameters(), log_t, bias]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    labels_t = torch.from_numpy(labels)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(pixels), (batch,), generator=g)
        img = torch.nn.functional.normalize(model(pixel_values=pixels[idx]).pooler_output, dim=-1)
        classes = labels_t[idx]
        txt = torch.nn.functional.normalize(text_proj(text(words[classes])), dim=-1)
        logits = img @ txt.T * log_t.exp() + bias
        target = 2.0 * (classes[:, None] == classes[None, :]).float() - 1.0  # same caption = a positive pair
        loss = -torch.nn.functional.logsigmoid(target * logits).sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)
