"""Beta diffusion / Smoothed Dirichlet Diffusion (Zhou et al., arXiv 2309.07867): a U-Net trained with
KLUB / ELBO / HKD on multiplicative Beta noise, sampled by the reverse Beta chain. `python jobs/sdd.py`
trains on the embedded digits; `--preset cifar10_klub` / `cifar10_hkd` are the official options;
`--preset volumes source.path=<dir of .npy/.nii volumes> source.npy_axis=2` trains on volume slices.
On a cluster: `ray job submit --working-dir . -- python jobs/sdd.py ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("sdd")
