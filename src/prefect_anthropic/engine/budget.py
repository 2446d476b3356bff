"""A hard spending limit: never pay more than asked, whatever fails on the way.

Before each attempt is sent, its worst case is reserved: a bound on its input tokens that no tokenizer can
exceed (the bytes of the request as sent: a token is at least one byte; an image counts as the most an
image can cost; what the bytes do not size, an image or PDF by URL or file id, a PDF's pages, a server
tool's results, counts as the model's context window for each sampling pass, plus the tools' per-use fees
times their `max_uses`), every input token at the dearest price it could be billed at (a cache write where the
request has a breakpoint), `max_tokens` of output, and every multiplier of the model table (long context,
fast mode, US-only inference, batch). A reply settles the reservation to its real cost; an error answer
that is not billed (429, 5xx before any output) gives it back; anything else (a connection lost after
the request was sent, a stream cut or ended by an error event, a task cancelled) keeps it, as the request
may have been billed. An attempt that does not fit waits while attempts in flight hold reservations
(they usually settle for less); when it cannot fit even if they settle at nothing, the budget is
exhausted: nothing more is sent, and every request after it becomes a `budget_exhausted` row, so the same
command with a higher limit resumes from there.

Before an attempt is sent, its reservation is in a journal beside the output (on object storage: written
to the bucket, the request waiting for it), and its settlement follows when it is known, so a run that is
killed, and the next run of the same dataset, know what may have been paid: a reservation without its
settlement counts as spent at its worst case. (Attempts still waiting for the rate limiter when the run
dies were never sent, and are not in the journal.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..api.formatting import money
from ..api.models import ModelInfo, ModelTable, Usage, cost_usd, model_table, unpriced_reason
from .caching import cached_prefix
from .errors import RunStopped
from .records import RequestItem, ResultRecord

__all__ = [
    "Budget",
    "JournalUnavailable",
    "SpendingJournal",
    "journaled_spending",
    "max_input_tokens",
    "unbudgeted_reason",
    "worst_case_cost",
]

logger = logging.getLogger(__name__)

#: The most one image can cost, in tokens (an image is scaled down to fit; high-resolution models included).
_IMAGE_TOKENS = 5_000
#: Tokens the API may add to a request beyond its bytes: turn markers, the system prompt of tool use or of
#: structured outputs.
_ADDED_TOKENS = 256
_ADDED_TOKENS_WITH_TOOLS = 2_048


#: Server tools run at Anthropic (`web_search_20250305`...): what they return becomes input tokens the
#: request's bytes do not size, each use may start another sampling pass over the whole context (usage adds
#: up over the passes), and some are billed per use (`[server_tool_fees]` of the model table).
_SERVER_TOOLS = ("web_search", "web_fetch", "code_execution", "tool_search_tool_bm25", "tool_search_tool_regex")


def _blocks(content: Any) -> Iterator[dict[str, Any]]:
    """Every content block of a message's content, those inside tool results and documents included."""
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        yield block
        if block.get("type") == "tool_result":
            yield from _blocks(block.get("content"))
        source = block.get("source")
        if block.get("type") == "document" and isinstance(source, dict) and source.get("type") == "content":
            yield from _blocks(source.get("content"))


def _message_blocks(body: Any) -> Iterator[dict[str, Any]]:
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            yield from _blocks(message.get("content"))


def _images(body: Any) -> Iterator[dict[str, Any]]:
    """The sources of base64 images: sized at the most an image costs, whatever their bytes."""
    for block in _message_blocks(body):
        source = block.get("source")
        if block.get("type") == "image" and isinstance(source, dict) and isinstance(source.get("data"), str):
            yield source


def _unsized_content(body: Any) -> str | None:
    """What in the request its bytes do not size (None when nothing): an image or document by URL or file id
    (fetched by the API), or a base64 PDF (each page is read as text and as an image, and its streams are
    compressed, so its tokens are not bounded by its bytes)."""
    for block in _message_blocks(body):
        kind = block.get("type")
        source = block.get("source")
        if kind not in ("image", "document") or not isinstance(source, dict):
            continue
        where = source.get("type")
        if where in ("url", "file"):
            given = "URL" if where == "url" else "file id"
            return f"{'an image' if kind == 'image' else 'a document'} given by {given}"
        if kind == "document" and where == "base64" and source.get("media_type") == "application/pdf":
            return "a PDF document"
    return None


