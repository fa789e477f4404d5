"""The Ray Data ingest as a user runs it (`jobs/encode_latents.py`, `jobs/encode_siglip.py`,
`jobs/inspect_latents.py` entry points, in-process on the session's Ray cluster) on a real JPEG
tree with every kind of bad input, against the same tiny models called directly."""
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raygen.data import embedded, ingest
from raygen.data.sources import ItemReader, SourceConfig, write_image_folder
from raygen.data.store import Store, StoreError
from raygen.data.transforms import TransformConfig, apply

PER_CLASS = 12
BAD = {  # file -> a word its skip reason must contain
    "train/0/corrupt.jpg": "corrupt",
    "train/1/truncated.jpg": "truncated",
    "train/2/empty.jpg": "zero-byte",
    "train/3/notes.txt": "not an image",
    "train/4/small.jpg": "smaller than",
    "train/empty_class": "empty class folder",
    "train/zz_unreadable": "",  # a class folder that cannot be listed (dangling link: root ignores chmod)
}


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A random-weight tiny AutoencoderKL saved like a hub checkpoint (exact-match tests need no training)."""
    from diffusers import AutoencoderKL

    from raygen.data.tiny_models import tiny_vae_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_vae")
    AutoencoderKL(**tiny_vae_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory):
    """ImageNet layout `train/<class>/*.jpg` of real digits (32x32 JPEGs) plus one of every bad input."""
    root = tmp_path_factory.mktemp("imagenet_like")
    images, labels = embedded.digits(32, "train")
    keep = np.concatenate([np.nonzero(labels == c)[0][:PER_CLASS] for c in range(10)])
    write_image_folder(images[keep], labels[keep], embedded.digits_class_names(), root, split="train")
    good = next((root / "train" / "5").iterdir()).read_bytes()
    (root / "train/0/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 20)
    (root / "train/1/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train/2/empty.jpg").write_bytes(b"")
    (root / "train/3/notes.txt").write_text("labels are in the folder names")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "train/4/small.jpg")
    (root / "train/empty_class").mkdir()
    os.symlink(root / "does_not_exist", root / "train/zz_unreadable")
    return root


def encode(job: str, kind: str, argv: list[str]) -> Path:
    """The job's main() in-process (the session cluster is reused, as under `ray job submit`)."""
    return ingest.main(job, kind, argv)


def vae_argv(tree, model, store, *extra):
    return [f"source.path={tree}", "source.split=train", "transform.resolution=32", f"encoder.model={model}",
            "encoder.posterior=mean", f"store.path={store}", "store.shard_size=32", *extra]


@pytest.fixture(scope="module")
def mean_store(ray_cluster, jpeg_tree, tiny_vae, tmp_path_factory):
    store = tmp_path_factory.mktemp("stores") / "mean"
    encode("encode_latents", "vae", vae_argv(jpeg_tree, tiny_vae, store, "store.flip_copies=true",
                                             "store.dtype=float32"))
    return Store(store)


def direct_inputs(store: Store, positions) -> torch.Tensor:
    """The store's images read and cropped again outside Ray, as [-1,1] NCHW."""
    src = SourceConfig(**{k: v for k, v in store.meta["source"].items() if k not in ("resolved_kind", "info")})
    reader = ItemReader(store.meta["source"]["resolved_kind"], store.meta["source"]["info"], src)
    tcfg = TransformConfig(**store.meta["preprocessing"])
    arr = [apply(tcfg, reader.read(str(k)), np.random.default_rng(0)) for k in store.keys(positions)]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2) * 2 - 1


