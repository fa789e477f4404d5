"""Encode an image source into a store (SD-VAE latents) with Ray Data: CPU decode actors
feed encoder actors (GPU when the cluster has one); the same command resumes after a crash.
    python jobs/encode_latents.py source.path=/data/imagenet source.split=train
    python jobs/encode_latents.py --preset digits          # offline, embedded data, tiny model"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.data.ingest import encode_latents  # noqa: E402

if __name__ == "__main__":
    encode_latents()
