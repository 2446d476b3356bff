"""How many requests of a limit class may be in flight, and when to give up.

The rate limiter says *when* a request may go; the window only says how many may be out at once, and it
must never be what holds throughput below the limits. By Little's law a class needs (the rate its limits
allow) x (the time a reply takes) requests in flight: 1,200 requests a minute of 10 s replies is 200 in
flight. So the window starts at the ceiling (`max_concurrency`) and lets the limiter set the pace.

It shrinks only on evidence that our own load overloads the other side: a share of overload answers (529,
503, reset connections) well above what the API answers anyway at busy hours, or normalized reply times
rising far above their floor as our in-flight count rises. A steady background of stray 529s stays below
the tolerated share: those requests are retried, as the SDK does, and the window keeps its size. On such
evidence it shrinks multiplicatively, from what is really in flight, at most once per round trip; never
below what the limits need (the Little's-law level) unless the overload persists a round trip after that;
and it regains that level within a few round trips once the overload is gone (doubling per round trip up
to it, then about one request per round trip above it, up to the ceiling).

The circuit breaker gives up when nothing of a class has succeeded for `give_up_after_s` while requests
kept failing with retryable errors: the run stops admitting, finishes what is in flight, and exits,
resumable, with the status codes it saw.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["AdaptiveWindow", "CircuitBreaker"]

Clock = Callable[[], float]

_DECREASE = 0.9
#: Overload answers up to this share of recent answers are the API's own (busy hours): no decrease.
OVERLOAD_TOLERANCE = 0.10
#: Weight of the newest answer in the overload share (about the last 64 answers count).
_SHARE_WEIGHT = 1.0 / 64
#: The share must rest on at least this many recent overload answers.
_MIN_OVERLOADS = 3.0
#: A reply this many times slower per output token than the fastest seen, with more in flight than then.
_LATENCY_OVERLOAD = 4.0
#: Output tokens a second assumed when normalizing reply times (only ratios of them are compared).
_TOKENS_PER_SECOND = 50.0
#: In flight = rate x reply time x this (replies vary in length), plus a few.
_LITTLE_HEADROOM = 1.25
_LITTLE_EXTRA = 4
#: After this many calm round trips, the level that last overloaded is probed again, this much higher each.
_CALM_ROUND_TRIPS = 3.0
_REGAIN = 1.5
#: At most one log line per class this often: a sawtooth around a gateway's capacity is normal.
_LOG_EVERY_S = 30.0
logger = logging.getLogger(__name__)


class AdaptiveWindow:
    """A semaphore whose size follows what the other side takes, never below what the limits need."""

    def __init__(
        self,
        max_concurrency: int,
        *,
        adaptive: bool = True,
        rate_allowed: Callable[[float, float], float] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.adaptive = adaptive
        #: Requests a second the class's limits allow, given mean input and output tokens per request.
        self._rate_allowed = rate_allowed
        self.limit = float(max_concurrency)
        self.minimum_seen = self.limit
        self.in_flight = 0
        self.decreases = 0
        self._clock = clock
        self._last_decrease = -1e9
        self._last_logged = -1e9
        self._latency = 0.0  # smoothed seconds per reply
        self._normalized = 0.0  # smoothed seconds per (reply normalized by its length)
        self._fastest = math.inf
        self._in_flight_when_fastest = 0
        self._answers = 0.0  # decayed counts
        self._overloads = 0.0
        self._input_tokens = 0.0  # smoothed per request
        self._output_tokens = 0.0
        self._strikes = 0  # round trips in a row with an overloaded share
        #: In flight when our load last overloaded the other side, and when that was.
        self._overload_level = math.inf
        self._last_overloaded = -1e9
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

    # -- what the limits need -------------------------------------------------------------------------

    @property
    def round_trip_s(self) -> float:
        return self._latency if self._latency > 0 else 1.0

    def needed(self) -> float:
        """In flight the limits need (Little's law); the ceiling while nothing says otherwise."""
        if self._latency <= 0 or self._rate_allowed is None:
            return float(self.max_concurrency)
        rate = self._rate_allowed(self._input_tokens, self._output_tokens)
        if not math.isfinite(rate):
            return float(self.max_concurrency)
        return min(float(self.max_concurrency), rate * self._latency * _LITTLE_HEADROOM + _LITTLE_EXTRA)

    # -- answers ----------------------------------------------------------------------------------------

    def _answered(self, overload: bool) -> None:
        self._answers = self._answers * (1 - _SHARE_WEIGHT) + 1
        self._overloads = self._overloads * (1 - _SHARE_WEIGHT) + overload

    @property
    def overload_share(self) -> float:
        return self._overloads / self._answers if self._answers else 0.0

    def on_success(self, latency_s: float, input_tokens: int = 0, output_tokens: int = 0) -> None:
        self._answered(False)
        weight = 0.2 if self._latency else 1.0
        self._latency += weight * (latency_s - self._latency)
        self._input_tokens += weight * (input_tokens - self._input_tokens)
        self._output_tokens += weight * (output_tokens - self._output_tokens)
        if not self.adaptive:
            return
        normalized = latency_s / (1.0 + output_tokens / _TOKENS_PER_SECOND)
        self._normalized += weight * (normalized - self._normalized)
        if self._normalized < self._fastest:
            self._fastest, self._in_flight_when_fastest = self._normalized, self.in_flight
        if self.overload_share <= OVERLOAD_TOLERANCE / 2:
            self._strikes = 0
        slower = self._normalized > _LATENCY_OVERLOAD * max(self._fastest, 1e-3)
        if slower and self.in_flight > self._in_flight_when_fastest and self.limit > self.needed():
            # Never below what the limits need on this evidence alone: a slow reply is not a refusal.
            self._decrease("replies slowing down as more are in flight", self.needed())
            return
        # Back up fast (doubling per round trip) to what the limits need, but not past the level that last
        # overloaded the other side until a few calm round trips say it takes more; then about one more per
        # round trip.
        calm = min(64.0, (self._clock() - self._last_overloaded) / self.round_trip_s)
        fast_up_to = min(self.needed(), self._overload_level * _REGAIN ** max(0.0, calm - _CALM_ROUND_TRIPS))
        step = 1.0 if self.limit < fast_up_to else 1.0 / max(1.0, self.limit)
        self.limit = min(float(self.max_concurrency), self.limit + step)
        self._wake()

    def on_overload(self) -> None:
        """A 529, a 503, a reset connection: shrink when such answers are a share our load explains."""
        self._answered(True)
        if not self.adaptive or self.overload_share <= OVERLOAD_TOLERANCE or self._overloads < _MIN_OVERLOADS:
            return
        self._last_overloaded = self._clock()
        # Not below what the limits need, unless the overload is still there a round trip later.
        floor = self.needed() if self._strikes < 2 else 1.0
        # Meanwhile the other side took no more than is in flight now: the window is at once no larger.
        clamped = max(floor, 1.0, float(self.in_flight))
        if clamped < self.limit:
            self.limit = clamped
            self.minimum_seen = min(self.minimum_seen, self.limit)
        if self._clock() - self._last_decrease < self.round_trip_s:
            return  # one burst, one decrease
        self._strikes += 1
        self._decrease("overload answers", self.needed() if self._strikes < 2 else 1.0)

    def _decrease(self, why: str, floor: float) -> None:
        now = self._clock()
        if now - self._last_decrease < self.round_trip_s:
            return  # one burst, one decrease
        self._last_decrease = now
        level = min(self.limit, float(self.in_flight))
        target = max(floor, 1.0, level * _DECREASE)
        if target >= self.limit:
            return
        self._overload_level = level
        self.limit = target
        self.decreases += 1
        self.minimum_seen = min(self.minimum_seen, self.limit)
        if now - self._last_logged >= _LOG_EVERY_S:
            self._last_logged = now
            logger.warning(
                "Overloaded by our own load (%s, %.0f%% of recent answers): requests in flight for %s lowered to %d.",
                why,
                100 * self.overload_share,
                self.name or "this class",
                self.size,
            )


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
