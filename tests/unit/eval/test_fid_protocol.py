"""EDM's FID protocol (raygen.eval.fid_protocol, the code of jobs/fid.py): seed lists, float64 moments against
numpy, seed ranges, and `ref`/`calc` on real digits written as PNGs and as an EDM dataset_tool zip, checked
against a direct computation (features of the same extractor, numpy mean/cov, scipy.linalg.sqrtm)."""
from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from raygen.config import ConfigError
from raygen.data.embedded import digits
from raygen.eval import fid_protocol as fp
from raygen.eval.digits_classifier import DigitsClassifier

SEED0 = 999_900  # generated seeds that cross 999999 -> 1000000: file names sort wrongly as text, rightly as numbers


# ------------------------------------------------------------------------------------------- helpers


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def write_generated(folder, images: np.ndarray, seeds) -> None:
    """generate.py's layout: <seed//1000*1000:06d>/<seed:06d>.png."""
    for img, s in zip(images, seeds):
        path = folder / f"{s // 1000 * 1000:06d}" / f"{s:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(img))


def write_edm_zip(path, images: np.ndarray, labels: np.ndarray) -> None:
    """EDM dataset_tool's archive: uncompressed PNGs at {i:08d}[:5]/img{i:08d}.png plus dataset.json."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        names = []
        for i, img in enumerate(images):
            name = f"{i:08d}"[:5] + f"/img{i:08d}.png"
            zf.writestr(name, png_bytes(img))
            names.append([name, int(labels[i])])
        zf.writestr("dataset.json", json.dumps({"labels": names}))


def digit_features(images: np.ndarray, batch: int = 250) -> np.ndarray:
    """The digits classifier's features of uint8 [N, H, W, 1] images, computed here directly, in batches as
    the job's (the float32 network's output moves by ~1e-7 with the batch size)."""
    net = DigitsClassifier(images.shape[1])
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 127.5 - 1
    return np.concatenate([net(x[i:i + batch]) for i in range(0, len(x), batch)])


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) with numpy statistics and scipy's sqrtm, as EDM's fid.py."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # the product is singular (dead ReLU features): the real part is still exact
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root.real))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The 1437 train digits as an EDM zip (the reference data set), the 360 test digits as 'generated' PNGs
    whose seeds are a shuffle of SEED0..SEED0+359, and the same as a samples.npz stored in another order."""
    root = tmp_path_factory.mktemp("fid")
    train, train_labels = digits(16, "train")
    test, _ = digits(16, "test")
    write_edm_zip(root / "digits-train.zip", train, train_labels)
    seeds = SEED0 + np.random.default_rng(0).permutation(len(test))
    write_generated(root / "generated", test, seeds)
    order = np.random.default_rng(1).permutation(len(test))
    np.savez(root / "samples.npz", images=test[order], seeds=seeds[order], labels=np.zeros(len(test), np.int64))
    by_seed = test[np.argsort(seeds)]  # the images in seed order
    return {"root": root, "train": train, "by_seed": by_seed}


def run(argv) -> dict:
    return fp.main([str(a) for a in argv])


def reference_of(data, name: str):
    """`jobs/fid.py ref` of the zip (train) or of the generated folder, made once per module."""
    dest = data["root"] / f"{name}-ref.npz"
    if not dest.is_file():
        run(["ref", "--data", data["root"] / ("digits-train.zip" if name == "train" else name), "--dest", dest])
    return dest


# ------------------------------------------------------------------------------------------- seeds


def test_seed_lists_parse_as_in_edm_and_print_back():
    assert fp.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert fp.parse_seeds("0,5,10-12") == [0, 5, 10, 11, 12]
    assert fp.parse_seeds(7) == [7]
    assert fp.seeds_text(fp.parse_seeds("0,5,10-12,3")) == "0,5,10-12,3"
    assert fp.seeds_text(range(50000)) == "0-49999"
    for bad, words in (("5-2", "ends before"), ("1,2,2", "more than once"), ("a-3", "neither"), ("", "EDM")):
        with pytest.raises(ConfigError, match=words):
            fp.parse_seeds(bad)


