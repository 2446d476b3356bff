"""Real parts for tests and benchmarks, started on free ports: a Redis server of this machine's, and an S3 API on
loopback (moto's standalone server)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .emulator.server import free_port

__all__ = ["free_port", "redis_server", "s3_server"]


@contextlib.contextmanager
def redis_server(executable: str | None = None, port: int | None = None) -> Iterator[str]:
    """Start `redis-server` (no persistence, loopback only); yield its URL; stop it at the end."""
    binary = executable or shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="prefect-anthropic-redis-") as workdir:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen([*args, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server (`pip install "moto[server]"`) on loopback, reached over HTTP by s3fs as the
    real S3 would be: AWS_ENDPOINT_URL and fake credentials in the environment, for this process and the ones
    it starts (restored at the end); yield its endpoint."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    process = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    environment = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    previous = {name: os.environ.get(name) for name in environment}
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port}")
            time.sleep(0.05)
        os.environ.update(environment)
        yield environment["AWS_ENDPOINT_URL"]
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        process.wait(timeout=10)
