"""Real parts for tests and benchmarks: a Redis server of this machine's, started on a free port."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from .emulator.server import free_port

__all__ = ["free_port", "redis_server"]


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
