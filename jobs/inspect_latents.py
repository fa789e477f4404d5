"""Decode random latents of a store back to a PNG grid, next to the original images:
    python jobs/inspect_latents.py run_or_store=runs/stores/digits-tiny-vae-32 num=64"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raygen.data.inspect import main  # noqa: E402

if __name__ == "__main__":
    main()