def test_bad_inputs_are_skipped_recorded_and_counted(mean_store, jpeg_tree):
    s = mean_store
    assert len(s) == 10 * PER_CLASS
    skipped = [json.loads(x) for x in (s.path / "skipped.jsonl").read_text().splitlines()]
    by_path = {r["path"]: r["reason"] for r in skipped}
    for path, word in BAD.items():
        match = [p for p in by_path if p == path or p.endswith(path)]
        assert match, f"{path} is not in skipped.jsonl: {by_path}"
        assert word in by_path[match[0]], (path, by_path[match[0]])
    assert s.meta["counts"]["skipped"] == len(skipped) == len(BAD)
    assert s.meta["counts"]["listed"] == 10 * PER_CLASS + 5  # the five bad files were listed, then skipped
    # nothing dropped: every file of the tree is either stored or skipped
    files = {str(p.relative_to(jpeg_tree)) for p in jpeg_tree.rglob("*") if p.is_file()}
    assert files == set(s.keys()) | ({p for p in by_path} & files)
    # the empty class keeps its index so labels still match folder order
    assert s.class_names == [*map(str, range(10)), "empty_class", "zz_unreadable"]
    assert sorted(np.unique(s.labels)) == list(range(10))
    assert all(len(s.class_indices(c)) == PER_CLASS for c in range(10)) and len(s.class_indices(10)) == 0


