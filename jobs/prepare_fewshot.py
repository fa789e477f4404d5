"""Split a labelled image source's classes into disjoint train/val/test sets and write each split's few-shot
episode table (a target image and `shots` supports of its class, as listing positions) with Ray Data.
    python jobs/prepare_fewshot.py                       # the embedded 96-class fewshot set, split 60/16/20
    python jobs/prepare_fewshot.py source.path=/data/miniimagenet split=60/16/20 seed=42 sets=100 shots=5
Read the result with raygen.data.fewshot_prep.load_split / load_episodes(<the printed fewshot_dir>, "train")."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.data.fewshot_prep import main  # noqa: E402

if __name__ == "__main__":
    main()
