"""report.html + report.csv of a sweep: `python jobs/report.py runs/ablate/<sweep>` (safe while it runs)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.tune.report import main  # noqa: E402

if __name__ == "__main__":
    main()
