"""An ablation as one command: a grid over any config keys of a recipe, each grid point a full raygen
run (its own run directory, checkpoints, samples, evaluation) as a Ray Tune trial, then a report.

    python jobs/ablate.py --sweep drifting_coupling          # a shipped sweep (raygen/configs/sweeps)
    python jobs/ablate.py --sweep my_sweep.yaml train.steps=2000
    python jobs/ablate.py --sweep dit_sampler --from-run runs/dit/<run>   # evaluation-only trials

Run the same command again after a Ctrl-C or a crash: finished trials are kept, unfinished ones resume."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.tune.ablate import main  # noqa: E402

if __name__ == "__main__":
    main()
