"""Pixel stores as a user makes and trains from them: a class-folder tree of real JPEG/PNG files plus
bad files -> `jobs/encode_pixels.py` (a subprocess on the session cluster) -> the stored uint8 images
equal the same files decoded and cropped here with PIL alone; training rows are those bytes scaled
to [-1, 1]; `resolve_data` reads the store while `validate()` reads no file."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raygen.config import ConfigError, from_dict, load_config
from raygen.data.images import (
    ImageDataConfig,
    arrays,
    build_dataset,
    channels,
    class_names,
    pixel_source,
    resolve_data,
)
from raygen.data.store import Store

ROOT = Path(__file__).resolve().parents[3]
RES = 16
GOOD = {  # file -> (size, PIL mode)
    "cat/a.jpg": ((40, 30), "RGB"),
    "cat/b.png": ((24, 24), "RGB"),
    "cat/c.png": ((33, 20), "L"),
    "dog/d.jpg": ((64, 48), "RGB"),  # short side >= 2 x 16: halved with BOX first
    "dog/e.png": ((16, 16), "RGB"),  # already the crop size
}
BAD = {  # file -> a word its skip reason must contain
    "dog/truncated.jpg": "truncated",
    "cat/empty.png": "zero-byte",
    "dog/fake.jpg": "cannot identify",  # text with an image extension
    "cat/notes.txt": "not an image",  # not an image at all: listed, never stored, recorded
}


def smooth_image(rng, size, mode):
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.convert("L") if mode == "L" else im


def adm_center_crop(img: Image.Image, res: int) -> np.ndarray:
    """ADM's center_crop_arr (arXiv:2105.05233, its image_datasets.py), written out independently of
    raygen.data.transforms: BOX-halve while the short side is >= 2*res, BICUBIC to short side res,
    then the central res x res window sliced out of the array."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[y:y + res, x:x + res]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for rel, (size, mode) in GOOD.items():
        (root / rel).parent.mkdir(exist_ok=True)
        kwargs = {"quality": 90} if rel.endswith(".jpg") else {}
        smooth_image(rng, size, mode).save(root / rel, **kwargs)
    jpeg = (root / "dog/d.jpg").read_bytes()
    (root / "dog/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "cat/empty.png").write_bytes(b"")
    (root / "dog/fake.jpg").write_text("this is a shopping list, not a photo\n" * 4)
    (root / "cat/notes.txt").write_text("cats and dogs")
    return root


def run_job(args, env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "encode_pixels.py"), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def store_dir(tree, tmp_path_factory, job_env):
    out = tmp_path_factory.mktemp("stores") / "pets"
    argv = [f"source.path={tree}", f"transform.resolution={RES}", f"store.path={out}", "store.shard_size=2",
            "ingest.decode_batch_size=2"]
    proc = run_job(argv, job_env)
    assert proc.stdout.strip().splitlines()[-1] == f"run_dir: {out}"
    assert f"stored {len(GOOD)} of {len(GOOD) + len(BAD)} items" in proc.stdout
    # the same command again: nothing left to do, no shard rewritten
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    run_job(argv, job_env)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    return out


def test_store_holds_the_pil_decoded_crops_and_records_bad_files(store_dir, tree):
    s = Store(store_dir)
    meta = s.meta
    assert meta["kind"] == "pixels" and meta["pixels"]["layout"] == "CHW"
    assert meta["arrays"] == {"image": {"shape": [3, RES, RES], "dtype": "uint8"}}
    assert meta["class_names"] == ["cat", "dog"] and meta["preprocessing"]["resolution"] == RES
    assert meta["source"]["resolved_kind"] == "class_folders"
    c = meta["counts"]
    assert (c["listed"], c["stored"], c["skipped"]) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))
    assert len(s.shards) >= 3  # store.shard_size=2: positions cross shards

    assert sorted(s.keys()) == sorted(GOOD)
    images = s.array("image")[:]
    assert images.dtype == np.uint8 and images.shape == (len(GOOD), 3, RES, RES)
    for pos, key in enumerate(s.keys()):
        with Image.open(tree / key) as im:
            want = adm_center_crop(im.convert("RGB"), RES)
        np.testing.assert_array_equal(images[pos], want.transpose(2, 0, 1), err_msg=str(key))
        assert s.labels[pos] == ["cat", "dog"].index(str(key).split("/")[0])

    skipped = {r["path"]: r["reason"] for r in map(json.loads, (store_dir / "skipped.jsonl").read_text().splitlines())}
    assert set(skipped) == set(BAD)
    for path, word in BAD.items():
        assert word in skipped[path], (path, skipped[path])


