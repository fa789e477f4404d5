"""run.storage without a cluster: the twin of a run directory on a filesystem pyarrow opens (a local
path here; s3:// against a real S3 server is tests/e2e/test_storage_s3.py) and what is copied each way."""
import os

import pytest

from raygen.config import ConfigError
from raygen.core import storage


@pytest.fixture
def bound(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    storage.bind(str(store), runs)
    yield runs, store
    storage.bind(None, runs)


def test_join_keeps_the_query_string_at_the_end():
    uri = "s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "dit", "/run-a/") == "s3://bucket/prefix/dit/run-a?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("gs://b/p/", "x") == "gs://b/p/x"


def test_check_names_the_key_and_the_fix():
    for bad in ("runs/here", "ftp://host/x"):
        with pytest.raises(ConfigError, match="run.storage"):
            storage.check(bad)
    storage.check("s3://bucket/p")
    storage.check("/nfs/raygen")


def test_remote_of_mirrors_the_runs_root(bound):
    runs, store = bound
    assert storage.remote_of(runs / "dit" / "20260101-000000-a") == f"{store}/dit/20260101-000000-a"
    assert storage.remote_of(runs / "ablate" / "sw" / "trials" / "t1") == f"{store}/ablate/sw/trials/t1"
    assert storage.remote_of("/somewhere/else") is None
    storage.bind(None, runs)
    assert storage.remote_of(runs / "dit" / "x") is None and storage.ENV_STORAGE not in os.environ


def test_push_copies_the_run_but_not_ray_trains_checkpoints(bound):
    runs, store = bound
    run = runs / "dit" / "20260101-000000-a"
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    (run / "mae" / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    (run / "samples" / "step_0000010.png").write_bytes(b"png")
    (run / "checkpoints" / "checkpoint_1" / "state.pt").write_bytes(b"x")
    (run / "mae" / "checkpoints" / "checkpoint_1" / "state.pt").write_bytes(b"x")
    (run / "mae" / "net_ema.pt").write_bytes(b"mae")
    (run / ".metrics.jsonl.1.abc.tmp").write_text("half")
    assert storage.push(run) == 3
    twin = store / "dit" / run.name
    assert sorted(p.relative_to(twin).as_posix() for p in twin.rglob("*") if p.is_file()) == [
        "mae/net_ema.pt", "metrics.jsonl", "samples/step_0000010.png"]
    assert storage.push(run) == 0  # nothing changed: nothing copied again
    (run / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20}\n')
    assert storage.push(run, only=("metrics.jsonl",)) == 1
    assert (twin / "metrics.jsonl").read_text().count("step") == 2


def test_pull_fills_a_fresh_runs_root_and_a_named_run_is_found(bound, tmp_path):
    runs, store = bound
    twin = store / "edm" / "20260101-000000-long"
    (twin / "eval").mkdir(parents=True)
    (twin / "config.yaml").write_text("train:\n  steps: 5\n")
    (twin / "eval" / "metrics.json").write_text("{}")
    (twin / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    (twin / "checkpoints" / "checkpoint_1" / "state.pt").write_bytes(b"x")
    (store / "edm" / "20250101-000000-long").mkdir()  # an older run of the same name
    local = storage.fetch_named_run(str(store), runs, "edm", "long")
    assert local == runs.resolve() / "edm" / "20260101-000000-long"
    assert (local / "config.yaml").read_text() == "train:\n  steps: 5\n" and (local / "eval" / "metrics.json").is_file()
    assert not (local / "checkpoints").exists()  # read by Ray Train from storage, never copied down
    assert storage.fetch_named_run(str(store), runs, "edm", "other") is None
    # pull: missing files only, unless told to overwrite those of another size
    (local / "config.yaml").write_text("edited locally\n")
    assert storage.pull(local) == 0 and (local / "config.yaml").read_text() == "edited locally\n"
    assert storage.pull(local, only=("config.yaml",), overwrite=True) == 1
    assert (local / "config.yaml").read_text() == "train:\n  steps: 5\n"


def test_display_hides_credentials_and_options():
    assert storage.display("s3://KEY:SECRET@bucket/p/dit?endpoint_override=h:1&scheme=http") == "s3://bucket/p/dit"
    assert storage.display("gs://bucket/p") == "gs://bucket/p" and storage.display("/nfs/runs") == "/nfs/runs"
