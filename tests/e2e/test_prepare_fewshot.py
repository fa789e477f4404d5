"""`jobs/prepare_fewshot.py` as a user runs it (a subprocess joined to the session's Ray cluster) on the
embedded few-shot set: the files it writes, the tables read back against `episode_table` called
directly, an identical second run; and the one-line failures of a class-folder source that cannot
give the split (in-process: they happen before Ray starts), and a class-folder tree end to end."""
from pathlib import Path

import numpy as np
import pytest

from raygen.data import embedded, fewshot_prep
from raygen.data.episodes import episode_table, split_classes
from raygen.data.sources import SourceConfig, list_source, write_image_folder

ARGS = ("source.per_class=12", "sets=2", "split=60/16/20")


def prepare(run_job, *args):
    _, proc = run_job("prepare_fewshot", *args, expect_ok=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("fewshot_dir: "), last
    return Path(last.removeprefix("fewshot_dir: ")), proc.stdout


def test_prepare_fewshot_job_writes_the_tables_episode_table_computes(run_job, tmp_path, capsys):
    out, stdout = prepare(run_job, *ARGS)
    assert "train: 60 classes, 720 episodes" in stdout  # 60 classes x 2 sets x 6 rotations
    assert "val: 16 classes, 192 episodes" in stdout and "test: 20 classes, 240 episodes" in stdout
    assert (out / "split.json").is_file() and (out / "config.yaml").is_file()
    for name in ("train", "val", "test"):
        assert list((out / "episodes" / name).glob("*.parquet")), name

    meta = fewshot_prep.load_split(out)
    expect = split_classes(embedded.fewshot_class_names(), (60, 16, 20), seed=42)
    assert {k: meta["splits"][k]["class_ids"] for k in expect} == expect
    assert meta["splits"]["train"]["class_names"][0] == embedded.fewshot_class_names()[expect["train"][0]]
    listing = list_source(SourceConfig(kind="fewshot", per_class=12))
    assert meta["listing"] == {"kind": "fewshot", "num_items": 1152, "num_classes": 96, "problems": 0,
                               "listing_sha256": fewshot_prep.listing_sha256(listing)}
    assert (meta["seed"], meta["sets"], meta["shots"], meta["split"]) == (42, 2, 5, [60, 16, 20])

    labels = embedded.fewshot_labels(12)
    first = {}
    for name in ("train", "val", "test"):
        got = fewshot_prep.load_episodes(out, name)
        want = episode_table(labels, expect[name], sets=2, shots=5, seed=42)
        assert np.array_equal(got["episode"], np.arange(len(want["target"])))
        for k, v in want.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), (name, k)
        first[name] = got

    # the same command again (in-process, on the session's cluster): the same directory, rewritten identically
    again = fewshot_prep.main([*ARGS, "--runs-root", str(tmp_path)])
    assert again == out and capsys.readouterr().out.strip().endswith(f"fewshot_dir: {out}")
    for name in ("train", "val", "test"):
        got = fewshot_prep.load_episodes(again, name)
        assert all(np.array_equal(got[k], first[name][k]) for k in got)
        assert len(list((again / "episodes" / name).glob("*.parquet"))) == 1  # replaced, not appended


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    """`train/<class>/*.png`: 10 classes of the few-shot set, 7 images each, but only 4 in one class."""
    root = tmp_path_factory.mktemp("fewshot_tree")
    images, labels = embedded.fewshot(16, 7, 0)
    keep = (labels < 10) & ~((labels == 3) & (np.arange(len(labels)) % 7 >= 4))
    write_image_folder(images[keep], labels[keep], embedded.fewshot_class_names()[:10], root, fmt="png",
                       split="train")
    return root


def run_main(tmp_path, capsys, *args):
    with pytest.raises(SystemExit) as e:
        fewshot_prep.main([*args, "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_class_with_too_few_images_fails_naming_it(class_tree, tmp_path, capsys):
    line = run_main(tmp_path, capsys, f"source.path={class_tree}", "source.split=train", "split=6/2/2")
    names = embedded.fewshot_class_names()
    assert f"class '{names[3]}' of source.path='{class_tree}' has 4 images" in line
    assert "shots=5 needs 6 per class" in line and "lower shots" in line
    assert not (tmp_path / "fewshot").exists()  # nothing written


def test_fewer_classes_than_the_split_needs_fails_naming_split(class_tree, tmp_path, capsys):
    line = run_main(tmp_path, capsys, f"source.path={class_tree}", "source.split=train", "shots=3")
    assert f"split=60/16/20 needs 96 classes but source.path='{class_tree}' has 10; lower the counts" in line


def test_a_class_folder_tree_in_process(ray_cluster, class_tree, tmp_path, capsys):
    """source.path selects the class-folder listing; 3 shots fit the class with 4 images."""
    out = fewshot_prep.main([f"source.path={class_tree}", "source.split=train", "split=6/2/2", "shots=3",
                             "sets=3", f"out={tmp_path / 'fs'}"])
    assert out == tmp_path / "fs" and "train: 6 classes, 72 episodes" in capsys.readouterr().out
    meta = fewshot_prep.load_split(out)
    assert meta["listing"]["kind"] == "class_folders" and meta["listing"]["num_items"] == 67
    labels = list_source(SourceConfig(kind="class_folders", path=str(class_tree), split="train")).labels
    for name in ("train", "val", "test"):
        want = episode_table(labels, meta["splits"][name]["class_ids"], sets=3, shots=3, seed=42)
        got = fewshot_prep.load_episodes(out, name)
        assert all(np.array_equal(got[k], v) for k, v in want.items())