def _server_tools(body: Any) -> list[tuple[str, int | None]]:
    """(name, max_uses) of every server tool the request offers; MCP servers count as one, uses unbounded."""
    found: list[tuple[str, int | None]] = []
    for tool in body.get("tools") or ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        name = kind.rsplit("_", 1)[0] if isinstance(kind, str) and kind.rsplit("_", 1)[-1].isdigit() else kind
        if name in _SERVER_TOOLS:
            uses = tool.get("max_uses")
            found.append((name, uses if isinstance(uses, int) and not isinstance(uses, bool) and uses >= 0 else None))
    if body.get("mcp_servers"):
        found.append(("mcp_servers", None))
    return found


def max_input_tokens(
    body: dict[str, Any], payload_bytes: int | None = None, *, context_window: int | None = None
) -> int | None:
    """A bound on the input tokens of a request: its bytes as sent (base64 images at the most an image
    costs), plus what the API adds. Content the bytes do not size (see _unsized_content) is bounded by the
    model's context window, and server tools by one window for each sampling pass their uses may start:
    None when that bound is needed and not known (the window, or a tool's max_uses)."""
    tools = _server_tools(body)
    if tools or _unsized_content(body) is not None:
        uses = [max_uses for _, max_uses in tools]
        if context_window is None or None in uses:
            return None
        return context_window * (1 + sum(n for n in uses if n is not None))
    size = payload_bytes if payload_bytes is not None else len(orjson.dumps(body))
    for source in _images(body):
        size += _IMAGE_TOKENS - len(source["data"])
    tooled = bool(body.get("tools") or body.get("output_config") or body.get("output_format"))
    return max(1, size) + (_ADDED_TOKENS_WITH_TOOLS if tooled else _ADDED_TOKENS)


def _worst_case(
    info: ModelInfo | str, body: dict[str, Any], payload_bytes: int | None, batch: bool, models: ModelTable | None
) -> tuple[float | None, str | None]:
    """(the most a request can cost, None and why it cannot be bounded)."""
    models = models or model_table()
    model = info if isinstance(info, ModelInfo) else models.lookup(info)
    name = model.id if model is not None else str(info)
    tools = _server_tools(body)
    input_tokens = max_input_tokens(body, payload_bytes, context_window=model.context_window if model else None)
    if input_tokens is None:
        unbounded = next((tool for tool, uses in tools if uses is None), None)
        if unbounded is not None:
            return None, f"its server tool {unbounded} has no max_uses, so what it may cost has no bound"
        what = _unsized_content(body) or f"server tools ({', '.join(tool for tool, _ in tools)})"
        return None, (
            f"it holds {what}, whose size its bytes do not tell, and the model table has no context window for "
            f"{name!r} to bound it (set context_window in a --models-file)"
        )
    fees = 0.0
    for tool, uses in tools:
        fee = models.server_tool_fees.get(tool)
        if fee is None:
            return None, (
                f"the model table has no per-use fee for the server tool {tool} (set [server_tool_fees] {tool} = "
                "dollars in a --models-file)"
            )
        fees += fee * (uses or 0)
    # Each sampling pass a server tool starts may write up to max_tokens again.
    passes = 1 + sum(uses or 0 for _, uses in tools)
    prefix = cached_prefix(body)
    one_hour = prefix is not None and prefix.ttl_s >= 3600.0
    max_tokens = body.get("max_tokens")
    usage = Usage(
        # A request with a cache breakpoint may write its whole prompt to the cache: price it as a write.
        input_tokens=0 if prefix is not None else input_tokens,
        cache_creation_input_tokens=input_tokens if prefix is not None else 0,
        cache_creation_1h_input_tokens=input_tokens if one_hour else 0,
        output_tokens=passes * max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0,
        speed=body.get("speed"),
        inference_geo=body.get("inference_geo"),
    )
    cost = cost_usd(model or name, usage, batch=batch)
    if cost is None:
        return None, unpriced_reason(model or name, usage)
    # Fees are not known to take the batch discount: added at their full price.
    return cost + fees, None


def worst_case_cost(
    info: ModelInfo | str,
    body: dict[str, Any],
    *,
    payload_bytes: int | None = None,
    batch: bool = False,
    models: ModelTable | None = None,
) -> float | None:
    """The most a request can cost (None when it cannot be bounded: see unbudgeted_reason)."""
    return _worst_case(info, body, payload_bytes, batch, models)[0]


