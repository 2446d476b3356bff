"""A hard spending limit: never pay more than asked, whatever fails on the way.

Before each attempt is sent, its worst case is reserved: a bound on its input tokens that no tokenizer can
exceed (the bytes of the request as sent: a token is at least one byte; an image counts as the most an
image can cost), every input token at the dearest price it could be billed at (a cache write where the
request has a breakpoint), `max_tokens` of output, and every multiplier of the model table (long context,
fast mode, US-only inference, batch). A reply settles the reservation to its real cost; an error answer
that is not billed (429, 5xx before any output) gives it back; anything else (a connection lost after
the request was sent, a stream cut or ended by an error event, a task cancelled) keeps it, as the request
may have been billed. An attempt that does not fit waits while attempts in flight hold reservations
(they usually settle for less); when it cannot fit even if they settle at nothing, the budget is
exhausted: nothing more is sent, and every request after it becomes a `budget_exhausted` row, so the same
command with a higher limit resumes from there.

The moment an attempt is sent, its reservation is appended to a journal in the output directory, and its
settlement when it is known, so a run that is killed, and the next run of the same dataset, know what may
have been paid: a sent reservation without its settlement counts as spent at its worst case. (Attempts
still waiting for the rate limiter when the run dies were never sent, and are not in the journal.)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..formatting import money
from ..models import ModelInfo, Usage, cost_usd
from .caching import cached_prefix
from .records import RequestItem, ResultRecord
from .results_file import PartUploader

__all__ = ["Budget", "SpendingJournal", "journaled_spending", "max_input_tokens", "worst_case_cost"]

#: The most one image can cost, in tokens (an image is scaled down to fit; high-resolution models included).
_IMAGE_TOKENS = 5_000
#: Tokens the API may add to a request beyond its bytes: turn markers, the system prompt of tool use or of
#: structured outputs.
_ADDED_TOKENS = 256
_ADDED_TOKENS_WITH_TOOLS = 2_048


def _images(body: Any) -> Iterator[dict[str, Any]]:
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "image":
                source = block.get("source")
                if isinstance(source, dict) and isinstance(source.get("data"), str):
                    yield source


def max_input_tokens(body: dict[str, Any], payload_bytes: int | None = None) -> int:
    """A bound on the input tokens of a request: its bytes as sent (base64 images at the most an image
    costs), plus what the API adds."""
    size = payload_bytes if payload_bytes is not None else len(orjson.dumps(body))
    for source in _images(body):
        size += _IMAGE_TOKENS - len(source["data"])
    tooled = bool(body.get("tools") or body.get("output_config") or body.get("output_format"))
    return max(1, size) + (_ADDED_TOKENS_WITH_TOOLS if tooled else _ADDED_TOKENS)


def worst_case_cost(
    info: ModelInfo | str, body: dict[str, Any], *, payload_bytes: int | None = None, batch: bool = False
) -> float | None:
    """The most a request can cost (None when the model table cannot price it)."""
    input_tokens = max_input_tokens(body, payload_bytes)
    prefix = cached_prefix(body)
    one_hour = prefix is not None and prefix.ttl_s >= 3600.0
    max_tokens = body.get("max_tokens")
    usage = Usage(
        # A request with a cache breakpoint may write its whole prompt to the cache: price it as a write.
        input_tokens=0 if prefix is not None else input_tokens,
        cache_creation_input_tokens=input_tokens if prefix is not None else 0,
        cache_creation_1h_input_tokens=input_tokens if one_hour else 0,
        output_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0,
        speed=body.get("speed"),
        inference_geo=body.get("inference_geo"),
    )
    return cost_usd(info, usage, batch=batch)


class SpendingJournal:
    """Append-only record of one client's attempts: `{"r": id, "usd": worst}` as an attempt is sent,
    `{"s": id, "usd": actual}` when its cost is known (0 for an answer not billed)."""

    def __init__(self, directory: str | os.PathLike[str], *, storage: Any = None, remote_dir: str | None = None):
        name = uuid.uuid4().hex
        self.path = Path(directory) / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")  # noqa: SIM115 - held open for the client's life
        self._open: set[int] = set()
        #: Where the machine's disk does not outlive the run: uploaded as parts every few seconds.
        self._uploader = (
            PartUploader(storage, f"{remote_dir.rstrip('/')}/{name}", self.path, every_rows=100, every_s=2.0)
            if remote_dir is not None
            else None
        )

    def sent(self, entry: int, usd: float) -> None:
        self._open.add(entry)
        self._write({"r": entry, "usd": usd})

    def settle(self, entry: int, usd: float) -> None:
        """The cost of an attempt that was sent (one never sent left nothing to settle)."""
        if entry in self._open:
            self._open.discard(entry)
            self._write({"s": entry, "usd": usd})

    def _write(self, data: dict[str, Any]) -> None:
        # Handed to the OS before the attempt is sent: a killed process's reservations survive it.
        self._handle.write(orjson.dumps(data) + b"\n")
        self._handle.flush()
        if self._uploader is not None:
            self._uploader.appended()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            if self._uploader is not None:
                self._uploader.upload()


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
        return sum(
            _journal_total(line for part in storage.list(journal, "part-*.jsonl") for line in
                           storage.read_bytes(part).splitlines())
            for journal in journals
        )  # fmt: skip
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
    #: Reservations of batch requests in flight, by line: (worst case, journal entry), settled from results.
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
        """The reserved attempt is being sent: from now on it may be billed, whatever happens to this process."""
        if self.journal is not None:
            self.journal.sent(entry, worst_usd)

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

    def settle(self, reserved_usd: float, actual_usd: float | None, entry: int | None = None) -> None:
        """The attempt was answered (or may have been billed): its real cost, or the reservation, is spent."""
        spent = reserved_usd if actual_usd is None else actual_usd
        self.spent_usd += spent
        if self.journal is not None and entry is not None:
            self.journal.settle(entry, spent)
        self._release(reserved_usd)

    def refund(self, reserved_usd: float, entry: int | None = None) -> None:
        """The attempt was not billed (an error answer, or never sent): give its reservation back."""
        if self.journal is not None and entry is not None:
            self.journal.settle(entry, 0.0)
        self._release(reserved_usd)

    async def aclose(self) -> None:
        if self.journal is not None:
            self.journal.close()

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
