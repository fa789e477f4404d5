"""The few-shot pieces without Ray: the embedded `fewshot` set and its source kind, the class split, the
episode tables (counts, invariants, determinism, class-balanced prefixes) and the held-out references."""
import numpy as np
import pytest

from raygen.config import ConfigError
from raygen.data import embedded
from raygen.data.episodes import episode_table, holdout, split_classes
from raygen.data.sources import ItemReader, SourceConfig, list_source

# 60 classes x 600 images, shuffled so that positions are not grouped by class
LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(60), 600))


@pytest.fixture(scope="module")
def table():
    return episode_table(LABELS, list(range(60)), sets=100, shots=5, seed=0)


def test_episode_table_counts_and_invariants(table):
    assert table["target"].shape == (36000,) and table["supports"].shape == (36000, 5)  # 60 * 100 * 6
    assert {k: v.dtype for k, v in table.items()} == {"target": np.int64, "supports": np.int64, "label": np.int64,
                                                      "set": np.int32, "rotation": np.int32}
    assert (LABELS[table["target"]] == table["label"]).all()
    assert (LABELS[table["supports"]] == table["label"][:, None]).all()  # supports share the target's class
    assert not (table["supports"] == table["target"][:, None]).any()  # no support is its own target
    rows = np.sort(np.concatenate([table["supports"], table["target"][:, None]], axis=1), axis=1)
    assert (np.diff(rows, axis=1) > 0).all()  # the shots+1 images of an episode are distinct
    # a set's 6 rotations: each of its images is the target once, and all share the same 6 images
    for c, s in [(0, 0), (17, 42), (59, 99)]:
        m = (table["label"] == c) & (table["set"] == s)
        assert sorted(table["rotation"][m]) == list(range(6))
        assert len({tuple(r) for r in rows[m]}) == 1 and len(set(table["target"][m])) == 6


def test_episode_table_is_deterministic_by_seed(table):
    again = episode_table(LABELS, list(range(60)), sets=100, shots=5, seed=0)
    assert all(np.array_equal(table[k], again[k]) for k in table)
    other = episode_table(LABELS, list(range(60)), sets=100, shots=5, seed=1)
    assert not np.array_equal(table["target"], other["target"])
    # a class's episodes do not depend on the other classes in the table
    alone = episode_table(LABELS, [17], sets=100, shots=5, seed=0)
    m = table["label"] == 17
    assert np.array_equal(alone["target"], table["target"][m]) and np.array_equal(alone["supports"],
                                                                                  table["supports"][m])


def test_every_prefix_is_class_balanced():
    classes = [3, 11, 40, 7]
    t = episode_table(LABELS, classes, sets=5, shots=5, seed=3)
    assert len(t["label"]) == 4 * 5 * 6
    for n in range(1, 5 * 6 + 1):
        counts = np.bincount(t["label"][: n * len(classes)], minlength=41)[classes]
        assert (counts == n).all(), (n, counts)
    # and within a class the order is shuffled, not set by set
    assert not np.array_equal(t["set"][t["label"] == 3], np.sort(t["set"][t["label"] == 3]))


def test_too_few_images_in_a_class_is_an_error_naming_it():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 8)
    with pytest.raises(ValueError, match=r"class 1 has 4 images .*shots=5.* 6 per class.*lower shots"):
        episode_table(labels, [0, 1, 2], sets=2, shots=5, seed=0)
    assert len(episode_table(labels, [0, 1, 2], sets=2, shots=3, seed=0)["target"]) == 3 * 2 * 4
    with pytest.raises(ValueError, match="sets and shots"):
        episode_table(labels, [0], sets=0, shots=1, seed=0)


def test_split_classes_disjoint_counts_and_deterministic():
    names = [f"n{i:08d}" for i in range(100)]
    s = split_classes(names, (60, 16, 20), seed=42)
    assert [len(s[k]) for k in ("train", "val", "test")] == [60, 16, 20]
    ids = s["train"] + s["val"] + s["test"]
    assert len(set(ids)) == 96 and set(ids) <= set(range(100))
    assert all(s[k] == sorted(s[k]) for k in s)
    assert split_classes(names, (60, 16, 20), seed=42) == s
    assert split_classes(names, (60, 16, 20), seed=43) != s
    # the split is by name: the same classes listed in another order fall into the same splits
    perm = np.random.default_rng(0).permutation(100)
    shuffled = [names[i] for i in perm]
    s2 = split_classes(shuffled, (60, 16, 20), seed=42)
    assert {k: sorted(shuffled[i] for i in v) for k, v in s2.items()} == {k: [names[i] for i in v] for k, v in s.items()}
    assert [len(v) for v in split_classes(names[:96], (60, 16, 20)).values()] == [60, 16, 20]  # all 96 used


