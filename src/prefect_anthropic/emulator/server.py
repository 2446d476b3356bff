"""Starting the emulator: in this process (a background thread, for tests), as a child process (for
benchmarks, so it does not share a core with the client), or in the foreground (the CLI)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import uvicorn

from .app import create_app
from .config import EmulatorConfig


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (for a server about to start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _uvicorn_config(config: EmulatorConfig) -> uvicorn.Config:
    fast = importlib.util.find_spec("uvloop") is not None and importlib.util.find_spec("httptools") is not None
    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        loop="uvloop" if fast else "asyncio",
        http="httptools" if fast else "h11",
        log_level=config.log_level,
        access_log=False,
        lifespan="off",
        backlog=4096,
        timeout_keep_alive=30,
    )


def serve(config: EmulatorConfig) -> None:
    """Run in the foreground until interrupted."""
    uvicorn.Server(_uvicorn_config(config)).run()


class RunningEmulator:
    def __init__(self, base_url: str, server: uvicorn.Server | None = None) -> None:
        self.base_url = base_url
        self._server = server

    @property
    def api(self):
        """The in-process emulator's state (only for `emulator_in_thread`)."""
        assert self._server is not None, "only an in-process emulator exposes its state"
        return self._server.config.app.state.api

    def stats(self) -> dict:
        return httpx.get(f"{self.base_url}/_emulator/stats", timeout=10).json()

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/_emulator/reset", timeout=10).raise_for_status()

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock forward (cache TTLs, bucket refill) without waiting."""
        httpx.post(f"{self.base_url}/_emulator/advance", params={"seconds": seconds}, timeout=10).raise_for_status()


@contextlib.contextmanager
def emulator_in_thread(config: EmulatorConfig | None = None, **options) -> Iterator[RunningEmulator]:
    """Start an emulator on a free port in a background thread; yield it with its base URL."""
    config = replace(config or EmulatorConfig(port=0), **options)
    if not config.port:
        config = replace(config, port=free_port(config.host))
    uv_config = _uvicorn_config(config)
    uv_config.loop = "asyncio"  # a thread's event loop: leave the process-wide policy alone
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(target=server.run, name="anthropic-emulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the emulator did not start")
        time.sleep(0.01)
    try:
        yield RunningEmulator(f"http://{config.host}:{config.port}", server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def emulator_process(config: EmulatorConfig | None = None, **options) -> Iterator[RunningEmulator]:
    """Start an emulator as a child process on a free port; yield it with its base URL."""
    config = replace(config or EmulatorConfig(port=0), **options)
    if not config.port:
        config = replace(config, port=free_port(config.host))
    command = [sys.executable, "-m", "prefect_anthropic.cli", "emulator", *config.to_args()]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base_url = f"http://{config.host}:{config.port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base_url}/_emulator/stats", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the emulator process did not start") from None
                time.sleep(0.05)
        yield RunningEmulator(base_url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
