"""Run a stream of requests through a client: bounded memory, results as they complete, resumable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .client import AnthropicClient
from .errors import FatalAPIError, RunStopped
from .records import AnswerTotals, RequestItem, ResultRecord
from .results_file import LineSet, ResultsWriter

__all__ = ["Progress", "RunStopped", "done_before", "run_requests"]

logger = logging.getLogger(__name__)


@dataclass
class Progress(AnswerTotals):
    """Counters of one run, handed to the progress callback and returned at the end (the tokens and dollars
    of its answers: `AnswerTotals`)."""

    done: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    in_flight: int = 0
    attempts: int = 0
    elapsed_s: float = 0.0
    errors_by_type: Counter[str] = field(default_factory=Counter)

    def add(self, record: ResultRecord) -> None:
        self.done += 1
        self.attempts += record.attempts
        if record.succeeded:
            self.succeeded += 1
            self.add_answer(record.usage, record.cost_usd, record.estimated_input_tokens)
        else:
            self.failed += 1
            self.errors_by_type[record.error_type or "unknown"] += 1

    @property
    def requests_per_minute(self) -> float:
        return 60.0 * self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[Progress], None]


async def _aiter(items: Iterable[RequestItem] | AsyncIterable[RequestItem]):
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def done_before(done: LineSet | Mapping[int, str], item: RequestItem) -> bool:
    """Whether `item` already succeeded: same line and, where both are known, the same request digest."""
    if isinstance(done, Mapping):
        digest = done.get(item.line)
        return digest is not None and (digest == item.digest or not digest or not item.digest)
    return item.line in done


async def run_requests(
    client: AnthropicClient,
    items: Iterable[RequestItem] | AsyncIterable[RequestItem],
    *,
    writer: ResultsWriter | None = None,
    on_record: Callable[[ResultRecord], None] | None = None,
    on_skip: Callable[[RequestItem], None] | None = None,
    already_succeeded: LineSet | Mapping[int, str] | None = None,
    on_progress: ProgressCallback | None = None,
    progress_interval_s: float = 1.0,
    stop: asyncio.Event | threading.Event | None = None,
    drain_timeout_s: float = 60.0,
    read_ahead: int = 256,
) -> Progress:
    """Send every item not in `already_succeeded`; write each record as it completes.

    The input is read only as fast as requests are sent: at most `read_ahead` requests wait for the rate
    limiter (or the budget, a cache warm-up...) at once, and at most `client.max_concurrency` more are in
    flight, so memory follows what the limits let through, never the size of the input. Raises the
    client's FatalAPIError (after saving what finished) when the run must stop, and RunStopped when `stop`
    was set.
    """
    progress = Progress()
    started = time.monotonic()
    waiting = asyncio.Semaphore(read_ahead)
    window = asyncio.Semaphore(client.max_concurrency + read_ahead)
    pending: set[asyncio.Task[None]] = set()
    left_unsent = False  # a request the stop kept from being sent, though every line was read before it

    def report() -> None:
        progress.elapsed_s = time.monotonic() - started
        progress.in_flight = len(pending)
        if on_progress is not None:
            on_progress(progress)

    async def one(item: RequestItem) -> None:
        nonlocal left_unsent
        admitted = False

        def on_admitted() -> None:
            nonlocal admitted
            if not admitted:
                admitted = True
                waiting.release()  # on its way: the next line of input may be read

        try:
            record = await client.send(item, on_admitted=on_admitted)
        except (FatalAPIError, RunStopped) as error:
            left_unsent = left_unsent or isinstance(error, RunStopped)
            return  # not sent, or the run stops: the dispatcher sees it and ends the run
        finally:
            on_admitted()
            window.release()
        progress.add(record)
        if writer is not None:
            writer.write(record)
        if on_record is not None:
            on_record(record)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(min(progress_interval_s, 0.25) if stop is not None else progress_interval_s)
            if stop is not None and stop.is_set():
                client.stop_admitting()  # requests still waiting for the limiter are not sent
            if writer is not None:
                writer.flush()
            report()

    tick = asyncio.create_task(ticker())
    stopped = False
    reading_failed: BaseException | None = None
    try:
        try:
            async for item in _aiter(items):
                if already_succeeded is not None and done_before(already_succeeded, item):
                    progress.skipped += 1
                    if on_skip is not None:
                        on_skip(item)
                    continue
                await waiting.acquire()
                await window.acquire()
                if client.fatal_error is not None or client.stopping or (stop is not None and stop.is_set()):
                    window.release()
                    waiting.release()
                    stopped = True
                    break
                task = asyncio.create_task(one(item))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except Exception as error:
            # The input cannot be read on (a store unreachable, a file gone): the requests already read still go,
            # and every one is saved, before the error is raised (they may be paid for).
            reading_failed = error
        if pending:
            if stopped and client.fatal_error is None:
                client.stop_admitting()
                # Give in-flight requests a bounded time to finish and be saved; the rest is abandoned
                # (and sent again by the next run).
                _done, not_done = await asyncio.wait(pending, timeout=drain_timeout_s)
                for task in not_done:
                    task.cancel()
                await asyncio.gather(*not_done, return_exceptions=True)
            else:
                # Every request in flight ends and is saved before anything is raised: they may be paid for.
                outcomes = await asyncio.gather(*pending, return_exceptions=True)
                failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
                if failed is not None:
                    raise failed
    finally:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
        if writer is not None:
            writer.flush()
        report()
    if client.fatal_error is not None:
        raise client.fatal_error
    if reading_failed is not None:
        raise reading_failed
    if stopped or left_unsent:
        raise RunStopped(f"stopped after {progress.done} requests; run again to resume")
    return progress
