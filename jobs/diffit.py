"""DiffiT (arXiv 2312.02139): `python jobs/diffit.py` trains an image-space DiffiT (time-dependent
self-attention in windows) on the embedded digits with DDPM, samples with DDIM, evaluates and prints where
everything went. `--preset cifar10`, `--preset imagenet64` (pixel stores) and `--preset imagenet256_latent
data.path=<SD-VAE store>` (DiffiT-XL/2, learned variance, 250 respaced steps, the CFG ramp) are the papers'
settings; on a cluster: `ray job submit --working-dir . -- python jobs/diffit.py ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("diffit")
