"""One-step drifting generator (arXiv 2602.04770). `python jobs/drifting.py` trains a feature MAE on the
embedded digits, trains a one-step class-conditional generator with the drifting loss in its feature
space, generates with one network evaluation at every omega of `eval.sweep.omega`, evaluates, and prints
where everything went. `--preset imagenet256_ablation stage.latents=<store> stage.mae_ckpt=<mae run>`
is the paper's ablation; on a cluster: `ray job submit --working-dir . -- python jobs/drifting.py ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("drifting")