def test_latents_are_the_scaled_posterior_mean_and_flips_encode_the_flipped_image(mean_store, tiny_vae):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    pos = np.arange(0, len(mean_store), 7)
    x = direct_inputs(mean_store, pos)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        want_flip = vae.encode(x.flip(-1)).latent_dist.mean * vae.config.scaling_factor
    assert mean_store.meta["encoder"]["scaling_factor"] == vae.config.scaling_factor == 0.18215
    torch.testing.assert_close(torch.from_numpy(mean_store.array("latent")[pos]), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(mean_store.array("latent_flip")[pos]), want_flip, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(want, want_flip, atol=1e-3)  # the flip is not a no-op


def test_posterior_sample_is_mean_plus_std_noise_and_reproducible(ray_cluster, jpeg_tree, tiny_vae, mean_store, tmp_path):
    from diffusers import AutoencoderKL

    from raygen.data.encoders import EncoderConfig, VAEEncoder

    # also the GPU-style layout: separate CPU decode actors feeding encoder actors
    store = Store(encode("encode_latents", "vae", vae_argv(jpeg_tree, tiny_vae, tmp_path / "s", "ingest.fuse_decode=false",
                                                           "encoder.posterior=sample", "store.dtype=float32")))
    assert store.meta["encoder"]["posterior"] == "sample"
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = direct_inputs(store, np.arange(len(store)))
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    z = torch.from_numpy(store.array("latent")[:]) / vae.config.scaling_factor
    eps = (z - post.mean) / post.std
    assert abs(eps.mean().item()) < 0.02 and 0.97 < eps.std().item() < 1.03  # standard normal noise
    assert not torch.allclose(z, post.mean, atol=1e-3)
    # the same image gets the same draw in any batch: re-encode two rows directly in another batching
    enc = VAEEncoder(EncoderConfig(model=tiny_vae, posterior="sample"), store_dtype="float32")
    rows = [3, 17]
    batch = {"index": store.listing_index[rows], "error": np.array(["", ""], dtype=object),
             "image": x[rows].numpy()}
    np.testing.assert_allclose(enc(batch)["latent"], store.array("latent")[rows], atol=1e-5)


def test_crash_then_rerun_finishes_without_duplicates_or_gaps(ray_cluster, jpeg_tree, tiny_vae, mean_store, tmp_path):
    argv = vae_argv(jpeg_tree, tiny_vae, tmp_path / "crashy", "store.flip_copies=true", "store.dtype=float32")
    with pytest.raises(Exception, match="injected crash"):
        encode("encode_latents", "vae", [*argv, "ingest.crash_after_shards=2"])
    partial = sorted((tmp_path / "crashy" / "shards").glob("part-*"))
    assert 2 <= len(partial) < 4  # 120 good + 5 bad items in shards of 32
    with pytest.raises(StoreError, match="not finished"):
        Store(tmp_path / "crashy")
    encode("encode_latents", "vae", argv)  # the same command again
    s = Store(tmp_path / "crashy")
    assert all(p.exists() for p in partial), "finished shards are kept, not rewritten"
    idx = np.concatenate([np.load(d / "index.npy") for d in s.shards])
    assert len(idx) == len(np.unique(idx)) == len(mean_store)  # no duplicates, nothing missing
    np.testing.assert_array_equal(s.listing_index, mean_store.listing_index)
    np.testing.assert_array_equal(s.array("latent")[:], mean_store.array("latent")[:])
    skipped = (s.path / "skipped.jsonl").read_text().splitlines()
    assert len(skipped) == len(set(skipped)) == len(BAD)
    # a third run has nothing left to do and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in s.shards}
    encode("encode_latents", "vae", argv)
    assert {p.name: p.stat().st_mtime_ns for p in Store(tmp_path / "crashy").shards} == before


def test_on_error_fail_stops_naming_the_file(ray_cluster, tiny_vae, tmp_path, capsys):
    images, labels = embedded.digits(32, "train")
    root = write_image_folder(images[:20], labels[:20], embedded.digits_class_names(), tmp_path / "src")
    (root / "7" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SystemExit) as e:
        encode("encode_latents", "vae", [f"source.path={root}", "transform.resolution=32", f"encoder.model={tiny_vae}",
                                         f"store.path={tmp_path / 's'}", "ingest.on_error=fail"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "7/broken.jpg" in err and "ingest.on_error=skip" in err
    # a listing-time problem (an empty class folder) stops before any work, naming the folder
    (root / "8").mkdir(exist_ok=True)
    for f in (root / "8").iterdir():
        f.unlink()
    with pytest.raises(SystemExit) as e:
        encode("encode_latents", "vae", [f"source.path={root}", "transform.resolution=32", f"encoder.model={tiny_vae}",
                                         f"store.path={tmp_path / 's2'}", "ingest.on_error=fail"])
    assert e.value.code == 2 and "8" in capsys.readouterr().err


def test_zip_with_dataset_json_records_a_missing_file(ray_cluster, tiny_vae, tmp_path):
    images, labels = embedded.digits(32, "train")
    zpath = tmp_path / "data.zip"
    entries = []
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(16):
            name = f"img{i:05d}.png"
            buf = __import__("io").BytesIO()
            Image.fromarray(images[i, ..., 0]).save(buf, format="PNG")
            zf.writestr(name, buf.getvalue())
            entries.append([name, int(labels[i])])
        entries.append(["img99999.png", 3])  # named by the label file, absent from the archive
        zf.writestr("dataset.json", json.dumps({"labels": entries}))
    s = Store(encode("encode_latents", "vae", [f"source.path={zpath}", "transform.resolution=32",
                                               f"encoder.model={tiny_vae}", f"store.path={tmp_path / 's'}"]))
    assert s.meta["source"]["resolved_kind"] == "zip" and len(s) == 16
    np.testing.assert_array_equal(s.labels, labels[:16])
    skipped = [json.loads(x) for x in (s.path / "skipped.jsonl").read_text().splitlines()]
    assert [r["path"] for r in skipped] == ["img99999.png"] and "missing" in skipped[0]["reason"]


def test_config_errors_name_the_key(ray_cluster, jpeg_tree, tiny_vae, mean_store, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        encode("encode_latents", "vae", vae_argv(jpeg_tree, tmp_path / "no_such_model", tmp_path / "s"))
    assert e.value.code == 2 and "encoder.model" in capsys.readouterr().err
    # a different config into an existing store is refused instead of mixing two stores
    with pytest.raises(SystemExit) as e:
        encode("encode_latents", "vae", vae_argv(jpeg_tree, tiny_vae, mean_store.path, "transform.resolution=16"))
    assert e.value.code == 2 and "different config" in capsys.readouterr().err
    assert len(Store(mean_store.path)) == len(mean_store)
    assert "resolution: 32" in (mean_store.path / "config.yaml").read_text()  # the refused config did not land


def test_siglip_tokens_are_the_last_hidden_state(ray_cluster, jpeg_tree, tmp_path):
    from transformers import AutoImageProcessor, SiglipVisionModel

    from raygen.data.tiny_models import tiny_siglip

    model = tiny_siglip(tmp_path / "siglip", steps=0)  # untrained is enough to compare the stored tokens
    s = Store(encode("encode_siglip", "siglip", [f"source.path={jpeg_tree}", "source.split=train",
                                                 f"encoder.model={model}", f"store.path={tmp_path / 's'}",
                                                 "store.dtype=float32"]))
    assert s.meta["kind"] == "siglip" and len(s) == 10 * PER_CLASS + 1  # the 20x20 image is fine: no crop
    assert s.meta["encoder"]["processor"]["pixel_range"] == [-1.0, 1.0]
    pos = np.arange(0, len(s), 5)
    proc = AutoImageProcessor.from_pretrained(model)
    net = SiglipVisionModel.from_pretrained(model).eval()
    src = SourceConfig(path=str(jpeg_tree), split="train", kind="class_folders")
    reader = ItemReader("class_folders", s.meta["source"]["info"], src)
    imgs = [reader.read(str(k)).convert("RGB") for k in s.keys(pos)]
    with torch.no_grad():
        o = net(**proc(images=imgs, return_tensors="pt"), output_hidden_states=True)
    tokens = torch.from_numpy(s.array("tokens")[pos])
    torch.testing.assert_close(tokens, o.last_hidden_state, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(tokens, o.hidden_states[0], atol=1e-2)  # not the patch embeddings (FSDiT's bug)
    pooled = torch.from_numpy(s.array("pooled")[pos])
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(o.pooler_output, dim=-1), atol=1e-4, rtol=1e-4)


def test_siglip2_patch_tokens_and_mask(ray_cluster, jpeg_tree, tmp_path):
    """SigLIP2 (the default encoder): its processor patchifies to a padded token budget; the store
    keeps the mask, and tokens equal the model's last_hidden_state."""
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    model = tmp_path / "siglip2"
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_patches=16, patch_size=8)).save_pretrained(model)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(model)
    s = Store(encode("encode_siglip", "siglip", [f"source.path={jpeg_tree}", "source.split=train",
                                                 f"encoder.model={model}", f"store.path={tmp_path / 's'}",
                                                 "store.dtype=float32", "encoder.normalize_pooled=false"]))
    assert s.meta["encoder"]["vision_model"] == "Siglip2VisionModel"
    assert s.meta["arrays"]["tokens"]["shape"] == [16, 32] and "token_mask" in s.meta["arrays"]
    pos = np.arange(0, len(s), 9)
    proc = Siglip2ImageProcessor.from_pretrained(model)
    net = Siglip2VisionModel.from_pretrained(model).eval()
    reader = ItemReader("class_folders", s.meta["source"]["info"], SourceConfig(path=str(jpeg_tree), split="train",
                                                                                kind="class_folders"))
    inputs = proc(images=[reader.read(str(k)).convert("RGB") for k in s.keys(pos)], return_tensors="pt")
    with torch.no_grad():
        o = net(**inputs)
    np.testing.assert_array_equal(s.array("token_mask")[pos], inputs["pixel_attention_mask"].bool().numpy())
    torch.testing.assert_close(torch.from_numpy(s.array("tokens")[pos]), o.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(s.array("pooled")[pos]), o.pooler_output, atol=1e-4, rtol=1e-4)


def test_npy_volume_slices_keep_one_intensity_scale(ray_cluster, tiny_vae, tmp_path):
    """A volume sliced along an axis: every slice is scaled by the volume's global window (the SDD
    a per-slice min-max would make a dim slice as bright as a bright one)."""
    vol = np.stack([np.full((40, 40), 100.0 * (i + 1) / 8) for i in range(8)]).astype(np.float32)
    vol[:, 10:30, 10:30] += 5.0
    np.save(tmp_path / "vol.npy", vol)
    s = Store(encode("encode_latents", "vae", [f"source.path={tmp_path / 'vol.npy'}", "transform.resolution=32",
                                               f"encoder.model={tiny_vae}", "encoder.posterior=mean",
                                               f"store.path={tmp_path / 's'}", "store.dtype=float32"]))
    assert s.meta["source"]["resolved_kind"] == "npy" and len(s) == 8
    assert list(s.keys()) == [f"vol.npy#{i}" for i in range(8)]
    x = direct_inputs(s, np.arange(8))
    means = x.mean(dim=(1, 2, 3))
    assert (means.diff() > 0.1).all(), means  # brighter slice -> brighter input, not all the same
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    # constant slices make GroupNorm divide by a tiny variance: other thread counts differ by ~1e-4
    torch.testing.assert_close(torch.from_numpy(s.array("latent")[:]), want, atol=5e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.extended  # ~2 min; left out of the default run for time when EDM and SDD joined (pytest -m extended)
def test_dit_and_drifting_train_on_a_latent_store(ray_cluster, tiny_vae, tmp_path, job_env):
    """`jobs/dit.py --preset latent_smoke` reads a store of the embedded digits through
    get_dataset_shard, samples latents and decodes them through the store's VAE; evaluation scores
    the decoded pixels against the digits the store was made from. `jobs/drifting.py --preset smoke
    stage.latents=<store>` does the same with memory-mapped class-balanced batches."""
    import subprocess
    import sys

    store = encode("encode_latents", "vae", ["--preset", "digits", f"encoder.model={tiny_vae}",
                                             f"store.path={tmp_path / 'digits'}"])
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "jobs" / "dit.py"), "--preset", "latent_smoke",
                           f"data.path={store}", "eval.num_samples=20", "eval.sweep=null",
                           "--runs-root", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env=job_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30 and all(np.isfinite(r["loss"]) for r in records)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["fid_features"] == "digits" and metrics["num_samples"] == 20  # scored on decoded pixels
    grid = Image.open(run_dir / "eval" / "samples.png")
    assert grid.size[0] >= 10 * 32  # decoded 32x32 digits, one column per class
    assert (run_dir / "samples" / "step_0000030.png").is_file()

    # the drifting chain on the same store: MAE and generator in latent space, samples decoded for scoring
    proc = subprocess.run([sys.executable, str(root / "jobs" / "drifting.py"), "--preset", "smoke",
                           f"stage.latents={store}", "eval.num_samples=20", "--runs-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=job_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))
    mae = torch.load(run_dir / "mae" / "net_ema.pt", weights_only=False)
    assert mae["net"]["kwargs"]["in_channels"] == 4 and mae["net"]["kwargs"]["input_size"] == 16  # the latents' shape
    sweep = json.loads((run_dir / "eval" / "omega_sweep.json").read_text())
    assert [r["omega"] for r in sweep] == [1.0, 2.0] and all("fid" in r and "class_accuracy" in r for r in sweep)
    grid = Image.open(run_dir / "eval" / "samples_omega1.png")
    assert grid.size[0] >= 10 * 32  # decoded 32x32 digits, one column per class


def test_store_random_access_and_dataset(mean_store, ray_cluster):
    s = mean_store
    parts = {n: [np.load(d / f"{n}.npy") for d in s.shards] for n in ("index", "latent")}
    order = np.argsort(np.concatenate(parts["index"]))
    full = np.concatenate(parts["latent"])[order]
    idx = np.array([5, 0, 5, len(s) - 1, 63, 32])  # unsorted, repeated, across shards
    np.testing.assert_array_equal(s.array("latent")[idx], full[idx])
    np.testing.assert_array_equal(s.array("latent")[7], full[7])
    np.testing.assert_array_equal(s.array("latent")[10:50:3], full[10:50:3])
    for c in range(10):
        assert (s.labels[s.class_indices(c)] == c).all()
    pos = s.sample_class_balanced([3, 7, 3], 64, np.random.default_rng(0))
    assert pos.shape == (3, 64) and (s.labels[pos] == np.array([[3], [7], [3]])).all()
    assert len(np.unique(pos[0])) == PER_CLASS  # 64 draws with replacement cover all 12 items of the class
    np.testing.assert_array_equal(pos, s.sample_class_balanced([3, 7, 3], 64, np.random.default_rng(0)))
    with pytest.raises(StoreError, match="empty_class"):
        s.sample_class_balanced([10], 4, np.random.default_rng(0))
    rows = s.dataset(["latent"]).take_all()
    assert len(rows) == 2 * len(s)  # plain + flipped copies
    got = np.stack([r["latent"] for r in rows])
    want = np.concatenate([np.concatenate(parts["latent"]), np.concatenate(
        [np.load(d / "latent_flip.npy") for d in s.shards])])
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))


@pytest.mark.slow  # trains the tiny VAE once (~80 s of its ~140 s)
@pytest.mark.extended  # left out of the default run for time (pytest -m extended runs it)
def test_latents_decode_back_to_the_input_and_inspect_writes_a_grid(ray_cluster, jpeg_tree, tmp_path):
    from raygen.data.encoders import decode_latents
    from raygen.data.inspect import main as inspect_main
    from raygen.data.tiny_models import resolve_model

    model = resolve_model("raygen/tiny-vae")  # trained once into the cache (~80 s)
    s = Store(encode("encode_latents", "vae", vae_argv(jpeg_tree, model, tmp_path / "s")))
    x = direct_inputs(s, np.arange(len(s)))
    recon = decode_latents(s.meta, s.array("latent")[:])
    err = ((recon - x) ** 2).mean().item()
    other = ((recon - x.roll(1, 0)) ** 2).mean().item()  # a different image of the set
    assert err < 0.05 and err < other / 10, (err, other)
    png = inspect_main([f"run_or_store={s.path}", "num=16"])
    im = Image.open(png)
    assert im.size[0] > im.size[1] > 0  # 16 pairs: 8 columns of (original, decoded) x 4 rows


def test_every_shipped_preset_loads(mean_store, jpeg_tree, tmp_path):
    """Each preset's keys exist and validate, given the data path it asks for on the command line."""
    from raygen import recipes as registry
    from raygen.cli import load_resolved, preset_dir
    from raygen.config import load_config
    from raygen.data.ingest import IngestConfig, PixelIngestConfig

    recipes = (("dit", None), ("encode_latents", IngestConfig), ("encode_siglip", IngestConfig),
               ("encode_pixels", PixelIngestConfig), ("drifting", None), ("latent_mae", None), ("edm", None),
               ("sdd", None), ("diffit", None))
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    np.save(volumes / "ct.npy", np.zeros((4, 8, 8), np.int16))
    seen = set()
    for recipe, cls in recipes:
        for yaml_file in sorted(preset_dir(recipe).glob("*.yaml")):
            text = yaml_file.read_text()
            over = []
            if recipe in ("dit", "latent_mae", "diffit") and "source: latents" in text:
                over = [f"data.path={mean_store.path}"]
            elif recipe == "drifting" and yaml_file.stem.startswith("imagenet"):
                # the test store has 12 classes, ImageNet presets ask for 64-128 distinct ones per step
                over = [f"stage.latents={mean_store.path}", "batch.distinct_classes=false"]
            elif recipe == "dit" and "image_folder" in text:
                over = [f"data.path={jpeg_tree / 'train'}"]
            elif recipe in ("edm", "sdd") and yaml_file.stem not in ("default", "smoke"):  # raw files (data.source=files)
                over = [f"data.path={volumes if yaml_file.stem == 'volumes' else jpeg_tree}"]
            elif recipe == "diffit" and yaml_file.stem not in ("default", "smoke"):  # a pixel store, or a folder
                over = ["data.source=image_folder", f"data.path={jpeg_tree / 'train'}"]
            elif recipe != "dit" and "kind: auto" in text:
                over = [f"source.path={jpeg_tree}"]
            if cls is None:  # a training recipe: loaded and resolved as its job does
                cfg, _, _ = load_resolved(registry.get(recipe), preset=yaml_file.stem, overrides=over)
            else:
                cfg, _ = load_config(cls, preset=yaml_file.stem, preset_dir=preset_dir(recipe), overrides=over)
            assert cfg is not None, yaml_file
            seen.add(f"{recipe}/{yaml_file.stem}")
            if recipe == "drifting" and over:
                assert cfg.data.source == "latents" and cfg.data.path == str(mean_store.path)
    assert {"drifting/default", "drifting/smoke", "drifting/imagenet256_ablation", "drifting/imagenet256_L",
            "latent_mae/default", "latent_mae/imagenet256_w256", "edm/cifar10_ddpmpp", "edm/imagenet64_adm",
            "sdd/cifar10_klub", "sdd/cifar10_hkd", "sdd/volumes", "diffit/cifar10", "diffit/imagenet64",
            "diffit/imagenet256_latent"} <= seen
