"""Sources and transforms on real files in tmp_path: every listing problem, every reader error,
the colour conversions, the reference crops, NPY windowing, zip == folder, and the JPEG writer."""
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from raygen.config import ConfigError
from raygen.data import embedded
from raygen.data.sources import ItemReader, SourceConfig, list_source, resolve_kind, write_image_folder
from raygen.data.transforms import (
    ItemError,
    TransformConfig,
    _rrc_box,
    apply,
    center_crop_adm,
    random_resized_crop,
    resize_center_crop,
    to_array,
    to_rgb,
)


def _png(path, value=0, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _jpeg_bytes(size=(64, 48)):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _reasons(listing):
    return {p["path"]: p["reason"] for p in listing.problems}


def _reader(listing, cfg):
    return ItemReader(listing.kind, json.loads(json.dumps(listing.info)), cfg)  # info must survive meta.json


# --------------------------------------------------------------------------- class folders


def test_class_folders_empty_class_keeps_its_index(tmp_path):
    for name, n in (("ant", 2), ("bee", 0), ("cat", 1)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(n):
            _png(tmp_path / "train" / name / f"{name}{i}.png", i)
    cfg = SourceConfig(kind="class_folders", path=str(tmp_path), split="train")
    listing = list_source(cfg)
    assert listing.class_names == ["ant", "bee", "cat"]
    assert listing.keys == ["train/ant/ant0.png", "train/ant/ant1.png", "train/cat/cat0.png"]
    assert listing.labels.tolist() == [0, 0, 2] and listing.labels.dtype == np.int64
    assert _reasons(listing) == {"train/bee": "empty class folder"}
    assert resolve_kind(SourceConfig(kind="auto", path=str(tmp_path), split="train")) == "class_folders"
    with pytest.raises(ConfigError, match="train/bee: empty class folder"):
        list_source(cfg, on_error="fail")
    img = _reader(listing, cfg).read("train/cat/cat0.png")
    assert img.size == (12, 10) and img.mode == "RGB"


def test_class_folders_sort_by_class_then_file(tmp_path):
    # string order would put "a-b/..." before "a/..." ('-' < '/'); class order must win
    _png(tmp_path / "a" / "z.png")
    _png(tmp_path / "a-b" / "a.png")
    listing = list_source(SourceConfig(kind="class_folders", path=str(tmp_path)))
    assert listing.class_names == ["a", "a-b"]
    assert listing.keys == ["a/z.png", "a-b/a.png"] and listing.labels.tolist() == [0, 1]


def test_class_folders_dangling_symlink_dir_is_recorded(tmp_path):
    _png(tmp_path / "ant" / "x.png")
    _png(tmp_path / "cat" / "y.png")
    os.symlink(tmp_path / "gone", tmp_path / "bee")
    cfg = SourceConfig(kind="auto", path=str(tmp_path))
    assert resolve_kind(cfg) == "class_folders"
    listing = list_source(cfg)
    assert listing.class_names == ["ant", "bee", "cat"]  # bee keeps its index
    assert listing.labels.tolist() == [0, 2]
    reason = _reasons(listing)["bee"]
    assert reason == f"dangling symbolic link: its target {tmp_path / 'gone'} does not exist"
    with pytest.raises(ConfigError, match="bee"):
        list_source(cfg, on_error="fail")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 directories")
def test_class_folders_unreadable_dir_is_recorded(tmp_path):
    _png(tmp_path / "ant" / "x.png")
    _png(tmp_path / "bee" / "y.png")
    os.chmod(tmp_path / "bee", 0)
    try:
        listing = list_source(SourceConfig(kind="class_folders", path=str(tmp_path)))
        assert listing.class_names == ["ant", "bee"] and listing.labels.tolist() == [0]
        assert "Permission denied" in _reasons(listing)["bee"]
    finally:
        os.chmod(tmp_path / "bee", 0o755)


def test_class_folders_without_classes_is_a_config_error(tmp_path):
    _png(tmp_path / "x.png")
    with pytest.raises(ConfigError, match="no class folders"):
        list_source(SourceConfig(kind="class_folders", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="source.path"):
        SourceConfig(kind="class_folders", path=str(tmp_path / "nope")).validate()
    with pytest.raises(ConfigError, match="source.kind=auto needs source.path"):
        SourceConfig(kind="auto").validate()


# --------------------------------------------------------------------------- folder / dataset.json


def _dataset_json_folder(root):
    _png(root / "img0.png", 0)
    _png(root / "sub" / "img1.png", 1)
    _png(root / "extra.png", 2)
    (root / ".DS_Store").write_bytes(b"junk")
    labels = [["img0.png", 0], ["sub/img1.png", 2], ["missing.png", 1]]
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def test_folder_dataset_json_problems(tmp_path):
    root = _dataset_json_folder(tmp_path / "d")
    cfg = SourceConfig(kind="auto", path=str(root))
    assert resolve_kind(cfg) == "folder"
    listing = list_source(cfg)
    assert listing.keys == ["img0.png", "sub/img1.png"]
    assert listing.labels.tolist() == [0, 2]
    assert listing.class_names == ["0", "1", "2"]
    assert _reasons(listing) == {
        "missing.png": "listed in dataset.json but missing",
        "extra.png": "not listed in dataset.json",
        ".DS_Store": "hidden file",
    }
    with pytest.raises(ConfigError):
        list_source(cfg, on_error="fail")


def test_folder_dataset_json_null_labels_and_no_labels(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": None}))
    listing = list_source(SourceConfig(kind="folder", path=str(tmp_path)))
    assert listing.keys == ["a.png", "b.png"] and listing.labels.tolist() == [-1, -1]
    assert listing.class_names == ["unlabeled"] and listing.problems == []


def test_folder_subfolder_labels(tmp_path):
    _png(tmp_path / "dog" / "1.png")
    _png(tmp_path / "cat" / "deep" / "2.png")
    _png(tmp_path / "loose.png")
    listing = list_source(SourceConfig(kind="folder", path=str(tmp_path)))
    assert listing.class_names == ["cat", "dog"]
    assert listing.keys == ["cat/deep/2.png", "dog/1.png"] and listing.labels.tolist() == [0, 1]
    assert "not in a class folder" in _reasons(listing)["loose.png"]


# --------------------------------------------------------------------------- reader errors


def test_reader_errors(tmp_path):
    good = _jpeg_bytes()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "later.jpg").write_bytes(good)
    cfg = SourceConfig(kind="folder", path=str(tmp_path))
    listing = list_source(cfg)
    assert listing.keys == ["corrupt.jpg", "empty.jpg", "good.jpg", "later.jpg", "notes.txt", "truncated.jpg"]
    assert listing.problems == []  # every file is an item; the reader judges them
    reader = _reader(listing, cfg)
    assert reader.read("good.jpg").size == (64, 48)
    expected = {
        "corrupt.jpg": "corrupt or unrecognised",
        "truncated.jpg": "truncated or corrupt JPEG: image file is truncated",
        "empty.jpg": "zero-byte file",
        "notes.txt": r"not an image file \(.txt\)",
    }
    for key, pattern in expected.items():
        with pytest.raises(ItemError, match=pattern):
            reader.read(key)
    (tmp_path / "later.jpg").unlink()
    with pytest.raises(ItemError, match="missing file"):
        reader.read("later.jpg")


def test_small_image_needs_allow_upscale(tmp_path):
    img = Image.new("RGB", (20, 30), (10, 20, 30))
    rng = np.random.default_rng(0)
    with pytest.raises(ItemError, match=r"image is 20x30, smaller than the 32-pixel crop .*allow_upscale=true"):
        apply(TransformConfig(resolution=32), img, rng)
    out = apply(TransformConfig(resolution=32, allow_upscale=True), img, rng)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[16, 16], np.array([10, 20, 30]) / 255, atol=1e-6)
    native = apply(TransformConfig(kind="none"), img, rng)
    assert native.shape == (30, 20, 3)


# --------------------------------------------------------------------------- zip == folder


def _zip_dir(root, zpath):
    with zipfile.ZipFile(zpath, "w") as zf:
        for dirpath, _, files in os.walk(root):
            for f in files:
                full = os.path.join(dirpath, f)
                zf.write(full, os.path.relpath(full, root).replace(os.sep, "/"))
    return zpath


@pytest.mark.parametrize("layout", ["subfolders", "dataset_json"])
def test_zip_matches_folder(tmp_path, layout):
    root = tmp_path / "tree"
    if layout == "subfolders":
        for c, n in (("b", 2), ("a", 3)):
            for i in range(n):
                _png(root / c / f"{i}.png", 10 * ord(c) + i)
    else:
        _dataset_json_folder(root)
    zpath = _zip_dir(root, tmp_path / "tree.zip")
    fcfg, zcfg = SourceConfig(kind="auto", path=str(root)), SourceConfig(kind="auto", path=str(zpath))
    assert resolve_kind(zcfg) == "zip"
    folder, zipped = list_source(fcfg), list_source(zcfg)
    assert zipped.kind == "zip"
    assert zipped.keys == folder.keys and len(folder.keys) >= 2
    assert zipped.labels.tolist() == folder.labels.tolist()
    assert zipped.class_names == folder.class_names
    assert sorted(map(str, zipped.problems)) == sorted(map(str, folder.problems))
    fr, zr = _reader(folder, fcfg), _reader(zipped, zcfg)
    for key in folder.keys:
        np.testing.assert_array_equal(np.asarray(fr.read(key)), np.asarray(zr.read(key)))
    zr2 = pickle.loads(pickle.dumps(zr))  # cheap to ship to workers; reopens the zip lazily
    np.testing.assert_array_equal(np.asarray(zr2.read(folder.keys[0])), np.asarray(fr.read(folder.keys[0])))


# --------------------------------------------------------------------------- colour


def test_to_rgb_modes():
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (0, 0, 0) and to_rgb(la).getpixel((1, 0)) == (255, 255, 255)

    rgba = Image.new("RGBA", (2, 1), (200, 10, 10, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black -> white, not black
    out = to_rgb(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (200, 10, 10) and out.getpixel((1, 0)) == (255, 255, 255)

    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    out = to_rgb(p)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 200, 30)
    del p.info["transparency"]
    assert to_rgb(p).getpixel((0, 0)) == (0, 0, 0)

    cmyk = to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))
    assert cmyk.getpixel((0, 0)) == (255, 0, 0)

    i16 = Image.fromarray(np.array([[65535, 32768, 0]], np.uint16))
    assert i16.mode.startswith("I;16")
    vals = [to_rgb(i16).getpixel((x, 0)) for x in range(3)]
    assert vals[0] == (255,) * 3 and abs(vals[1][0] - 128) <= 1 and vals[2] == (0, 0, 0)
    i32 = Image.fromarray(np.array([[65535, 32768]], np.int32))
    assert i32.mode == "I" and to_rgb(i32).getpixel((0, 0)) == (255,) * 3

    f = Image.fromarray(np.array([[0.25, 2.0]], np.float32))
    assert to_rgb(f) is f  # float slices are never quantised
    np.testing.assert_allclose(to_array(f)[0], [[0.25] * 3, [1.0] * 3])


# --------------------------------------------------------------------------- crops


def _adm_reference(pil_image, image_size):
    """guided-diffusion's center_crop_arr, verbatim in substance."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size,res", [((300, 200), 64), ((97, 131), 32), ((640, 480), 64), ((33, 200), 32)])
def test_center_crop_adm_matches_reference(size, res):
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = center_crop_adm(img, res)
    assert out.size == (res, res)
    np.testing.assert_array_equal(np.asarray(out), _adm_reference(img, res))


def test_center_crop_adm_identity_and_resize_center_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(center_crop_adm(img, 32)), np.asarray(img))
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    assert resize_center_crop(wide, 32).size == (32, 32)
    f = Image.fromarray(np.full((70, 50), 0.5, np.float32))  # NPY slices crop without quantising
    out = center_crop_adm(f, 16)
    assert out.mode == "F" and np.allclose(np.asarray(out), 0.5, atol=1e-5)


def test_random_resized_crop_deterministic_and_inside():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    a = random_resized_crop(img, 24, rng=np.random.default_rng(5))
    b = random_resized_crop(img, 24, rng=np.random.default_rng(5))
    c = random_resized_crop(img, 24, rng=np.random.default_rng(6))
    assert a.size == (24, 24)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    for seed in range(200):
        top, left, h, w = _rrc_box(80, 60, (0.08, 1.0), (0.5, 2.0), np.random.default_rng(seed))
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80 and h > 0 and w > 0
    # impossible ratios fall back to the central crop clamped to the ratio range
    assert _rrc_box(100, 10, (0.9, 1.0), (1.0, 2.0), np.random.default_rng(0)) == (0, 40, 10, 20)


def test_apply_flip_uses_rng_and_config_validation():
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    cfg = TransformConfig(kind="resize_center_crop", resolution=64, hflip_prob=1.0)
    np.testing.assert_array_equal(apply(cfg, img, np.random.default_rng(0)), to_array(img)[:, ::-1])
    with pytest.raises(ConfigError, match="transform.resolution must be >= 8, got 4"):
        TransformConfig(resolution=4).validate()
    with pytest.raises(ConfigError, match="transform.scale"):
        TransformConfig(scale=[0.5, 0.2]).validate()
    with pytest.raises(ConfigError, match="transform.hflip_prob"):
        TransformConfig(hflip_prob=1.5).validate()


# --------------------------------------------------------------------------- npy


def test_npy_volume_keeps_relative_intensities(tmp_path):
    vol = np.zeros((3, 8, 8), np.float32)
    vol[0, 0, 0], vol[1, 0, 0], vol[2, 0, 0] = 100.0, 10.0, 50.0
    np.save(tmp_path / "vol01.npy", vol)
    cfg = SourceConfig(kind="auto", path=str(tmp_path))
    assert resolve_kind(cfg) == "npy"
    listing = list_source(cfg)
    assert listing.keys == ["vol01.npy#0", "vol01.npy#1", "vol01.npy#2"]
    assert listing.info["window"] == [0.0, 100.0] and listing.class_names == ["unlabeled"]
    reader = _reader(listing, cfg)
    s1 = reader.read("vol01.npy#1")
    assert s1.mode == "F" and s1.size == (8, 8)
    assert abs(np.asarray(s1).max() - 0.1) < 1e-6  # per-slice min-max would give 1.0
    out = apply(TransformConfig(resolution=8), s1, np.random.default_rng(0))
    assert out.shape == (8, 8, 3) and abs(out.max() - 0.1) < 1e-6

    fixed = SourceConfig(kind="npy", path=str(tmp_path / "vol01.npy"), intensity=[0, 20])
    fl = list_source(fixed)
    assert fl.info["window"] == [0.0, 20.0]
    fr = _reader(fl, fixed)
    assert np.asarray(fr.read("vol01.npy#1")).max() == pytest.approx(0.5)
    assert np.asarray(fr.read("vol01.npy#0")).max() == 1.0  # clipped


def test_npy_global_window_spans_files_and_axis(tmp_path):
    np.save(tmp_path / "a.npy", np.full((2, 4, 6), 5.0, np.float32))
    np.save(tmp_path / "b.npy", np.linspace(-5, 15, 2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6))
    cfg = SourceConfig(kind="npy", path=str(tmp_path), npy_axis=2)
    listing = list_source(cfg)
    assert listing.info["window"] == [-5.0, 15.0]
    assert len(listing.keys) == 12 and listing.keys[:2] == ["a.npy#0", "a.npy#1"]
    img = _reader(listing, cfg).read("a.npy#3")
    assert img.size == (4, 2)  # a [D,H,W] slice along axis 2 is [D,H]
    np.testing.assert_allclose(np.asarray(img), 0.5)


def test_npy_4d_volumes_keys_and_nhwc_images(tmp_path):
    vols = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    np.save(tmp_path / "vols.npy", vols)
    cfg = SourceConfig(kind="npy", path=str(tmp_path / "vols.npy"))
    listing = list_source(cfg)
    assert listing.keys == [f"vols.npy#{n}/{s}" for n in range(2) for s in range(3)]
    lo, hi = listing.info["window"]
    got = np.asarray(_reader(listing, cfg).read("vols.npy#1/2"))
    np.testing.assert_allclose(got, (vols[1, 2] - lo) / (hi - lo), atol=1e-6)

    imgs = np.random.default_rng(1).integers(0, 256, (4, 6, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", imgs)
    icfg = SourceConfig(kind="npy", path=str(tmp_path / "imgs.npy"))
    il = list_source(icfg)
    assert il.keys == [f"imgs.npy#{i}" for i in range(4)] and il.info["window"] is None
    im = _reader(il, icfg).read("imgs.npy#2")
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), imgs[2])


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_with_labels(tmp_path, compressed):
    imgs = np.random.default_rng(2).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "data.npz", images=imgs, labels=np.array([0, 3, 1, 3, 2]))
    cfg = SourceConfig(kind="auto", path=str(tmp_path / "data.npz"))
    listing = list_source(cfg)
    assert listing.keys == [f"data.npz#{i}" for i in range(5)]
    assert listing.labels.tolist() == [0, 3, 1, 3, 2] and listing.class_names == ["0", "1", "2", "3"]
    assert (listing.info["files"]["data.npz"]["offset"] is None) == compressed
    im = _reader(listing, cfg).read("data.npz#3")
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), imgs[3, ..., 0])


def test_npy_class_subfolders_and_bad_files(tmp_path):
    (tmp_path / "ct").mkdir()
    (tmp_path / "mr").mkdir()
    np.save(tmp_path / "ct" / "v.npy", np.zeros((2, 4, 4), np.float32))
    np.save(tmp_path / "mr" / "v.npy", np.ones((3, 4, 4), np.float32))
    np.save(tmp_path / "mr" / "bad.npy", np.zeros((2, 2, 2, 2, 2), np.float32))
    listing = list_source(SourceConfig(kind="npy", path=str(tmp_path)))
    assert listing.class_names == ["ct", "mr"]
    assert listing.keys == ["ct/v.npy#0", "ct/v.npy#1", "mr/v.npy#0", "mr/v.npy#1", "mr/v.npy#2"]
    assert listing.labels.tolist() == [0, 0, 1, 1, 1]
    assert "unsupported array shape" in _reasons(listing)["mr/bad.npy"]


# --------------------------------------------------------------------------- embedded and writer


def test_embedded_digits_listing_and_reader():
    cfg = SourceConfig(kind="digits", split="test", resolution=16)
    listing = list_source(cfg)
    images, labels = embedded.digits(16, "test")
    assert listing.keys[123] == "digits/test/000123" and len(listing) == len(labels)
    assert listing.labels.tolist() == labels.tolist() and listing.class_names == embedded.digits_class_names()
    im = _reader(listing, cfg).read("digits/test/000123")
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), images[123, ..., 0])
    scfg = SourceConfig(kind="shapes", resolution=16, num_images=20)
    sl = list_source(scfg)
    assert sl.keys[0] == "shapes/train/000000" and _reader(sl, scfg).read(sl.keys[5]).mode == "RGB"


def test_write_image_folder_round_trip(tmp_path):
    images, labels = embedded.digits(32, "test")
    images, labels = images[:40], labels[:40]
    root = write_image_folder(images, labels, embedded.digits_class_names(), tmp_path / "tree", split="val")
    cfg = SourceConfig(kind="auto", path=str(root), split="val")
    listing = list_source(cfg)
    assert listing.kind == "class_folders" and len(listing) == 40
    assert listing.class_names == embedded.digits_class_names()
    index = [int(k.rsplit("_", 1)[1].split(".")[0]) for k in listing.keys]
    assert listing.labels.tolist() == labels[index].tolist()
    assert {p["reason"] for p in listing.problems} <= {"empty class folder"}
    reader = _reader(listing, cfg)
    for key, i in zip(listing.keys[:10], index[:10]):
        im = reader.read(key)
        assert im.mode == "L"
        err = np.abs(np.asarray(im, np.int16) - images[i, ..., 0].astype(np.int16))
        assert err.mean() < 4 and err.max() < 64  # JPEG q95
