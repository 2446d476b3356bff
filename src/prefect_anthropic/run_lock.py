"""One run per output directory.

Two runs writing one dataset would both send every request (and both pay for it). A run holds an OS file
lock (`filelock`: `flock` on Unix) on its output directory for its whole life; the OS releases it when the
process ends, however it ends, so a lock left by a killed run never blocks the next one. Beside the lock,
the holder writes who it is (host, pid, start time), so a second run can say whom it is waiting for.

With a shared limiter (`limiter_url`), runs on other machines count too: the run also holds a Redis lock
named by the directory's path (redis-py's `Lock`, renewed every 10 s, expiring 30 s after its holder
stops renewing it), so two machines cannot write one shared directory at once.

An output on object storage is held by a lease object beside it (`.prefect-anthropic.lease`), created
with a conditional write (`If-None-Match: *`: only one run can create it), renewed every 10 s with
`If-Match` on its last version, and taken over by the next run only when it has not been renewed for
30 s by the storage's own clock (its holder died). Where the storage cannot write conditionally, use the
Redis lock (`--limiter-url`).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

__all__ = ["LOCK_FILE", "OutputDirectoryLocked", "hold_output_directory", "hold_output_location"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".prefect-anthropic.lock"
_HOLDER_FILE = ".prefect-anthropic.lock.json"


class OutputDirectoryLocked(RuntimeError):
    """Another run holds the output directory: nothing is sent."""


def _holder(directory: Path) -> str:
    try:
        holder = json.loads((directory / _HOLDER_FILE).read_text())
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started_at']}"
    except (OSError, ValueError, KeyError):
        return "a run that has not written its name yet"


_REDIS_LOCK_S = 30.0


@contextmanager
def _hold_in_redis(directory: Path | str, limiter_url: str) -> Iterator[None]:
    import redis

    from .engine.shared_limiter import KEY_PREFIX, SharedLimiterUnavailable

    path = str(directory.resolve()) if isinstance(directory, Path) else directory
    name = f"{KEY_PREFIX}:directory-lock:{hashlib.sha256(path.encode()).hexdigest()[:32]}"
    client = redis.Redis.from_url(limiter_url, socket_timeout=5, socket_connect_timeout=5)
    lock = client.lock(name, timeout=_REDIS_LOCK_S, blocking=False, thread_local=False)
    try:
        acquired = lock.acquire()
        if not acquired:
            holder = client.get(name + ":holder")
            holder = holder.decode() if isinstance(holder, bytes) else holder
            raise OutputDirectoryLocked(
                f"the output directory {directory} is in use by a run on another machine "
                f"({holder or 'unknown'}); nothing was sent. Wait for that run to finish "
                "(or stop it), then run again: it resumes."
            )
        client.set(name + ":holder", f"host {socket.gethostname()}, pid {os.getpid()}", ex=int(_REDIS_LOCK_S))
    except redis.RedisError as exc:
        raise SharedLimiterUnavailable(limiter_url, exc) from exc
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(_REDIS_LOCK_S / 3):
            with contextlib.suppress(redis.RedisError):
                lock.reacquire()
                client.expire(name + ":holder", int(_REDIS_LOCK_S))

    renewer = threading.Thread(target=renew, name="prefect-anthropic-directory-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(redis.RedisError):
            lock.release()
            client.delete(name + ":holder")
        client.close()


def _holder_text() -> str:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )


_LEASE_FILE = ".prefect-anthropic.lease"
_LEASE_TTL_S = 30.0


class _S3Lease:
    """The lease object of an output on S3, by conditional writes (If-None-Match to take, If-Match to renew)."""

    def __init__(self, storage: Any, location: str) -> None:
        self.fs, path = storage.filesystem(location.rstrip("/") + "/" + _LEASE_FILE)
        self.location = location
        self.bucket, self.key = path.split("/", 1)
        self.etag: str | None = None

    def _put(self, **condition: str) -> str:
        reply = self.fs.call_s3(
            "put_object", Bucket=self.bucket, Key=self.key, Body=_holder_text().encode(), **condition
        )
        return str(reply["ETag"])

    def acquire(self) -> None:
        try:
            self.etag = self._put(IfNoneMatch="*")
            return
        except FileExistsError:
            pass
        head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        server_now = email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        fresh = (server_now - head["LastModified"]).total_seconds() < _LEASE_TTL_S
        if fresh and not self._holder_died_here():
            raise OutputDirectoryLocked(
                f"the output {self.location} is in use by another run ({self._holder()}); nothing was sent. "
                "Wait for that run to finish (or stop it), then run again: it resumes."
            )
        try:  # its holder stopped renewing it: take it over, unless another run just did
            self.etag = self._put(IfMatch=head["ETag"])
        except FileExistsError:
            raise OutputDirectoryLocked(f"the output {self.location} was just taken by another run") from None

    def _holder_died_here(self) -> bool:
        """The holder was a process of this machine that is gone (killed): no need to wait out its lease."""
        with contextlib.suppress(Exception):
            holder = json.loads(self.fs.cat_file(f"{self.bucket}/{self.key}"))
            if holder["host"] == socket.gethostname():
                try:
                    os.kill(int(holder["pid"]), 0)
                except ProcessLookupError:
                    return True
        return False

    def _holder(self) -> str:
        with contextlib.suppress(Exception):
            holder = json.loads(self.fs.cat_file(f"{self.bucket}/{self.key}"))
            return f"host {holder['host']}, pid {holder['pid']}, started {holder['started_at']}"
        return "unknown"

    def renew(self) -> None:
        assert self.etag is not None
        self.etag = self._put(IfMatch=self.etag)

    def release(self) -> None:
        with contextlib.suppress(Exception):
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
            if head["ETag"] == self.etag:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


@contextmanager
def _hold_lease(storage: Any, location: str) -> Iterator[None]:
    protocol = location.split("://", 1)[0]
    if protocol not in ("s3", "s3a"):
        # memory:// lives in this process; other stores: no conditional writes here (see the module's doc).
        with _PROCESS_LOCK:
            if location in _HELD_IN_PROCESS:
                raise OutputDirectoryLocked(f"the output {location} is in use by another run in this process")
            _HELD_IN_PROCESS.add(location)
        try:
            yield
        finally:
            _HELD_IN_PROCESS.discard(location)
        return
    lease = _S3Lease(storage, location)
    lease.acquire()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(_LEASE_TTL_S / 3):
            try:
                lease.renew()
            except FileExistsError:
                logger.error("The lease on %s was taken by another run: this run's outputs may clash", location)
                return
            except Exception as exc:  # a transient storage error: try again at the next interval
                logger.warning("Could not renew the lease on %s: %s", location, exc)

    renewer = threading.Thread(target=renew, name="prefect-anthropic-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        lease.release()


_PROCESS_LOCK = threading.Lock()
_HELD_IN_PROCESS: set[str] = set()


@contextmanager
def hold_output_location(location: str, storage: Any, limiter_url: str | None = None) -> Iterator[None]:
    """Hold an output directory or URL for the duration of the block, or raise OutputDirectoryLocked at once."""
    from .storage import is_url, local_path

    if not is_url(location):
        with hold_output_directory(local_path(location), limiter_url):
            yield
        return
    if limiter_url:
        with _hold_in_redis(location, limiter_url):
            yield
        return
    with _hold_lease(storage, location):
        yield


@contextmanager
def hold_output_directory(output_dir: str | os.PathLike[str], limiter_url: str | None = None) -> Iterator[None]:
    """Hold the output directory for the duration of the block, or raise OutputDirectoryLocked at once."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if limiter_url:
        with _hold_in_redis(directory, limiter_url), hold_output_directory(directory):
            yield
        return
    lock = FileLock(directory / LOCK_FILE, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirectoryLocked(
            f"the output directory {directory} is in use by another run ({_holder(directory)}); nothing was "
            "sent. Wait for that run to finish (or stop it), then run again: it resumes."
        ) from None
    holder = directory / _HOLDER_FILE
    try:
        holder.write_text(_holder_text())
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
