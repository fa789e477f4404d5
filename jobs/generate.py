"""Samples of a trained run for FID, as EDM's generate.py makes them: one image per seed, sharded over the
cluster's GPUs (or CPU workers), resumable. `python jobs/generate.py run=<run dir> seeds=0-49999 sampler.steps=18`
writes <out>/<seed//1000*1000:06d>/<seed:06d>.png (or format=npz: <out>/samples.npz); score them with
jobs/fid.py calc. docs/generate-and-fid.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.recipes.generate import main  # noqa: E402

if __name__ == "__main__":
    main()
