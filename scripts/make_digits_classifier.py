"""Train the digits classifier once per resolution and write the weights shipped in the package.

    python scripts/make_digits_classifier.py            # resolutions 16 and 32
    python scripts/make_digits_classifier.py --resolutions 16

The classifier is the yardstick of FID and class accuracy on the embedded digits, so it is trained
here, once, with a fixed seed on one thread with deterministic kernels, and shipped as
raygen/eval/weights/digits_classifier_r<res>.safetensors; `DigitsClassifier` only loads it. Tensors are
stored as float32 when the file stays under 1 MB, else as float16 (loaded back as float32). After
regenerating, paste the printed sha256 values into `WEIGHTS_SHA256` in raygen/eval/digits_classifier.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from raygen.eval.digits_classifier import (  # noqa: E402
    TRAIN_EPOCHS,
    TRAIN_SEED,
    WEIGHTS_DIR,
    accuracy_on_test_split,
    load_net,
    train_digits_net,
    weights_path,
)

MAX_FLOAT32_BYTES = 1_000_000  # larger networks are stored as float16


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for resolution in args.resolutions:
        start = time.perf_counter()
        net = train_digits_net(resolution, seed=TRAIN_SEED, epochs=TRAIN_EPOCHS)
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        float32_bytes = sum(v.numel() * 4 for v in state.values())
        dtype = torch.float32 if float32_bytes <= MAX_FLOAT32_BYTES else torch.float16
        state = {k: v.to(dtype).contiguous() for k, v in state.items()}
        recipe = {
            "resolution": resolution,
            "seed": TRAIN_SEED,
            "epochs": TRAIN_EPOCHS,
            "stored_dtype": str(dtype).removeprefix("torch."),
            "trained_with": f"torch {torch.__version__}",
        }
        path = weights_path(resolution, args.out_dir)
        # one metadata entry: safetensors writes several in an arbitrary order, which would change the sha256
        save_file(state, str(path), metadata={"recipe": json.dumps(recipe, sort_keys=True)})
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        accuracy = accuracy_on_test_split(load_net(path, resolution), resolution)  # the stored weights, as loaded
        hashes[resolution] = digest
        print(
            f"r{resolution}: {path} {path.stat().st_size} bytes ({recipe['stored_dtype']}), "
            f"test accuracy {accuracy:.4f}, sha256 {digest}, trained in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    print("WEIGHTS_SHA256 = {")
    for resolution, digest in hashes.items():
        print(f'    {resolution}: "{digest}",')
    print("}")


if __name__ == "__main__":
    main()
