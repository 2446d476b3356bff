"""The results file: one JSON record per line, appended as requests complete, durable in batches.

A crash loses at most the records not yet flushed (the in-flight ones and one flush interval). A torn last
line left by a crash is cut off when the file is opened again, and `LineSet` tells a restarted run which
lines already succeeded, so they are never sent (or paid for) twice.

Where the machine's disk does not outlive the run (a container of a work pool), the file is also uploaded
as immutable parts (`PartUploader`): what was appended since the last part, every `every_rows` records or
`every_s` seconds, whichever comes first, and at the end. A run on another machine starts from the parts.
Uploads happen in a thread, retried with backoff: a store that cannot be reached delays parts, and never
fails a write of a request already paid for.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .records import ResultRecord

__all__ = ["LineSet", "ResultsWriter", "read_records", "succeeded_lines", "succeeded_requests"]

logger = logging.getLogger(__name__)


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
    new immutable part object `part-<time>-<writer>.jsonl` under `remote_dir`.

    Uploads run in a thread of their own, never in the caller's (the event loop sending requests): a store
    that is slow or unreachable delays parts, never requests. A part that cannot be written is written again
    with backoff, under the same name and with the same bytes (so a write that succeeded unbeknownst to us is
    only repeated); what was appended meanwhile goes in the next part. `close` uploads the rest, retrying for
    up to `close_timeout_s` (a store may be unreachable for a while), and raises only then.
    """

    def __init__(
        self,
        storage: Any,
        remote_dir: str,
        local_path: str | os.PathLike[str],
        *,
        every_rows: int = 500,
        every_s: float = 10.0,
        close_timeout_s: float = 300.0,
    ) -> None:
        self.storage = storage
        self.remote_dir = remote_dir.rstrip("/")
        self.local_path = Path(local_path)
        self.every_rows = every_rows
        self.every_s = every_s
        self.close_timeout_s = close_timeout_s
        self._writer = uuid.uuid4().hex[:8]
        self._offset = self.local_path.stat().st_size if self.local_path.exists() else 0  # already uploaded
        self._rows = 0
        self._last = time.monotonic()
        self.parts = 0
        #: Failed writes so far, and the last error (for logs and tests).
        self.failures = 0
        self.last_error: BaseException | None = None
        self._part: tuple[str, int, int] | None = None  # the part being written: name, start, end
        self._uploading = threading.Lock()
        self._wake = threading.Condition()
        self._due = False
        self._closed = False
        self._give_up_at: float | None = None
        self._thread: threading.Thread | None = None

    def appended(self, rows: int = 1) -> None:
        """Rows were appended to the file: ask for a part when enough rows or time have gone by (never blocks)."""
        self._rows += rows
        if self._rows >= self.every_rows or time.monotonic() - self._last >= self.every_s:
            self._rows = 0
            self._last = time.monotonic()
            with self._wake:
                self._due = True
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="prefect-anthropic-parts", daemon=True)
                    self._thread.start()
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                self._due = False
            self._upload_with_retries()

    def _upload_with_retries(self) -> bool:
        """Upload everything appended so far: whether it is uploaded (False only past the close deadline)."""
        with self._uploading:
            delay = 0.2
            while True:
                try:
                    while self._upload_part():
                        pass  # and what was appended while that part was on its way
                    return True
                except Exception as exc:
                    self.failures += 1
                    self.last_error = exc
                    if self.failures == 1 or self.failures % 10 == 0:
                        logger.warning(
                            "Could not upload results to %s (%s: %s); they are kept here and uploaded again",
                            self.remote_dir, type(exc).__name__, exc,
                        )  # fmt: skip
                    if self._give_up_at is not None and time.monotonic() + delay > self._give_up_at:
                        return False
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)

    def _upload_part(self) -> bool:
        """Upload the next part: whether there was one."""
        if self._part is None:
            with open(self.local_path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1  # complete lines only
            if not end:
                return False
            name = f"part-{time.time_ns():020d}-{self._writer}.jsonl"
            self._part = (name, self._offset, self._offset + end)
        name, start, stop = self._part
        with open(self.local_path, "rb") as handle:
            handle.seek(start)
            data = handle.read(stop - start)
        self.storage.write_bytes(f"{self.remote_dir}/{name}", data, immutable=True)
        self._part = None
        self._offset = stop
        self.parts += 1
        return True

    def upload(self) -> None:
        """Upload what is there now, in the caller's thread, retrying until `close_timeout_s` from now."""
        self._give_up_at = time.monotonic() + self.close_timeout_s
        try:
            if not self._upload_with_retries():
                raise OSError(
                    f"results could not be uploaded to {self.remote_dir} for {self.close_timeout_s:.0f} s "
                    f"({self.last_error!r}); they are kept in {self.local_path}"
                )
        finally:
            self._give_up_at = None

    def close(self) -> None:
        """Upload the rest (see `upload`) and stop the upload thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self.upload()


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
        # Unbuffered: each record goes to the OS in whole-line writes this class controls, so a write the disk
        # cuts short can be undone (see _append_whole), never left as half a line with the rest in a buffer.
        self._handle = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held open for the writer's life
        self._cut_to: int | None = None  # where a failed record began, when cutting it off failed too
        self._unwritten: list[bytes] = []  # records the disk refused, written again first
        self._unsynced = 0
        self._flush_every = flush_every
        self._flush_interval = flush_interval_s
        self._last_flush = time.monotonic()

    def write(self, record: ResultRecord | dict[str, Any]) -> None:
        """Save a record. Never raises: it is the answer to a request already paid for, so a write the disk
        refuses is kept and tried again with the next one (and at close, which raises if it still fails)."""
        data = record.to_dict() if isinstance(record, ResultRecord) else record
        self._unwritten.append(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        try:
            self._write_unwritten()
            self._unsynced += 1
            if self._unsynced >= self._flush_every or time.monotonic() - self._last_flush >= self._flush_interval:
                self.flush()
        except OSError as exc:
            logger.error("Could not write to %s (%s); %d records kept to write again", self.path, exc,
                         len(self._unwritten))  # fmt: skip
            return
        if self.uploader is not None:
            self.uploader.appended()

    def _write_unwritten(self) -> None:
        if self._handle.closed:
            # A record that comes after close (a request that outlived its shard) is still saved.
            logger.warning("A record came after %s was closed; appended to it all the same", self.path)
            with open(self.path, "ab", buffering=0) as late:
                while self._unwritten:
                    self._append_whole(late, self._unwritten[0])
                    self._unwritten.pop(0)
            return
        while self._unwritten:
            self._append_whole(self._handle, self._unwritten[0])
            self._unwritten.pop(0)

    def _append_whole(self, handle: Any, data: bytes) -> None:
        """Append one record's line whole, or leave the file as it was: a disk that fills up mid-line cuts the
        write short, and the record written again later must not follow half of itself on one unparsable line
        (it would be lost, though paid for)."""
        fd = handle.fileno()
        if self._cut_to is not None:  # a record that failed earlier is still partly there: cut it off first
            os.ftruncate(fd, self._cut_to)
            self._cut_to = None
        start = os.fstat(fd).st_size  # appending: the line goes at the end
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                count = handle.write(view[written:])  # short when the disk fills up; raises at the next write
                if not count:
                    raise OSError(errno.ENOSPC, "no byte written")
                written += count
        except OSError:
            if written:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    self._cut_to = start
            raise

    def flush(self) -> None:
        try:
            self._write_unwritten()
            self._handle.flush()
            if self._unsynced:
                os.fsync(self._handle.fileno())
                self._unsynced = 0
        except (OSError, ValueError) as exc:  # a full disk, or closed: the next write or close tries again
            logger.error("Could not flush %s: %s", self.path, exc)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Save everything, then upload the rest (retrying for a while): raises only when that fails."""
        if not self._handle.closed:
            self._write_unwritten()
            self.flush()
            self._handle.close()
            if self.uploader is not None:
                self.uploader.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
