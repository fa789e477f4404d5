"""Few-shot FSDiT in JAX. `python jobs/fsdit.py` prepares the embedded 96-class few-shot set (episodes,
SigLIP support embeddings, target images), trains under Ray Train's JaxTrainer, generates images of the
20 unseen test classes from 5 supports each, evaluates and prints where everything went; `--preset`,
`--config` and key=value overrides change it. On a cluster or a TPU slice:
`ray job submit --working-dir . -- python jobs/fsdit.py --preset miniimagenet_big stage.latents=... stage.supports=...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("fsdit")
