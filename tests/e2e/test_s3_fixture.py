"""The `s3_server` fixture is a real S3 server: what pyarrow writes through its URIs boto3 reads back
and the reverse, its self-contained URI survives the pickling Ray does to reach workers that lack
its environment, and it listens on the loopback address only."""
import os
import pickle
import socket
import sys

import psutil
import pyarrow.fs


def test_pyarrow_and_boto3_see_the_same_objects(s3_server, monkeypatch):
    fs, root = pyarrow.fs.FileSystem.from_uri(s3_server.uri("fixture/roundtrip"))
    assert root == f"{s3_server.bucket}/fixture/roundtrip"
    with fs.open_output_stream(f"{root}/from_pyarrow.txt") as f:
        f.write(b"written by pyarrow")
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key="fixture/roundtrip/from_pyarrow.txt")["Body"]
    assert body.read() == b"written by pyarrow"

    # the other way, with a plain s3:// URI that only `env` points at the server
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="fixture/roundtrip/from_boto3.txt", Body=b"by boto3")
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    fs, root = pyarrow.fs.FileSystem.from_uri(s3_server.plain_uri("fixture/roundtrip"))
    with fs.open_input_stream(f"{root}/from_boto3.txt") as f:
        assert f.read() == b"by boto3"
    listed = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    assert sorted(i.base_name for i in listed) == ["from_boto3.txt", "from_pyarrow.txt"]


def test_uri_carries_endpoint_and_credentials(s3_server, monkeypatch):
    """Ray resolves storage_path in the train controller and pickles the filesystem to the workers;
    in a job joined to a running cluster neither has the job's AWS variables."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    fs, root = pyarrow.fs.FileSystem.from_uri(s3_server.uri("fixture/shipped"))
    shipped = pickle.loads(pickle.dumps(fs))
    options = shipped.__reduce__()[1][0]
    assert (options["access_key"], options["scheme"]) == ("raygen-test-key", "http")
    assert options["endpoint_override"] == f"127.0.0.1:{s3_server.port}"
    with shipped.open_output_stream(f"{root}/x.bin") as f:
        f.write(b"\x00\x01")
    assert s3_server.keys("fixture/shipped/") == ["fixture/shipped/x.bin"]


def _listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a socket in LISTEN on `port`, from the kernel's table (Linux)."""
    found = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            addr_hex, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:
                found.append(socket.inet_ntoa(int(addr_hex, 16).to_bytes(4, sys.byteorder)))
    return found


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def test_server_listens_on_loopback_only(s3_server):
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    assert _listening_addresses(s3_server.port) == ["127.0.0.1"]
    assert _accepts("127.0.0.1", s3_server.port)
    assert not _accepts("127.0.0.2", s3_server.port)  # a wildcard (0.0.0.0) bind would accept this one
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:
        assert not _accepts(address, s3_server.port), f"reachable on {address}"
