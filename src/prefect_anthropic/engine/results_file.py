"""The results file: one JSON record per line, appended as requests complete, durable in batches.

A crash loses at most the records not yet flushed (the in-flight ones and one flush interval). A torn last
line left by a crash is cut off when the file is opened again, and `LineSet` tells a restarted run which
lines already succeeded, so they are never sent (or paid for) twice.

Where the machine's disk does not outlive the run (a container of a work pool), the file is also uploaded
as immutable parts (`PartUploader`): what was appended since the last part, every `every_rows` records or
`every_s` seconds, whichever comes first, and at the end. A run on another machine starts from the parts.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .records import ResultRecord

__all__ = ["LineSet", "ResultsWriter", "read_records", "succeeded_lines", "succeeded_requests"]


class LineSet:
    """A set of line numbers as a bitmap: 10^7 lines take 1.25 MB, not the 600 MB of a Python set."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, line: int) -> None:
        byte, bit = divmod(line, 8)
        if byte >= len(self._bits):
            self._bits.extend(b"\0" * (byte - len(self._bits) + 1 + len(self._bits) // 2))
        if not self._bits[byte] & (1 << bit):
            self._bits[byte] |= 1 << bit
            self.count += 1

    def discard(self, line: int) -> None:
        byte, bit = divmod(line, 8)
        if byte < len(self._bits) and self._bits[byte] & (1 << bit):
            self._bits[byte] &= ~(1 << bit) & 0xFF
            self.count -= 1

    def __contains__(self, line: int) -> bool:
        byte, bit = divmod(line, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))

    def __len__(self) -> int:
        return self.count


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write interrupted by a crash)."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        position = size
        while position > 0:
            step = min(65536, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            if position == size and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(position - step + newline + 1)
                return
            position -= step
        handle.truncate(0)


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every complete record of a results file, in file order (a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as handle:
        complete = (raw for raw in handle if raw.endswith(b"\n"))  # a torn line can only be the last
        yield from _parsed_records(complete)


def _parsed_records(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The records among JSON lines (a line that does not parse is skipped)."""
    for raw in lines:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


#: Errored answers that are final: the request was answered (and paid for, if at all), and sending it again
#: would not change the answer. A refusal is never retried.
FINAL_ERROR_TYPES = frozenset({"refusal"})
#: Client errors worth another try (timeout, conflict, rate limit); every other 4xx answer is the answer.
_RETRYABLE_CLIENT_ERRORS = frozenset({408, 409, 429})


def is_final(record: dict[str, Any]) -> bool:
    """Whether a record settles its request for good, so that neither a shard retry nor a resumed run sends
    it again (one row, one answer): a success, a refusal, or an answered 4xx other than 408/409/429 (an
    invalid request, a model not found). Lines never sent (invalid input, rejected before sending, or not
    let go by the budget) are checked again instead: it costs nothing, and the settings may have changed."""
    if record.get("status") == "succeeded" or record.get("error_type") in FINAL_ERROR_TYPES:
        return True
    status = record.get("http_status")
    return isinstance(status, int) and 400 <= status < 500 and status not in _RETRYABLE_CLIENT_ERRORS


def succeeded_lines(path: str | os.PathLike[str]) -> LineSet:
    """Lines that succeeded (compact, for huge runs over an input that does not change)."""
    done = LineSet()
    for record in read_records(path):
        if is_final(record):
            done.add(int(record["line"]))
    return done


def succeeded_requests(path: str | os.PathLike[str]) -> dict[int, str]:
    """Line -> digest of the request that succeeded there (or got another final answer, see is_final): an
    edited line is not mistaken for done."""
    done: dict[int, str] = {}
    for record in read_records(path):
        if is_final(record):
            done[int(record["line"])] = record.get("request_digest") or ""
    return done


class PartUploader:
    """Uploads what was appended to a local file since the last upload, up to its last complete line, as a
    new immutable part object `part-<time>-<writer>.jsonl` under `remote_dir`."""

    def __init__(
        self,
        storage: Any,
        remote_dir: str,
        local_path: str | os.PathLike[str],
        *,
        every_rows: int = 500,
        every_s: float = 10.0,
    ) -> None:
        self.storage = storage
        self.remote_dir = remote_dir.rstrip("/")
        self.local_path = Path(local_path)
        self.every_rows = every_rows
        self.every_s = every_s
        self._writer = uuid.uuid4().hex[:8]
        self._offset = self.local_path.stat().st_size if self.local_path.exists() else 0  # already uploaded
        self._rows = 0
        self._last = time.monotonic()
        self.parts = 0

    def appended(self, rows: int = 1) -> None:
        self._rows += rows
        if self._rows >= self.every_rows or time.monotonic() - self._last >= self.every_s:
            self.upload()

    def upload(self) -> None:
        with open(self.local_path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # complete lines only
        if end:
            name = f"part-{time.time_ns():020d}-{self._writer}.jsonl"
            self.storage.write_bytes(f"{self.remote_dir}/{name}", data[:end])
            self._offset += end
            self.parts += 1
        self._rows = 0
        self._last = time.monotonic()


def download_parts(storage: Any, remote_dir: str, local_path: str | os.PathLike[str]) -> int:
    """Write every part under `remote_dir`, in order, into `local_path` (replaced); the number of parts."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    parts = storage.list(remote_dir, "part-*.jsonl")
    with open(local_path, "wb") as handle:
        for part in parts:
            handle.write(storage.read_bytes(part))
    return len(parts)


def read_part_records(storage: Any, remote_dir: str) -> Iterator[dict[str, Any]]:
    """Every record of the parts under `remote_dir`, in order."""
    for part in storage.list(remote_dir, "part-*.jsonl"):
        yield from _parsed_records(storage.read_bytes(part).splitlines())


class ResultsWriter:
    """Appends records as they complete.

    Each record is handed to the operating system at once, so killing the process (SIGKILL, OOM) loses
    nothing that completed; `fsync` runs every `flush_every` records or `flush_interval_s` seconds, so a
    machine crash loses at most that much.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_every: int = 1000,
        flush_interval_s: float = 1.0,
        uploader: PartUploader | None = None,
    ):
        self.path = Path(path)
        self.uploader = uploader
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _cut_torn_tail(self.path)
        self._handle = open(self.path, "ab")  # noqa: SIM115 - held open for the writer's life
        self._unsynced = 0
        self._flush_every = flush_every
        self._flush_interval = flush_interval_s
        self._last_flush = time.monotonic()

    def write(self, record: ResultRecord | dict[str, Any]) -> None:
        data = record.to_dict() if isinstance(record, ResultRecord) else record
        self._handle.write(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        self._handle.flush()
        self._unsynced += 1
        if self._unsynced >= self._flush_every or time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()
        if self.uploader is not None:
            self.uploader.appended()

    def flush(self) -> None:
        self._handle.flush()
        if self._unsynced:
            os.fsync(self._handle.fileno())
            self._unsynced = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._handle.closed:
            self.flush()
            self._handle.close()
            if self.uploader is not None:
                self.uploader.upload()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
