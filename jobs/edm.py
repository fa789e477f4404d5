"""EDM (Karras et al., arXiv 2206.00364): an EDM-family U-Net with EDM's preconditioning, loss and Heun
sampler. `python jobs/edm.py` trains on the embedded digits, samples, evaluates and prints where everything
went; `--preset cifar10_ddpmpp data.path=<zip or folder>` / `--preset imagenet64_adm` are the paper's
configurations. On a cluster: `ray job submit --working-dir . -- python jobs/edm.py ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("edm")
