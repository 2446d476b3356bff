"""One run per output directory.

Two runs writing one dataset would both send every request (and both pay for it). A run holds an OS file
lock (`filelock`: `flock` on Unix) on its output directory for its whole life; the OS releases it when the
process ends, however it ends, so a lock left by a killed run never blocks the next one. Beside the lock,
the holder writes who it is (host, pid, start time), so a second run can say whom it is waiting for.
"""

from __future__ import annotations

import json
import os
import socket
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


@contextmanager
def hold_output_directory(output_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the output directory for the duration of the block, or raise OutputDirectoryLocked at once."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
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
