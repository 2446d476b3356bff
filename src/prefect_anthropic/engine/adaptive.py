"""Under overload: how many requests of a limit class may be in flight, and when to give up.

The rate limiter says *when* a request may go; the window says *how many* may be out at once. The API
answers 529 `overloaded_error` at busy times and a gateway in front of it 503 when its own concurrency is
full: sending at a fixed concurrency into them only buys retries. The window adapts the way TCP and
Netflix's concurrency-limits do (AIMD): it starts small and doubles each round trip until the first
overload signal (slow start), shrinks multiplicatively on an overload signal (529, 503, a connection
reset, or a latency rising far above the lowest seen) at most once per round trip, and grows by about one
request per round trip of successes, up to `max_concurrency`, never below 1.

The circuit breaker gives up when nothing of a class has succeeded for `give_up_after_s` while requests
kept failing with retryable errors: the run stops admitting, finishes what is in flight, and exits,
resumable, with the status codes it saw.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["AdaptiveWindow", "CircuitBreaker"]

Clock = Callable[[], float]

_DECREASE = 0.9
#: A latency this many times the lowest seen (and the window above its floor) counts as overload.
_LATENCY_OVERLOAD = 4.0
_INITIAL = 8
#: At most one log line per class this often: a sawtooth around the server's capacity is normal.
_LOG_EVERY_S = 30.0
logger = logging.getLogger(__name__)


class AdaptiveWindow:
    """A semaphore whose size follows what the other side takes."""

    def __init__(self, max_concurrency: int, *, adaptive: bool = True, clock: Clock = time.monotonic) -> None:
        self.max_concurrency = max_concurrency
        self.adaptive = adaptive
        self.limit = float(min(_INITIAL, max_concurrency) if adaptive else max_concurrency)
        self.minimum_seen = self.limit
        self.in_flight = 0
        self.slow_start = adaptive
        self._clock = clock
        self._last_decrease = -1e9
        self._last_logged = -1e9
        self._latency = 0.0  # smoothed
        self._lowest_latency = float("inf")
        self._waiters: list[asyncio.Future[None]] = []
        #: The limit class it serves (for messages).
        self.name = ""

    @property
    def size(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self) -> None:
        while self.in_flight >= self.size:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        room = self.size - self.in_flight
        for waiter in list(self._waiters[: max(0, room)]):
            if not waiter.done():
                waiter.set_result(None)

    def _round_trip(self) -> float:
        return self._latency if self._latency > 0 else 1.0

    def on_success(self, latency_s: float) -> None:
        if not self.adaptive:
            return
        self._lowest_latency = min(self._lowest_latency, latency_s)
        self._latency = latency_s if self._latency == 0 else 0.8 * self._latency + 0.2 * latency_s
        if self.limit > _INITIAL and latency_s > _LATENCY_OVERLOAD * max(self._lowest_latency, 0.005):
            self.on_overload()
            return
        if self.slow_start:
            self.limit = min(self.max_concurrency, self.limit + 1.0)  # +1 per reply: doubles each round trip
        else:
            self.limit = min(self.max_concurrency, self.limit + 1.0 / max(1.0, self.limit))
        self._wake()

    def on_overload(self) -> None:
        """A 529, a 503, a reset connection: the other side took fewer than are in flight now, so the window
        is at once no larger than that; and it shrinks by a tenth, at most once per round trip (one burst,
        one decrease)."""
        if not self.adaptive:
            return
        now = self._clock()
        self.slow_start = False
        self.limit = max(1.0, min(self.limit, float(self.in_flight - 1)))
        if now - self._last_decrease >= self._round_trip():
            self._last_decrease = now
            self.limit = max(1.0, self.limit * _DECREASE)
            if now - self._last_logged >= _LOG_EVERY_S:
                self._last_logged = now
                logger.warning(
                    "Overloaded: requests in flight for %s lowered to %d (lowest so far %d).",
                    self.name or "this class",
                    self.size,
                    max(1, int(min(self.minimum_seen, self.limit))),
                )
        self.minimum_seen = min(self.minimum_seen, self.limit)


class CircuitBreaker:
    """Trips when a class has had only retryable failures for `give_up_after_s` seconds."""

    def __init__(self, give_up_after_s: float, *, clock: Clock = time.monotonic) -> None:
        self.give_up_after_s = give_up_after_s
        self._clock = clock
        self._since: float | None = None  # the first failure since the last success
        self.statuses: Counter[str] = Counter()
        self.tripped = False

    def on_success(self) -> None:
        self._since = None
        self.statuses.clear()

    def on_failure(self, status: str) -> bool:
        """Record a retryable failure; True when the breaker trips (now or before)."""
        now = self._clock()
        if self._since is None:
            self._since = now
        self.statuses[status] += 1
        if now - self._since >= self.give_up_after_s:
            self.tripped = True
        return self.tripped

    def describe(self) -> str:
        return ", ".join(f"{status} x{count:,}" for status, count in self.statuses.most_common())