@pytest.mark.parametrize("split, match", [((60, 16, 30), r"split=60/16/30 needs 106 classes but there are only 100"),
                                          ((60, -1, 20), r"split=60/-1/20 must be three class counts >= 0"),
                                          ((60, 16), r"split=60/16 must be three")])
def test_split_classes_bad_counts(split, match):
    with pytest.raises(ValueError, match=match):
        split_classes([str(i) for i in range(100)], split)


def test_holdout_splits_each_class_into_pool_and_reference():
    pool, ref = holdout(LABELS, [1, 5, 9], per_class_reference=50, seed=0)
    assert len(ref) == 150 and len(pool) == 3 * 550 and not set(pool) & set(ref)
    assert set(pool) | set(ref) == set(np.flatnonzero(np.isin(LABELS, [1, 5, 9])))
    assert (np.bincount(LABELS[ref], minlength=10)[[1, 5, 9]] == 50).all()
    again = holdout(LABELS, [1, 5, 9], per_class_reference=50, seed=0)
    assert np.array_equal(again[0], pool) and np.array_equal(again[1], ref)
    assert not np.array_equal(holdout(LABELS, [1, 5, 9], 50, seed=1)[1], ref)
    # episodes over the pool only never show a reference image
    masked = np.where(np.isin(np.arange(len(LABELS)), ref), -1, LABELS)
    t = episode_table(masked, [1, 5, 9], sets=10, shots=5, seed=0)
    assert not np.isin(t["supports"], ref).any() and not np.isin(t["target"], ref).any()
    with pytest.raises(ValueError, match="class 2 has 600 images .*per_class_reference=600"):
        holdout(LABELS, [2], per_class_reference=600, seed=0)


# ------------------------------------------------------------------ the embedded few-shot set


def test_fewshot_set_classes_counts_and_determinism():
    names = embedded.fewshot_class_names()
    assert len(names) == 96 == len(set(names)) and "red_circle_stripes" in names
    assert {n.split("_")[2] for n in names} == {"solid", "outline", "stripes", "checker"}
    images, labels = embedded.fewshot(16, 10, 0)
    assert images.shape == (960, 16, 16, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert (np.bincount(labels) == 10).all() and np.array_equal(labels, embedded.fewshot_labels(10))
    again, _ = embedded.fewshot.__wrapped__(16, 10, 0)  # drawn again, not the cached arrays
    assert np.array_equal(images, again)
    assert not np.array_equal(images, embedded.fewshot(16, 10, 1)[0])
    # a class's first images are the same whatever per_class is
    fewer, _ = embedded.fewshot(16, 4, 0)
    assert np.array_equal(fewer[4 * 37:4 * 38], images[10 * 37:10 * 37 + 4])
    assert len(embedded.fewshot_labels()) == 9600 and (np.bincount(embedded.fewshot_labels()) == 100).all()


def test_fewshot_source_kind():
    cfg = SourceConfig(kind="fewshot", resolution=16, per_class=3, seed=2)
    listing = list_source(cfg)
    assert len(listing) == 288 and listing.keys[0] == "fewshot/all/000000" and listing.keys[-1] == "fewshot/all/000287"
    assert np.array_equal(listing.labels, embedded.fewshot_labels(3)) and listing.class_names[0] == "red_circle_solid"
    im = ItemReader(listing.kind, listing.info, cfg).read(listing.keys[100])
    assert np.array_equal(np.asarray(im), embedded.fewshot(16, 3, 2)[0][100])
    SourceConfig(kind="fewshot", split="all").validate()
    with pytest.raises(ConfigError, match="source.split='train': source.kind=fewshot has one split"):
        SourceConfig(kind="fewshot", split="train").validate()
    with pytest.raises(ConfigError, match="source.per_class=5 is not used by source.kind=shapes"):
        SourceConfig(kind="shapes", per_class=5).validate()
    with pytest.raises(ConfigError, match="source.per_class must be >= 1"):
        SourceConfig(kind="fewshot", per_class=0).validate()