def test_seed_ranges_follow_the_protocol():
    assert fp.seed_ranges(150_000, 3, 50_000, False) == [range(0, 50_000), range(50_000, 100_000),
                                                         range(100_000, 150_000)]
    assert fp.seed_ranges(160_000, 3, 50_000, False)[-1] == range(100_000, 150_000)  # extra images are left out
    with pytest.raises(ConfigError, match=r"--num 50000 x --seeds 3 needs 150000.*--allow-small"):
        fp.seed_ranges(149_999, 3, 50_000, False)
    assert fp.seed_ranges(100, 3, 50_000, True) == [range(0, 33), range(33, 66), range(66, 99)]
    with pytest.raises(ConfigError, match=">= 2 images"):
        fp.seed_ranges(5, 3, 50_000, True)


# ------------------------------------------------------------------------------------------- statistics


def test_moments_in_chunks_give_numpys_mean_and_unbiased_covariance():
    rng = np.random.default_rng(0)
    f = rng.normal(3.0, 2.0, size=(1000, 16)) @ rng.normal(size=(16, 16))
    a, b = fp.Moments.zeros(16), fp.Moments.zeros(16)
    for i in range(0, 600, 128):
        a.add(f[i:min(i + 128, 600)])
    b.add(f[600:])
    mu, sigma = (a + b).stats()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------- ref and calc


