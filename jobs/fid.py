"""EDM's FID tool: `python jobs/fid.py ref --data <zip|folder|store> --dest stats.npz` writes reference
statistics (mu, sigma); `python jobs/fid.py calc --images <folder|npz> --ref stats.npz [--num 50000] [--seeds 3]`
prints the FID (the minimum over seed ranges). Inception with --inception-weights, else the offline digits
feature space. docs/generate-and-fid.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.eval.fid_protocol import main  # noqa: E402

if __name__ == "__main__":
    main()