def unbudgeted_reason(
    info: ModelInfo | str | None, body: dict[str, Any], models: ModelTable | None = None
) -> str | None:
    """Why a budget cannot be kept for this request (None when it can): the words of its row."""
    return _worst_case(info or str(body.get("model") or "(no model)"), body, None, False, models)[1]


class JournalUnavailable(RunStopped):
    """A reservation could not be put in the spending journal (it is closed, or its writer failed): its request
    is not sent, and the run stops sending; running it again resumes."""


class SpendingJournal:
    """Append-only record of one client's attempts: `{"r": id, "usd": worst}` as an attempt is sent,
    `{"s": id, "usd": actual}` when its cost is known (0 for an answer not billed).

    Beside a local output, a file: each entry is handed to the OS as it is written, so a killed process's
    reservations survive it. Beside an output on object storage (`remote_dir`), where the machine's disk does
    not outlive the run, the journal is a directory of immutable parts `part-<n>.jsonl`, and a reservation
    must be in a part before its request is sent: `asent` waits for that (group commit: one PUT carries every
    reservation made while the one before it was on its way, so throughput holds). A part that cannot be
    written is written again, under the same name and with the same content, until it is: the requests
    waiting for it are not sent meanwhile. Settlements ride on the next part, or one every `settle_every_s`,
    and at close: until then a rerun counts their reservations at the worst case, which is safe.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        storage: Any = None,
        remote_dir: str | None = None,
        settle_every_s: float = 2.0,
        close_timeout_s: float = 300.0,
    ):
        name = uuid.uuid4().hex
        self._open: set[int] = set()
        self.remote_dir = f"{remote_dir.rstrip('/')}/{name}" if remote_dir is not None else None
        self.storage = storage
        self.settle_every_s = settle_every_s
        self.close_timeout_s = close_timeout_s
        self.parts = 0
        self._closed = False
        self._handle: Any = None
        if self.remote_dir is None:
            if directory is None:
                raise ValueError("a spending journal needs a directory, or storage and a remote_dir")
            self.path: Path | None = Path(directory) / f"{name}.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "ab")  # noqa: SIM115 - held open for the client's life
        else:
            self.path = None
        # Remote: entries not in a part yet, the number of entries written so far, and of those in parts.
        self._pending: list[bytes] = []
        self._written = 0
        self._durable = 0
        self._committing = threading.Lock()  # one part at a time, from the event loop's writer or `close`
        self._urgent = False  # a reservation waits for the next part
        self._closing = False
        self._give_up_at: float | None = None  # monotonic; set at close: retries stop there
        self._wake: asyncio.Event | None = None
        #: Set whenever a part is written or a writer ends: every waiter re-checks. One per event loop, never
        #: replaced while waiters may hold it (a new writer must wake the waiters of the one before).
        self._committed: asyncio.Event | None = None
        self._events_loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.Task[None] | None = None
        self._lost = False  # close gave up: entries pending then were never written

    @property
    def remote(self) -> bool:
        return self.remote_dir is not None

    def sent(self, entry: int, usd: float) -> None:
        """Record a reservation. Locally it is durable on return; remotely, once `await commit()` returns."""
        self._open.add(entry)
        self._write({"r": entry, "usd": usd})

    async def asent(self, entry: int, usd: float) -> None:
        """Record a reservation and return once a rerun (or another worker) would read it."""
        self.sent(entry, usd)
        await self.commit()

    def settle(self, entry: int, usd: float) -> None:
        """The cost of an attempt that was sent (one never sent left nothing to settle)."""
        if entry in self._open:
            self._open.discard(entry)
            self._write({"s": entry, "usd": usd}, urgent=False)

    def _write(self, data: dict[str, Any], *, urgent: bool = True) -> None:
        line = orjson.dumps(data) + b"\n"
        if self._handle is not None:
            # Handed to the OS before the attempt is sent: a killed process's reservations survive it.
            self._handle.write(line)
            self._handle.flush()
            return
        self._pending.append(line)
        self._written += 1
        if urgent:
            self._urgent = True
            with contextlib.suppress(RuntimeError):  # no event loop: the entry waits for `commit` or `close`
                self._start_writer()
                assert self._wake is not None
                self._wake.set()

    async def commit(self) -> None:
        """Wait until every entry written so far is in a part (at once, locally). Cancelling the wait leaves
        the entries to the next part: a reservation recorded for a request never sent only counts safe.

        Never waits forever: JournalUnavailable (so the request is not sent) once no writer can write the
        entries: the journal closed without them, or its writer failed."""
        if self._handle is not None or self._durable >= self._written:
            return
        target = self._written
        while self._durable < target:
            if self._closing and (self._lost or self._writer is None or self._writer.done()):
                # Closed (or closing with no writer left): what is not written by now never will be here.
                raise JournalUnavailable(
                    "the spending journal is closed"
                    + (f" and could not be written to {self.remote_dir}" if self._lost else "")
                    + ": this request is not sent; run again to resume"
                )
            writer = self._writer
            if writer is not None and writer.done() and not writer.cancelled() and writer.exception() is not None:
                self._writer = None  # the next reservation starts a fresh writer
                raise JournalUnavailable(
                    f"the spending journal's writer failed ({writer.exception()!r}): this request is not sent; run "
                    "again to resume"
                ) from writer.exception()
            self._start_writer()
            assert self._wake is not None and self._committed is not None
            self._urgent = True
            self._wake.set()
            self._committed.clear()
            await self._committed.wait()

    def _start_writer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._events_loop is not loop:  # events belong to one loop (a journal may outlive one asyncio.run)
            self._wake, self._committed, self._events_loop = asyncio.Event(), asyncio.Event(), loop
        if (self._writer is None or self._writer.done()) and not self._closing:
            self._writer = loop.create_task(self._write_parts())
            committed = self._committed
            assert committed is not None
            # However the writer ends (returned, failed, cancelled, even before it ran): its waiters re-check.
            self._writer.add_done_callback(lambda _task: committed.set())

    async def _write_parts(self) -> None:
        """Write what is pending as one part as soon as a reservation waits for it (settlements alone: after
        `settle_every_s`), retrying while the store cannot be reached."""
        assert self._wake is not None and self._committed is not None
        while not self._closing:
            if not self._urgent:
                self._wake.clear()
                if self._pending:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settle_every_s)
                else:
                    await self._wake.wait()
                if self._closing or not self._pending:
                    continue
            self._urgent = False
            await asyncio.to_thread(self._commit_pending)
            self._committed.set()

    def _commit_pending(self) -> bool:
        """Write the pending entries as the next part, retrying with backoff (once the journal is closing,
        until its deadline): whether they are written. Runs in a thread: the event loop goes on meanwhile."""
        assert self.remote_dir is not None
        with self._committing:
            count = len(self._pending)
            if not count:
                return True
            data = b"".join(self._pending[:count])
            # Retried under the same name, with the same content: a write that succeeded without us knowing it
            # is only written again.
            location = f"{self.remote_dir}/part-{self.parts:010d}.jsonl"
            delay, failures = 0.1, 0
            while True:
                try:
                    self.storage.write_bytes(location, data, immutable=True)
                    break
                except Exception as exc:
                    failures += 1
                    if failures == 1 or failures % 10 == 0:
                        logger.warning(
                            "Could not write the spending journal to %s (%s: %s); requests wait for it, retrying",
                            location, type(exc).__name__, exc,
                        )  # fmt: skip
                    if self._give_up_at is not None and time.monotonic() + delay > self._give_up_at:
                        return False
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
            del self._pending[:count]
            self._durable += count
            self.parts += 1
            return True

    def close(self) -> None:
        """Write what is left (remotely: retrying for up to `close_timeout_s`). Settlements that cannot be
        written are logged, not raised: a rerun counts their reservations at the worst case."""
        self._closing = True
        if self._closed:
            return
        self._closed = True
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            return
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + self.close_timeout_s
        if not self._commit_pending():
            self._lost = True
            logger.error(
                "The spending journal could not be written to %s for %.0f s: %d entries are lost (a rerun counts "
                "the attempts they settle at their worst case)", self.remote_dir, self.close_timeout_s,
                len(self._pending),
            )  # fmt: skip

    async def aclose(self) -> None:
        """`close`, without blocking the event loop; then every waiter is woken (returning, or raising
        JournalUnavailable when its entry could not be written)."""
        self._closing = True
        if self._handle is None and self._give_up_at is None:
            self._give_up_at = time.monotonic() + self.close_timeout_s
        try:
            if self._writer is not None and not self._writer.done():
                assert self._wake is not None
                self._wake.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            await asyncio.to_thread(self.close)
        finally:
            if self._committed is not None and self._events_loop is asyncio.get_running_loop():
                self._committed.set()


def _journal_total(lines: Iterable[bytes]) -> float:
    total = 0.0
    reserved: dict[int, float] = {}
    for raw in lines:
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # a torn last line
        if "r" in entry:
            reserved[entry["r"]] = float(entry["usd"])
        elif "s" in entry:
            reserved.pop(entry["s"], None)
            total += float(entry["usd"])
    return total + sum(reserved.values())


def journaled_spending(location: str | os.PathLike[str], storage: Any = None) -> float | None:
    """What the journals at `location` say was (or may have been) paid: settled costs, and the worst case of
    every attempt sent but never settled (its process was killed with the request in flight). None when
    there is no journal. `location` is a local directory of journal files, or (with `storage`) a URL under
    which each journal is a directory of parts."""
    if storage is not None and "://" in str(location) and not str(location).startswith("file://"):
        journals = storage.list(str(location), "*")
        if not journals:
            return None
        # A journal is many small parts (one per group of requests sent together): read them side by side.
        parts = storage.list(str(location), "*/part-*.jsonl")
        with ThreadPoolExecutor(max_workers=16) as pool:
            contents = dict(zip(parts, pool.map(storage.read_bytes, parts), strict=True))
        by_journal: dict[str, list[bytes]] = {}
        for part in parts:  # sorted: each journal's parts in the order they were written
            by_journal.setdefault(part.rsplit("/", 1)[0], []).extend(contents[part].splitlines())
        return sum(_journal_total(lines) for lines in by_journal.values())
    directory = Path(str(location).removeprefix("file://"))
    paths = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    if not paths:
        return None
    total = 0.0
    for path in paths:
        with open(path, "rb") as handle:
            total += _journal_total(handle)
    return total


@dataclass
class Budget:
    """Dollars this run may still commit: `limit_usd` less what is spent (earlier runs of the same dataset
    included) and what is reserved by attempts in flight. Without a limit it only keeps the journal."""

    limit_usd: float | None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    exhausted: bool = False
    journal: SpendingJournal | None = None
    #: Reservations of batch requests in flight, by line: (worst case, journal entry), settled from results
    #: (`hold_for_batch`, `batch_sent`, `settle_batch`).
    holds: dict[int, tuple[float, int]] = field(default_factory=dict)
    #: Reservations not settled yet.
    holding: int = 0
    _settled: asyncio.Event | None = field(default=None, repr=False)
    _entries: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def reserve(self, worst_usd: float) -> int | None:
        """Take `worst_usd` now: the reservation's number (its journal entry), or None when it does not fit now
        (and the budget is exhausted when it would not fit even with nothing in flight)."""
        if self.exhausted:
            return None
        limit = self.limit_usd
        if limit is not None and self.spent_usd + self.reserved_usd + worst_usd > limit:
            if self.holding == 0 or self.spent_usd + worst_usd > limit:
                self.exhausted = True
            return None
        self.reserved_usd += worst_usd
        self.holding += 1
        return next(self._entries)

    def sent(self, entry: int, worst_usd: float) -> None:
        """The reserved attempt is about to be sent: record it in the journal. Beside a remote output it is only
        durable once `await acommit()` returns (see `asent`)."""
        if self.journal is not None:
            self.journal.sent(entry, worst_usd)

    async def asent(self, entry: int, worst_usd: float) -> None:
        """The reserved attempt is about to be sent: returns once the journal a rerun (or another worker) reads
        holds its worst case, so from then on it may be billed, whatever happens to this process. While the
        journal cannot be written it waits (nothing is sent meanwhile); it never raises for that."""
        if self.journal is not None:
            await self.journal.asent(entry, worst_usd)

    async def acommit(self) -> None:
        """Wait until every attempt recorded with `sent` is durable in the journal."""
        if self.journal is not None:
            await self.journal.commit()

    async def areserve(self, worst_usd: float) -> int | None:
        """`reserve`, waiting while attempts in flight hold the room it needs; None when exhausted."""
        while True:
            entry = self.reserve(worst_usd)
            if entry is not None or self.exhausted:
                return entry
            if self._settled is None:
                self._settled = asyncio.Event()
            self._settled.clear()
            await self._settled.wait()

    def _release(self, reserved_usd: float) -> None:
        self.holding -= 1
        self.reserved_usd = self.reserved_usd - reserved_usd if self.holding else 0.0  # no float dust left
        if self._settled is not None:
            self._settled.set()

    def _spend(self, usd: float) -> None:
        self.spent_usd += usd

    def settle(self, reserved_usd: float, actual_usd: float | None, entry: int | None = None) -> None:
        """The attempt was answered (or may have been billed): its real cost, or the reservation, is spent."""
        spent = reserved_usd if actual_usd is None else actual_usd
        self._spend(spent)
        if self.journal is not None and entry is not None:
            self.journal.settle(entry, spent)
        self._release(reserved_usd)

    def refund(self, reserved_usd: float, entry: int | None = None) -> None:
        """The attempt was not billed (an error answer, or never sent): give its reservation back."""
        if self.journal is not None and entry is not None:
            self.journal.settle(entry, 0.0)
        self._release(reserved_usd)

    @contextlib.asynccontextmanager
    async def hold(self, worst_usd: float) -> AsyncIterator[BudgetHold | None]:
        """Reserve one attempt's worst case, waiting while attempts in flight hold the room it needs (None:
        it cannot fit, the budget is exhausted); settled or refunded on exit (see BudgetHold)."""
        entry = await self.areserve(worst_usd)
        if entry is None:
            yield None
            return
        hold = BudgetHold(self, worst_usd, entry)
        try:
            yield hold
        finally:
            hold.close()

    def hold_for_batch(self, line: int, worst_usd: float) -> bool:
        """Reserve a batch request's worst case until its result is downloaded (`settle_batch`). A batch cannot
        wait for others to settle: a reservation that does not fit exhausts the budget (False)."""
        self.release_batch_hold(line)
        entry = self.reserve(worst_usd)
        if entry is None:
            self.exhausted = True
            return False
        self.holds[line] = (worst_usd, entry)
        return True

    def release_batch_hold(self, line: int) -> None:
        """Give back what the line held for a batch of an interrupted round that was never created."""
        stale = self.holds.pop(line, None)
        if stale is not None:
            self.refund(*stale)

    def batch_sent(self, line: int) -> None:
        """The batch holding the line's request is about to be created: from here on it may be billed."""
        worst_usd, entry = self.holds[line]
        self.sent(entry, worst_usd)

    def settle_batch(self, line: int, actual_usd: float) -> None:
        """The line's batch result is downloaded: its real cost is spent (nothing when it held no reservation)."""
        held = self.holds.pop(line, None)
        if held is not None:
            self.settle(held[0], actual_usd, held[1])

    async def aclose(self) -> None:
        if self.journal is not None:
            await self.journal.aclose()

    @property
    def remaining_usd(self) -> float | None:
        if self.limit_usd is None:
            return None
        return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)

    def exhausted_record(self, item: RequestItem, why: str | None = None, **fields: Any) -> ResultRecord:
        """The row of a request the budget did not let go: not sent; a later run with more budget sends it."""
        why = why or (
            f"the budget of {money(self.limit_usd)} is spent or committed ({money(self.spent_usd)} spent); run "
            "again with a higher --max-cost-usd to resume"
        )
        return ResultRecord.errored(item, "budget_exhausted", f"line {item.line}: not sent: {why}", **fields)