def test_ref_of_an_edm_zip_holds_mu_sigma_and_the_features_statistics(data):
    dest = data["root"] / "train-ref.npz"
    out = run(["ref", "--data", data["root"] / "digits-train.zip", "--dest", dest])
    assert out["count"] == len(data["train"]) and out["extractor"] == "digits-r16"
    with np.load(dest) as z:
        assert {"mu", "sigma", "extractor", "count"} <= set(z.files)
        assert z["mu"].dtype == np.float64 and z["sigma"].shape == (128, 128)
        f = digit_features(data["train"])
        np.testing.assert_allclose(z["mu"], f.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(z["sigma"], np.cov(f, rowvar=False), rtol=1e-8, atol=1e-10)
        assert str(z["extractor"]) == "digits-r16" and int(z["count"]) == 1437


def test_calc_of_the_reference_images_themselves_is_zero(data, capsys):
    dest = reference_of(data, "generated")
    out = run(["calc", "--images", data["root"] / "generated", "--ref", dest, "--num", 360])
    assert abs(out["fid"]) < 1e-6
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fid: ")


def test_calc_reports_every_seed_range_and_the_minimum_against_a_direct_computation(data, capsys):
    ref = reference_of(data, "train")
    dest = data["root"] / "calc.json"
    out = run(["calc", "--images", data["root"] / "generated", "--ref", ref, "--num", 120, "--seeds", 3,
               "--dest-json", dest])
    f_ref = digit_features(data["train"])
    expected = [direct_fid(digit_features(data["by_seed"][k * 120:(k + 1) * 120]), f_ref) for k in range(3)]
    got = [r["fid"] for r in out["ranges"]]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert out["fid"] == min(got) and len(set(np.round(got, 3))) == 3  # three different ranges
    assert [(r["first_seed"], r["last_seed"]) for r in out["ranges"]] == [
        (SEED0 + 120 * k, SEED0 + 120 * k + 119) for k in range(3)]
    assert json.loads(dest.read_text())["fid"] == out["fid"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"fid: {out['fid']:g}"

    # the same images as an npz stored in another order: ordered by seed, the same ranges and values
    npz = run(["calc", "--images", data["root"] / "samples.npz", "--ref", ref, "--num", 120, "--seeds", 3])
    np.testing.assert_allclose([r["fid"] for r in npz["ranges"]], got, rtol=1e-12)
    assert (data["root"] / "samples.fid.json").is_file()


def test_calc_with_fewer_images_than_num_stops_naming_num_and_allow_small(data, capsys):
    ref = reference_of(data, "generated")
    with pytest.raises(SystemExit) as e:
        run(["calc", "--images", data["root"] / "generated", "--ref", ref])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "found 360 images" in err and "--num 50000" in err and "--allow-small" in err
    out = run(["calc", "--images", data["root"] / "generated", "--ref", ref, "--allow-small", "--seeds", 3])
    assert [r["count"] for r in out["ranges"]] == [120, 120, 120]


def test_a_pixel_store_gives_the_same_reference_as_its_images(data, tmp_path):
    from raygen.data.store import LISTING, write_meta, write_shard

    images = data["train"][:200]
    store = tmp_path / "store"
    write_shard(store, {"index": np.arange(200), "label": np.zeros(200, np.int64),
                        "image": np.ascontiguousarray(images.transpose(0, 3, 1, 2))}, [])
    np.savez(store / LISTING, keys=np.array([f"k{i}" for i in range(200)]), labels=np.zeros(200, np.int64))
    write_meta(store, {"kind": "pixels", "counts": {"stored": 200}, "class_names": ["0"],
                       "arrays": {"image": {"shape": [200, 1, 16, 16], "dtype": "uint8"}}})
    folder = tmp_path / "pngs"
    write_generated(folder, images, range(200))
    a = run(["ref", "--data", store, "--dest", tmp_path / "a.npz"])
    b = run(["ref", "--data", folder, "--dest", tmp_path / "b.npz"])
    assert a["count"] == b["count"] == 200
    with np.load(tmp_path / "a.npz") as za, np.load(tmp_path / "b.npz") as zb:
        np.testing.assert_array_equal(za["mu"], zb["mu"])
        np.testing.assert_array_equal(za["sigma"], zb["sigma"])


def test_the_digits_space_refuses_other_sizes_and_a_reference_of_another_space(tmp_path, capsys):
    write_generated(tmp_path / "big", np.zeros((4, 64, 64, 3), np.uint8), range(4))
    with pytest.raises(SystemExit):
        run(["ref", "--data", tmp_path / "big", "--dest", tmp_path / "r.npz"])
    err = capsys.readouterr().err
    assert "16x16 or 32x32" in err and "--features inception" in err
    np.savez(tmp_path / "nvlabs.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # an NVlabs file: mu and sigma only
    with pytest.raises(ConfigError, match="inception-v3-edm.*--features inception"):
        fp.load_reference(str(tmp_path / "nvlabs.npz"), fp.FeatureSpec("digits", resolution=16))
    mu, _, _ = fp.load_reference(str(tmp_path / "nvlabs.npz"), fp.FeatureSpec("inception", weights="w"))
    assert mu.shape == (2048,)


def test_rgb_images_enter_the_digits_space_as_their_luma(tmp_path):
    gray = digits(16, "test")[0][:50]
    rgb = np.repeat(gray, 3, axis=-1)
    space = fp.DigitsFeatures(16)
    np.testing.assert_array_equal(space(rgb), space(gray))


class ProbeNet(torch.nn.Module):
    """Stands in for the Inception TorchScript: its 'features' say what input it was given."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        is_uint8 = torch.full((x.shape[0], 1), float(x.dtype == torch.uint8))
        size = torch.full((x.shape[0], 1), float(x.shape[2]))
        channels = torch.full((x.shape[0], 1), float(x.shape[1]))
        return torch.cat([is_uint8, size, channels, x.float().mean(dim=(1, 2, 3)).unsqueeze(1)], 1)


def test_inception_input_edm_feeds_uint8_at_native_size_and_clean_resizes(tmp_path):
    weights = tmp_path / "probe.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format NVlabs ships Inception in
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(ProbeNet()).save(str(weights))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    edm = fp.InceptionFeatures(str(weights), "edm")(images)
    np.testing.assert_array_equal(edm[:, :3], [[1, 32, 3]] * 3)  # uint8, 32x32, gray repeated to RGB (EDM's fid.py)
    np.testing.assert_allclose(edm[:, 3], images.reshape(3, -1).mean(1), rtol=1e-6)
    clean = fp.InceptionFeatures(str(weights), "clean")(images)
    np.testing.assert_array_equal(clean[:, :3], [[0, 299, 3]] * 3)  # float, resized to 299 (clean-fid)
