"""`s3_server`: a real S3-compatible server (moto in server mode) on the loopback address, for the
`s3://` storage tests. One per session; it lives in a thread of the pytest process and keeps its
objects in memory, so it suits small checkpoints only.

How the clients find it (measured with pyarrow 26 and Ray Train V2 in ray 2.60):
- `uri(prefix)` is self-contained: `s3://KEY:SECRET@bucket/prefix?endpoint_override=...&scheme=http&region=...`.
  `pyarrow.fs.FileSystem.from_uri` puts the credentials and the endpoint into the filesystem object, and
  Ray ships that object (pickled) from the train controller to the workers, so it works in processes
  that never saw `env`: a job joined to an already running cluster through RAY_ADDRESS, whose
  controller and workers have the cluster's environment, not the job's.
- `env` makes boto3 and `FileSystem.from_uri("s3://bucket/prefix")` (plain URI) reach the server:
  pyarrow reads AWS_ENDPOINT_URL_S3 (then AWS_ENDPOINT_URL) in `from_uri` only, not in a bare
  `pyarrow.fs.S3FileSystem()`. Ray resolves a plain storage_path inside the train controller, so
  the plain URI works only where the cluster itself was started with `env`.
"""
import logging
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest

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