class BudgetHold:
    """One attempt's reservation of its worst case. Settled by what the answer cost, or refunded when the
    server did not bill it; on leaving its `async with` (`Budget.hold`), spent whole if its request left (it
    may have been billed) and refunded if it never did. `budget` None: a run without a budget, nothing held."""

    def __init__(self, budget: Budget | None, usd: float, entry: int | None) -> None:
        self.budget = budget
        self.usd = usd
        self.entry = entry
        #: The request went out: from here on, unless told otherwise, it may have been billed.
        self.left = False
        self._done = budget is None

    async def journal(self) -> None:
        """Before the request leaves: its worst case durable in the journal a rerun reads (see `asent`)."""
        if self.budget is not None and self.entry is not None:
            await self.budget.asent(self.entry, self.usd)

    def settle(self, actual_usd: float | None) -> None:
        """Answered: its real cost is spent (None: unknown, so the worst case)."""
        if not self._done and self.budget is not None:
            self._done = True
            self.budget.settle(self.usd, actual_usd, self.entry)

    def refund(self) -> None:
        """Not billed (an error answer, or never sent): the reservation is given back."""
        if not self._done and self.budget is not None:
            self._done = True
            self.budget.refund(self.usd, self.entry)

    def close(self) -> None:
        if self.left:
            self.settle(None)
        else:
            self.refund()
