"""One run per output directory.

Two runs writing one dataset would both send every request (and both pay for it). A run holds an OS file
lock (`filelock`: `flock` on Unix) on its output directory for its whole life; the OS releases it when the
process ends, however it ends, so a lock left by a killed run never blocks the next one. Beside the lock,
the holder writes who it is (host, pid, start time), so a second run can say whom it is waiting for.

With a shared limiter (`limiter_url`), runs on other machines count too: the run also holds a Redis lock
named by the directory's path (redis-py's `Lock`, renewed every 10 s, expiring 30 s after its holder
stops renewing it), so two machines cannot write one shared directory at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["LOCK_FILE", "OutputDirectoryLocked", "hold_output_directory"]

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
def _hold_in_redis(directory: Path, limiter_url: str) -> Iterator[None]:
    import redis

    from .engine.shared_limiter import KEY_PREFIX, SharedLimiterUnavailable

    path = str(directory.resolve())
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
        holder.write_text(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
        )
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
