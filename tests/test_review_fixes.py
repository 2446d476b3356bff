"""Fixes from a review of issue 25's working tree: a disk that fills up mid-record never costs a paid record
(item 8a), and a spending journal's waiters never wait forever (item 8b)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

from prefect_anthropic.engine.budget import SpendingJournal, journaled_spending
from prefect_anthropic.engine.errors import RunStopped
from prefect_anthropic.storage import Storage

# A child process with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored): a write that crosses it is cut short
# by the kernel, as on a disk that fills up mid-write, and the next write fails (EFBIG) until the limit is raised
# (space freed). The limit is the child's only: nothing else of the test run is touched.
_FILL_UP = textwrap.dedent(
    """
    import json, logging, resource, signal, sys
    from prefect_anthropic.engine.results_file import ResultsWriter

    path, padding = sys.argv[1], "x" * 200
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with ResultsWriter(path) as writer:
        writer.write({"line": 1, "status": "succeeded", "padding": padding})
        writer.flush()
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, hard))  # the disk fills up in the middle of record 2
        writer.write({"line": 2, "status": "succeeded", "padding": padding})
        writer.write({"line": 3, "status": "succeeded", "padding": padding})
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
        writer.write({"line": 4, "status": "succeeded", "padding": padding})
    """
)


def test_a_disk_that_fills_up_mid_record_loses_no_record(tmp_path):
    path = tmp_path / "shard-00000.jsonl"
    done = subprocess.run([sys.executable, "-c", _FILL_UP, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = path.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: no half record left in the file
    assert [record["line"] for record in records] == [1, 2, 3, 4]


class GatedStorage(Storage):
    """Real local storage whose writes wait until the test opens the gate (a store slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write_bytes(self, location: str, data: bytes, *, immutable: bool = False) -> None:
        self.gate.wait(30)
        super().write_bytes(location, data, immutable=immutable)


def _bucket() -> str:
    """A fresh location on fsspec's in-memory object store (journals there are directories of parts)."""
    return f"memory://review-fixes-{uuid.uuid4().hex}/spending"


async def test_journal_waiters_are_woken_when_the_writer_task_dies():
    """Review of issue 25, item 8b: a writer task that died was replaced by one with a new event, and the
    requests waiting on the old one waited forever (their reservation written all the same)."""
    storage = GatedStorage()
    location = _bucket()
    journal = SpendingJournal(storage=storage, remote_dir=location)
    first = asyncio.create_task(journal.asent(1, 0.5))
    while journal._writer is None or not journal._pending:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the writer is in its thread, waiting on the store
    journal._writer.cancel()  # the writer task dies (its thread goes on)
    with contextlib.suppress(asyncio.CancelledError):
        await journal._writer
    second = asyncio.create_task(journal.asent(2, 0.5))  # a new writer starts
    await asyncio.sleep(0.05)
    storage.gate.set()
    await asyncio.wait_for(second, 20)
    await asyncio.wait_for(first, 20)  # woken too: its reservation is in the journal
    await journal.aclose()
    assert journaled_spending(location, storage) == pytest.approx(1.0)


async def test_journal_waiters_end_unsent_when_the_journal_closes_without_writing_them(tmp_path):
    """After aclose nothing wakes a waiter: one whose reservation could not be written waited forever. It now
    ends with RunStopped (its request is not sent); a reservation made after the close too."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the journal's directory should be: every write fails")
    journal = SpendingJournal(storage=Storage(), remote_dir=str(blocker / "spending"), close_timeout_s=0.3)
    waiting = asyncio.create_task(journal.asent(1, 0.5))
    while not journal._writer or not journal._pending:
        await asyncio.sleep(0.01)
    await journal.aclose()
    with pytest.raises(RunStopped):
        await asyncio.wait_for(waiting, 20)
    with pytest.raises(RunStopped):
        await asyncio.wait_for(journal.asent(2, 0.5), 20)


async def test_a_reservation_after_close_of_a_writable_journal_is_written_or_refused():
    """A commit after aclose started a writer that exits at once: it waited forever."""
    location = _bucket()
    journal = SpendingJournal(storage=Storage(), remote_dir=location)
    await journal.asent(1, 0.25)
    await journal.aclose()
    with pytest.raises(RunStopped):
        await asyncio.wait_for(journal.asent(2, 0.25), 20)
    assert journaled_spending(location, Storage()) == pytest.approx(0.25)  # the refused one is not counted
