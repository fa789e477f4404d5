"""One real Ray cluster per test session (starting one costs ~8 s on 2 cores), a temporary cache,
W&B kept offline, `run_job`: a job run as a user runs it, returning its run directory, and `s3_server`:
a real S3-compatible server on the loopback address."""
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory):
    os.environ.setdefault("RAYGEN_CACHE", str(tmp_path_factory.mktemp("raygen_cache")))
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    # Ray Train's controller takes a report every 2 s by default, and a worker's next `ray.train.report`
    # waits for it: the tests' tiny runs report every step or two. Passed on to the controller by the driver.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raygen.cli import init_ray

    from raygen.core import console

    console.quiet_driver()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False,
             runtime_env=console.runtime_env())
    init_ray()  # the job's own data-context settings
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def job_env(ray_cluster):
    """The environment for job subprocesses that need not start their own cluster: they connect to the
    session's (0.05 s) instead of starting one (~8 s), as a job does under `ray job submit`."""
    return {**os.environ, "WANDB_MODE": "offline", "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def last_line_run_dir(output: str) -> Path:
    last = output.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), f"last line must be 'run_dir: <path>', got {last!r}"
    return Path(last.removeprefix("run_dir: "))


@pytest.fixture
def run_job(tmp_path, job_env):
    """`run_job("dit", "--preset", "smoke", ...)`: `python jobs/dit.py ...` in a fresh process joined to
    the session's cluster, runs under tmp_path; asserts exit 0 and returns (run_dir, completed process)."""

    def run(job: str, *args: str, timeout: int = 900, expect_ok: bool = True):
        proc = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args, "--runs-root",
                               str(tmp_path)], capture_output=True, text=True, env=job_env, timeout=timeout)
        if not expect_ok:
            return None, proc
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return last_line_run_dir(proc.stdout), proc

    return run


# ---------------------------------------------------------------- a real S3 server
# `s3_server`: a real S3-compatible server (moto in server mode) on the loopback address, for the
# `s3://` storage tests. One per session; it lives in a thread of the pytest process and keeps its
# objects in memory, so it suits small checkpoints only.
# 
# How the clients find it (measured with pyarrow 26 and Ray Train V2 in ray 2.60):
# - `uri(prefix)` is self-contained: `s3://KEY:SECRET@bucket/prefix?endpoint_override=...&scheme=http&region=...`.
#   `pyarrow.fs.FileSystem.from_uri` puts the credentials and the endpoint into the filesystem object, and
#   Ray ships that object (pickled) from the train controller to the workers, so it works in processes
#   that never saw `env`: a job joined to an already running cluster through RAY_ADDRESS, whose
#   controller and workers have the cluster's environment, not the job's.
# - `env` makes boto3 and `FileSystem.from_uri("s3://bucket/prefix")` (plain URI) reach the server:
#   pyarrow reads AWS_ENDPOINT_URL_S3 (then AWS_ENDPOINT_URL) in `from_uri` only, not in a bare
#   `pyarrow.fs.S3FileSystem()`. Ray resolves a plain storage_path inside the train controller: a raygen
#   job passes its AWS_* variables to the controller and workers through its runtime environment when
#   `run.storage` is set (tests/e2e/test_storage_s3.py relies on that); plain Ray needs the cluster
#   itself started with `env`.
ACCESS_KEY = "raygen-test-key"
SECRET_KEY = "raygen-test-secret"
REGION = "us-east-1"
BUCKET = "raygen-test"


@dataclass(frozen=True)
class S3Server:
    host: str
    port: int
    bucket: str
    env: dict = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _key(self, prefix: str) -> str:
        return f"{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def uri(self, prefix: str = "") -> str:
        """The URI Ray Train (`RunConfig(storage_path=...)`, `Result.from_path`) and pyarrow
        (`FileSystem.from_uri`, `copy_files`) accept, credentials and endpoint included."""
        return (f"s3://{quote(ACCESS_KEY, safe='')}:{quote(SECRET_KEY, safe='')}@{self._key(prefix)}"
                f"?endpoint_override={self.host}:{self.port}&scheme=http&region={REGION}")

    def plain_uri(self, prefix: str = "") -> str:
        """`s3://bucket/prefix`: reaches this server only in processes that have `env`."""
        return f"s3://{self._key(prefix)}"

    def filesystem(self):
        """A pyarrow S3FileSystem for this server with explicit credentials, for
        `RunConfig(storage_filesystem=fs, storage_path="bucket/prefix")`."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                                       endpoint_override=f"{self.host}:{self.port}", scheme="http")

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the bucket (directory markers `a/` included)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    # werkzeug logs one line per request; a checkpoint upload is dozens of them.
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": endpoint,  # boto3 and pyarrow's from_uri; it wins over AWS_ENDPOINT_URL
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",  # no credential look-up on the instance-metadata address
        }
        s3 = S3Server(host=host, port=port, bucket=BUCKET, env=env)
        s3.client().create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        server.stop()
        werkzeug_log.setLevel(level)
