"""Class-conditional DiT + DDPM/DDIM. `python jobs/dit.py` trains on the embedded digits, samples,
evaluates and prints where everything went; `--preset`, `--config` and key=value overrides change it.
The same command runs on a cluster: `ray job submit --working-dir . -- python jobs/dit.py ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("dit")
