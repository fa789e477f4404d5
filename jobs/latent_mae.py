"""The latent-MAE feature network of the drifting method (paper A.3), trained on its own:
`python jobs/latent_mae.py` (embedded digits) or `--preset imagenet256_w256 data.path=<latent store>`.
Writes <run_dir>/mae.pt, which `jobs/drifting.py stage.mae_ckpt=<run_dir>` uses."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("latent_mae")
