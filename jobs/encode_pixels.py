"""Write an image source into a pixel store (decoded, cropped uint8 images [C,H,W] + labels) with Ray
Data: CPU decode actors feed the shard writers; the same command resumes after a crash.
    python jobs/encode_pixels.py source.path=/data/imagenet source.split=train transform.resolution=64
    python jobs/encode_pixels.py --preset digits          # offline, embedded data
Train from it with data.source=store data.path=<the printed run_dir>."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.data.ingest import encode_pixels  # noqa: E402

if __name__ == "__main__":
    encode_pixels()
