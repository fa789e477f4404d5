"""Volumes (NPY and NIfTI) come out on ONE intensity scale for the whole source: real files written
with numpy and nibabel, listed, read by the ItemReader inside the pixel-store decode stage, and the
uint8 pixels compared with the window formula computed here in float64,
    u8 = rint(255 * clip((v - lo) / (hi - lo), 0, 1)),   v = stored * scl_slope + scl_inter (NIfTI),
with [lo, hi] = source.intensity, or the min/max of every voxel of the source. A per-slice min-max
(each slice stretched to 0..255, losing the HU scale) fails every value check here."""
import nibabel as nib
import numpy as np
import pytest

from raygen.config import ConfigError
from raygen.data import ingest
from raygen.data.sources import ItemReader, SourceConfig, list_source, resolve_kind
from raygen.data.sources.nifti import nifti_extremes
from raygen.data.store import Store
from raygen.data.transforms import ItemError, TransformConfig

RES = 8  # slices are RES x RES: the ADM crop at RES is then the identity


def expected_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint(255.0 * np.clip((np.asarray(values, np.float64) - lo) / (hi - lo), 0.0, 1.0))


def assert_window(got_u8: np.ndarray, values: np.ndarray, lo: float, hi: float):
    """Equal to the float64 formula; off by one only where the exact value is a rounding tie
    (x.5 +- 1e-3: the pipeline computes in float32)."""
    want = expected_u8(values, lo, hi)
    exact = 255.0 * np.clip((np.asarray(values, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
    diff = np.abs(got_u8.astype(np.int64) - want)
    assert diff.max() <= 1 and np.all(diff[~tie] == 0), (got_u8, want)


def stored_u8(cfg: SourceConfig, keys=None) -> dict:
    """key -> uint8 [H,W] exactly as the pixel store's decode stage makes it (listing -> ItemReader
    -> ADM crop -> rint(255 x)); the three RGB channels must be equal (gray data)."""
    listing = list_source(cfg)
    pixel_cfg = ingest.PixelIngestConfig(source=cfg, transform=TransformConfig(resolution=RES))
    decode = ingest.Decoder(pixel_cfg, listing.kind, listing.info, "pixels")
    keys = listing.keys if keys is None else keys
    out = decode({"index": np.arange(len(keys)), "key": np.array(keys, dtype=object),
                  "label": np.zeros(len(keys), np.int64)})
    assert list(out["error"]) == [""] * len(keys), out["error"]
    images = out["image"]
    assert images.dtype == np.uint8 and images.shape == (len(keys), 3, RES, RES)
    assert (images == images[:, :1]).all()
    return {k: im[0] for k, im in zip(keys, images)}


def two_range_hu(rng, shape) -> tuple[np.ndarray, np.ndarray]:
    """Slice 0 in [-1000, -200] HU (air to fat), slice 1 in [0, 1400] (water to bone), ends included."""
    s0 = rng.uniform(-1000, -200, shape)
    s1 = rng.uniform(0, 1400, shape)
    s0.flat[:2] = -1000, -200
    s1.flat[:2] = 0, 1400
    return s0, s1


# --------------------------------------------------------------------------- NPY


def test_npy_slices_share_one_window_global_and_fixed(tmp_path):
    s0, s1 = two_range_hu(np.random.default_rng(0), (RES, RES))
    vol = np.stack([s0, s1]).astype(np.float32)  # [D,H,W], sliced along axis 0
    np.save(tmp_path / "ct.npy", vol)

    cfg = SourceConfig(kind="auto", path=str(tmp_path))
    assert resolve_kind(cfg) == "npy"
    assert list_source(cfg).info["window"] == [-1000.0, 1400.0]
    got = stored_u8(cfg)
    assert list(got) == ["ct.npy#0", "ct.npy#1"]
    for s in range(2):
        assert_window(got[f"ct.npy#{s}"], vol[s], -1000.0, 1400.0)
    # on one scale, not each stretched to 0..255: air is 0, fat is ~85, water ~106, bone 255
    assert got["ct.npy#0"].min() == 0 and got["ct.npy#0"].max() == 85
    assert got["ct.npy#1"].min() == 106 and got["ct.npy#1"].max() == 255

    fixed = SourceConfig(kind="npy", path=str(tmp_path / "ct.npy"), intensity=[-1000, 1000])
    assert list_source(fixed).info["window"] == [-1000.0, 1000.0]
    got = stored_u8(fixed)
    for s in range(2):
        assert_window(got[f"ct.npy#{s}"], vol[s], -1000.0, 1000.0)
    assert got["ct.npy#0"].max() == 102 and (got["ct.npy#1"][vol[1] >= 1000] == 255).all()  # clipped above hi


# --------------------------------------------------------------------------- NIfTI


def save_nifti(path, raw: np.ndarray, slope: float, inter: float):
    """A NIfTI-1 file storing `raw` as is (int16) with scl_slope/scl_inter in its header; checked
    by reading the raw values and the scaling back from the file."""
    img = nib.Nifti1Image(raw, np.diag([0.7, 0.7, 2.5, 1.0]))
    img.header.set_data_dtype(raw.dtype)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    back = nib.load(str(path)).dataobj
    assert back.dtype == raw.dtype and (back.slope, back.inter) == (slope, inter)
    np.testing.assert_array_equal(np.asarray(back.get_unscaled()), raw)


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_nifti_scaled_to_hu_then_one_window(tmp_path, name):
    slope, inter = 1.5, -1024.0
    s0, s1 = two_range_hu(np.random.default_rng(1), (RES, RES))
    # stored int16 = round((HU - inter) / slope); the HU the file holds is stored * slope + inter
    raw = np.rint((np.stack([s0, s1], axis=-1) - inter) / slope).astype(np.int16)  # [X,Y,Z=2]
    save_nifti(tmp_path / name, raw, slope, inter)
    hu = raw.astype(np.float64) * slope + inter
    assert not np.array_equal(hu, raw)  # the scaling is not the identity

    cfg = SourceConfig(kind="auto", path=str(tmp_path), npy_axis=2)
    listing = list_source(cfg)
    assert listing.kind == "npy" and listing.keys == [f"{name}#0", f"{name}#1"] and listing.problems == []
    lo, hi = listing.info["window"]
    assert (lo, hi) == (hu.min(), hu.max())
    # the streamed min/max is the same in chunks of 7 voxels (many chunks, through gzip for .nii.gz)
    assert nifti_extremes(tmp_path / name, listing.info["files"][name], chunk_bytes=14) == (lo, hi)
    got = stored_u8(cfg)
    for s in range(2):
        assert_window(got[f"{name}#{s}"], hu[:, :, s], lo, hi)
    assert got[f"{name}#0"].max() < 100 and got[f"{name}#1"].min() > 100  # not stretched per slice

    fixed = SourceConfig(kind="npy", path=str(tmp_path / name), npy_axis=-1, intensity=[-1000, 1000])
    got = stored_u8(fixed)
    for s in range(2):
        assert_window(got[f"{name}#{s}"], hu[:, :, s], -1000.0, 1000.0)


def test_slicing_axis_sets_slice_shapes_npy_and_nifti(tmp_path):
    vol = np.random.default_rng(2).normal(size=(3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    save_nifti(tmp_path / "v.nii.gz", np.arange(60, dtype=np.int16).reshape(3, 4, 5), 2.0, -10.0)
    hu = np.arange(60, dtype=np.float64).reshape(3, 4, 5) * 2.0 - 10.0
    for axis in (0, 1, 2):
        cfg = SourceConfig(kind="npy", path=str(tmp_path), npy_axis=axis)
        listing = list_source(cfg)
        reader = ItemReader(listing.kind, listing.info, cfg)
        lo, hi = listing.info["window"]
        assert (lo, hi) == (min(vol.min(), hu.min()), max(vol.max(), hu.max()))  # NPY and NIfTI share one window
        n = vol.shape[axis]
        assert listing.keys == [f"v.nii.gz#{s}" for s in range(n)] + [f"v.npy#{s}" for s in range(n)]
        for s in range(n):
            for key, data in ((f"v.npy#{s}", vol), (f"v.nii.gz#{s}", hu)):
                img = reader.read(key)
                want = np.take(data, s, axis=axis)
                assert img.mode == "F" and img.size == want.shape[::-1], (axis, key, img.size)  # PIL: (W, H)
                np.testing.assert_allclose(np.asarray(img), (want - lo) / (hi - lo), atol=1e-6)


def test_nifti_time_series_sliced_per_volume_and_trailing_singleton(tmp_path):
    raw = np.arange(3 * 4 * 5 * 2, dtype=np.int16).reshape(3, 4, 5, 2)  # [X,Y,Z,T]
    save_nifti(tmp_path / "fmri.nii", raw, 1.0, 0.0)
    save_nifti(tmp_path / "one.nii", raw[..., :1], 1.0, 0.0)  # [X,Y,Z,1]: one volume
    cfg = SourceConfig(kind="npy", path=str(tmp_path), npy_axis=1, intensity=[0, 119])
    listing = list_source(cfg)
    assert listing.keys == [f"fmri.nii#{t}/{s}" for t in range(2) for s in range(4)] + [f"one.nii#{s}" for s in range(4)]
    reader = ItemReader(listing.kind, listing.info, cfg)
    np.testing.assert_allclose(np.asarray(reader.read("fmri.nii#1/2")), raw[:, 2, :, 1] / 119, atol=1e-6)
    np.testing.assert_allclose(np.asarray(reader.read("one.nii#3")), raw[:, 3, :, 0] / 119, atol=1e-6)


def test_corrupt_and_truncated_nifti_are_reported_with_their_names(tmp_path):
    good = np.arange(RES * RES * 2, dtype=np.int16).reshape(RES, RES, 2)
    save_nifti(tmp_path / "good.nii.gz", good, 1.0, 0.0)
    (tmp_path / "corrupt.nii").write_bytes(b"this is not a NIfTI header" * 40)
    (tmp_path / "corrupt.nii.gz").write_bytes(b"nor is this gzip" * 40)
    save_nifti(tmp_path / "short.nii", good, 1.0, 0.0)
    data = (tmp_path / "short.nii").read_bytes()
    (tmp_path / "short.nii").write_bytes(data[: len(data) - 100])
    noise = np.random.default_rng(4).integers(-1000, 1000, (32, 32, 4)).astype(np.int16)  # compresses badly
    save_nifti(tmp_path / "short.nii.gz", noise, 1.0, 0.0)
    whole = (tmp_path / "short.nii.gz").read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(whole[: len(whole) * 2 // 3])  # header intact, data cut

    cfg = SourceConfig(kind="auto", path=str(tmp_path), npy_axis=2)
    assert resolve_kind(cfg) == "npy"
    listing = list_source(cfg)
    reasons = {p["path"]: p["reason"] for p in listing.problems}
    assert set(reasons) == {"corrupt.nii", "corrupt.nii.gz", "short.nii", "short.nii.gz"}
    assert "unreadable NIfTI file" in reasons["corrupt.nii"] and "corrupt.nii" in reasons["corrupt.nii"]
    assert "not a gzip file" in reasons["corrupt.nii.gz"]
    assert "truncated NIfTI file" in reasons["short.nii"]
    assert "unreadable NIfTI data" in reasons["short.nii.gz"]
    assert listing.keys == ["good.nii.gz#0", "good.nii.gz#1"]
    with pytest.raises(ConfigError, match=r"corrupt\.nii: unreadable NIfTI file.*ingest\.on_error=skip"):
        list_source(cfg, on_error="fail")

    # with a fixed window the .nii.gz data is not read while listing: its slices fail one by one, named
    fixed = SourceConfig(kind="npy", path=str(tmp_path), npy_axis=2, intensity=[0, 10])
    fl = list_source(fixed)
    assert "short.nii.gz#0" in fl.keys
    with pytest.raises(ItemError, match="unreadable array item"):
        ItemReader(fl.kind, fl.info, fixed).read("short.nii.gz#0")


# --------------------------------------------------------------------------- the pixel store job


@pytest.mark.slow  # 7-20 s measured on 2 CPU cores (Ray Data actor start-up), plus the session cluster (~8-11 s)
def test_encode_pixels_stores_every_nifti_slice_windowed(ray_cluster, tmp_path):
    """`jobs/encode_pixels.py source.path=<dir> source.npy_axis=2 ...` (its main() in-process on the
    session cluster) on two NIfTI volumes with different scalings: all 5 slices stored, one window."""
    rng = np.random.default_rng(3)
    vols = {"a.nii.gz": (rng.integers(0, 1000, (RES, RES, 3)).astype(np.int16), 1.0, -1024.0),
            "b.nii": (rng.integers(-500, 500, (RES, RES, 2)).astype(np.int16), 2.0, 100.0)}
    data = tmp_path / "scans"
    data.mkdir()
    for name, (raw, slope, inter) in vols.items():
        save_nifti(data / name, raw, slope, inter)
    hu = {name: raw.astype(np.float64) * slope + inter for name, (raw, slope, inter) in vols.items()}
    lo, hi = min(v.min() for v in hu.values()), max(v.max() for v in hu.values())

    store_dir = ingest.main("encode_pixels", "pixels", [
        f"source.path={data}", "source.npy_axis=2", f"transform.resolution={RES}", f"store.path={tmp_path / 'store'}",
        "store.shard_size=2", "ingest.decode_actors=1"])
    s = Store(store_dir)
    assert s.meta["source"]["resolved_kind"] == "npy" and s.meta["source"]["info"]["window"] == [lo, hi]
    assert s.meta["counts"]["stored"] == 5 and s.meta["counts"]["skipped"] == 0
    keys = [str(k) for k in s.keys()]
    assert sorted(keys) == ["a.nii.gz#0", "a.nii.gz#1", "a.nii.gz#2", "b.nii#0", "b.nii#1"]
    images = s.array("image")[:]
    for pos, key in enumerate(keys):
        name, _, z = key.partition("#")
        assert (images[pos] == images[pos, :1]).all()
        assert_window(images[pos, 0], hu[name][:, :, int(z)], lo, hi)