def test_training_rows_are_the_stored_bytes_in_minus_one_one(store_dir, ray_cluster):
    cfg = resolve_data(from_dict(ImageDataConfig, {"source": "store", "path": str(store_dir)}))
    assert cfg.resolution == RES and channels(cfg) == 3 and class_names(cfg) == ["cat", "dog"]
    assert pixel_source(cfg) is cfg  # the store is its own pixel data (evaluation reference)
    rows = build_dataset(cfg).take_all()
    s = Store(store_dir)
    assert len(rows) == len(s)
    got = sorted((int(r["label"]), r["image"].tobytes()) for r in rows)
    assert all(r["image"].dtype == np.float32 and r["image"].shape == (3, RES, RES) for r in rows)
    assert all(-1.0 <= r["image"].min() and r["image"].max() <= 1.0 for r in rows)
    stored = s.array("image")[:].astype(np.float32) / 127.5 - 1.0
    want = sorted((int(lab), x.tobytes()) for lab, x in zip(s.labels, stored))
    assert got == want

    # random access for evaluation: HWC uint8 like the embedded sources; `test` = evenly spaced subset
    x, y = arrays(cfg, "train")
    np.testing.assert_array_equal(x, s.array("image")[:].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, s.labels)
    xt, yt = arrays(resolve_data(from_dict(ImageDataConfig, {"source": "store", "path": str(store_dir),
                                                             "reference_images": 2})), "test")
    np.testing.assert_array_equal(xt, x[[0, len(s) - 1]])
    np.testing.assert_array_equal(yt, y[[0, len(s) - 1]])

    with pytest.raises(ConfigError, match="data.source=store"):  # the latent-store spelling refuses pixels
        resolve_data(from_dict(ImageDataConfig, {"source": "latents", "path": str(store_dir)}))


def test_validate_reads_no_file_and_resolve_data_sets_the_resolution(tmp_path):
    not_a_store = tmp_path / "plain_dir"
    not_a_store.mkdir()
    for path in (not_a_store, tmp_path / "missing"):
        cfg = from_dict(ImageDataConfig, {"source": "store", "path": str(path)})  # validate() runs here
        with pytest.raises(ConfigError, match=r"data\.path=.*(meta\.json|not a directory).*encode_pixels"):
            resolve_data(cfg)
    with pytest.raises(ConfigError, match="data.path"):
        from_dict(ImageDataConfig, {"source": "store"})

    # a meta.json that cannot be parsed: validate() never opens it, resolve_data() does
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{ not json")
    from_dict(ImageDataConfig, {"source": "store", "path": str(broken)})
    with pytest.raises(ConfigError, match="meta.json cannot be read"):
        resolve_data(from_dict(ImageDataConfig, {"source": "store", "path": str(broken)}))

    # an unfinished store (shards, no meta.json) and a store of a kind training cannot use
    (tmp_path / "unfinished" / "shards").mkdir(parents=True)
    with pytest.raises(ConfigError, match="unfinished"):
        resolve_data(ImageDataConfig(source="store", path=str(tmp_path / "unfinished")))
    siglip = tmp_path / "siglip"
    siglip.mkdir()
    (siglip / "meta.json").write_text(json.dumps({"kind": "siglip", "arrays": {}, "class_names": []}))
    with pytest.raises(ConfigError, match="siglip store"):
        resolve_data(ImageDataConfig(source="store", path=str(siglip)))

    # the resolution comes from the store's arrays, on a new object; the given config is untouched
    for kind, name, shape in (("pixels", "image", [3, 24, 24]), ("latents", "latent", [4, 8, 8])):
        d = tmp_path / kind
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"kind": kind, "class_names": ["a"],
                                                 "arrays": {name: {"shape": shape, "dtype": "uint8"}}}))
        cfg = from_dict(ImageDataConfig, {"source": "store", "path": str(d)})
        resolved = resolve_data(cfg)
        assert cfg.resolution == 16 and resolved.resolution == shape[-1] and resolved is not cfg
        assert channels(resolved) == shape[0]
    assert resolve_data(ImageDataConfig(source="latents", path=str(tmp_path / "latents"))).resolution == 8


def test_pixel_presets_load_and_refuse_variable_sizes(tmp_path):
    from raygen.cli import preset_dir
    from raygen.data.ingest import PixelIngestConfig

    presets = sorted(p.stem for p in preset_dir("encode_pixels").glob("*.yaml"))
    assert presets == ["default", "digits"]
    cfg, _ = load_config(PixelIngestConfig, preset="default", preset_dir=preset_dir("encode_pixels"),
                         overrides=[f"source.path={tmp_path}"])
    assert cfg.transform.resolution == 64 and cfg.source.kind == "auto"
    cfg, _ = load_config(PixelIngestConfig, preset="digits", preset_dir=preset_dir("encode_pixels"))
    assert cfg.source.kind == "digits" and cfg.transform.resolution == 32
    with pytest.raises(ConfigError, match="transform.kind=none"):
        load_config(PixelIngestConfig, preset="digits", preset_dir=preset_dir("encode_pixels"),
                    overrides=["transform.kind=none"])
