"""How many requests of a limit class may be in flight, and when to give up.

The rate limiter says *when* a request may go; the window only says how many may be out at once, and it
must never be what holds throughput below the limits. By Little's law a class needs (the rate its limits
allow) x (the time a reply takes) requests in flight: 1,200 requests a minute of 10 s replies is 200 in
flight. So where limits pace the requests, the window starts at the ceiling (`max_concurrency`) and lets
the limiter set the pace; where none do, it starts at 16 and grows half as fast again each round trip
(a slow start).

It shrinks only on evidence that our own load overloads the other side: a share of overload answers (529,
503, reset connections) well above what the API answers anyway at busy hours (three standard deviations
above 10% of recent attempts), or normalized reply times
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
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

__all__ = ["AdaptiveWindow", "CircuitBreaker"]

Clock = Callable[[], float]

_DECREASE = 0.9
#: Overload answers up to this share of recent answers are the API's own (busy hours): no decrease.
OVERLOAD_TOLERANCE = 0.10
#: Weight of the newest attempt in the overload share (about the last 128 attempts count).
_SHARE_WEIGHT = 1.0 / 128
#: The share must rest on at least this many recent overload answers.
_MIN_OVERLOADS = 3.0
#: A reply this many times slower per output token than the fastest seen, with more in flight than then.
_LATENCY_OVERLOAD = 4.0
#: Output tokens a second assumed when normalizing reply times (only ratios of them are compared).
_TOKENS_PER_SECOND = 50.0
#: In flight = rate x reply time x this (replies vary in length), plus a few.
_LITTLE_HEADROOM = 1.25
_LITTLE_EXTRA = 4
#: Where no limit paces the requests: the window at the start, and its growth per reply (x1.5 a round trip).
_UNPACED_START = 16
_SLOW_START = 0.5
#: Before any reply came back, how long a round trip is taken to be (overload answers come back at once).
_FIRST_ROUND_TRIP_S = 0.25
#: After this many calm round trips, the level that last overloaded is probed again, this much higher each.
_CALM_ROUND_TRIPS = 8.0
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
        # With limits, the limiter paces and in flight grows to what they need: start at the ceiling. With none,
        # nothing paces: start small and double each round trip (slow start) until the other side says enough.
        paced = adaptive and rate_allowed is not None and math.isfinite(rate_allowed(0.0, 0.0))
        self.limit = float(max_concurrency if paced or not adaptive else min(max_concurrency, _UNPACED_START))
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
        self._sends = 0.0  # decayed counts
        self._overloads = 0.0
        self._input_tokens = 0.0  # smoothed per request
        self._output_tokens = 0.0
        self._strikes = 0  # round trips in a row with an overloaded share
        #: The most in flight the other side took while our load persistently overloaded it (beyond it the
        #: window grows only about one a round trip), and when our load last overloaded it.
        self._capacity_seen = math.inf
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
        self.sent()

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A place in the window for one attempt, given back on exit."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def _wake(self) -> None:
        room = self.size - self.in_flight
        for waiter in list(self._waiters[: max(0, room)]):
            if not waiter.done():
                waiter.set_result(None)

    # -- what the limits need -------------------------------------------------------------------------

    @property
    def round_trip_s(self) -> float:
        return self._latency if self._latency > 0 else _FIRST_ROUND_TRIP_S

    def needed(self) -> float | None:
        """In flight the limits need (Little's law); None where they set no rate, or before any reply came
        back (nothing is known)."""
        if self._latency <= 0 or self._rate_allowed is None:
            return None
        rate = self._rate_allowed(self._input_tokens, self._output_tokens)
        if not math.isfinite(rate):
            return None
        return min(float(self.max_concurrency), rate * self._latency * _LITTLE_HEADROOM + _LITTLE_EXTRA)

    def _floor(self) -> float:
        """Not below what the limits need on one burst of overload (nothing to keep where they set none)."""
        return self.needed() or 1.0

    # -- answers ----------------------------------------------------------------------------------------

    def sent(self) -> None:
        """An attempt goes out (counted when it is sent: overload answers come back at once, replies late)."""
        self._sends = self._sends * (1 - _SHARE_WEIGHT) + 1
        self._overloads *= 1 - _SHARE_WEIGHT

    @property
    def overload_share(self) -> float:
        """Overload answers per attempt sent, over about the last 64 attempts."""
        return min(1.0, self._overloads / self._sends) if self._sends else 0.0

    def _overloads_beyond_background(self) -> float:
        """Recent overload answers that the API's own share (up to OVERLOAD_TOLERANCE) does not explain: three
        standard deviations above it, so that a stray run of 529s over few attempts (the first seconds of a
        run, whose replies have not come back yet) is not taken for ours."""
        sends = max(self._sends, 1.0)
        spread = math.sqrt(sends * OVERLOAD_TOLERANCE * (1 - OVERLOAD_TOLERANCE))
        return max(_MIN_OVERLOADS, OVERLOAD_TOLERANCE * sends + 3 * spread)

    def _capacity(self, now: float) -> float:
        """The most in flight the other side has proven to take, forgotten as calm round trips pass (it may
        take more again: a gateway freed, a busy hour over)."""
        calm = min(64.0, (now - self._last_overloaded) / self.round_trip_s)
        return self._capacity_seen * _REGAIN ** max(0.0, calm - _CALM_ROUND_TRIPS)

    def on_success(self, latency_s: float, input_tokens: int = 0, output_tokens: int = 0) -> None:
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
        if slower and self.in_flight > self._in_flight_when_fastest and self.limit > self._floor():
            # Never below what the limits need on this evidence alone: a slow reply is not a refusal.
            self._decrease("replies slowing down as more are in flight", self._floor())
            return
        # Back up fast (doubling per round trip) to what the limits need, but not past what the other side
        # proved to take, until calm round trips say it takes more; then about one more per round trip.
        capacity = self._capacity(self._clock())
        fast_up_to = min(self.needed() or self.max_concurrency, capacity)
        if self.limit < fast_up_to:
            step = 1.0 if self.needed() is not None else _SLOW_START  # regain what the limits need; or probe
        else:  # probing past what the other side took costs an overload answer: about one probe every 2 round trips
            step = (0.5 if self.limit >= capacity else 1.0) / max(1.0, self.limit)
        self.limit = min(float(self.max_concurrency), self.limit + step)
        self._wake()

    def on_overload(self) -> None:
        """A 529, a 503, a reset connection: shrink when our load explains it."""
        self._overloads += 1
        if not self.adaptive:
            return
        now = self._clock()
        at_capacity = self.in_flight > self._capacity(now)  # more in flight than the other side took before
        share = self._overloads >= self._overloads_beyond_background()
        episode = now - self._last_overloaded < self.round_trip_s
        if not (at_capacity or share or episode):
            return  # the API's own busy hour: retried, and the window keeps its size
        self._last_overloaded = now
        # Not below what the limits need on one burst of overload; below it when the other side is at a level
        # that filled it before, or the overload is still there a round trip later.
        floor = 1.0 if at_capacity or self._strikes >= 2 else self._floor()
        # The other side took no more than the others in flight now: the window is at once no larger.
        clamped = max(floor, 1.0, float(self.in_flight - 1))
        if clamped < self.limit:
            self.limit = clamped
            self.minimum_seen = min(self.minimum_seen, self.limit)
        if now - self._last_decrease < self.round_trip_s:
            return  # one burst, one decrease
        self._strikes += 1
        if self._strikes >= 2:
            floor = 1.0
            # It took the others in flight, not this one.
            self._capacity_seen = min(self._capacity(now), float(max(1, self.in_flight - 1)))
        self._decrease("overload answers", floor)

    def _decrease(self, why: str, floor: float) -> None:
        now = self._clock()
        if now - self._last_decrease < self.round_trip_s:
            return  # one burst, one decrease
        self._last_decrease = now
        target = max(floor, 1.0, min(self.limit, float(self.in_flight)) * _DECREASE)
        if target >= self.limit:
            return
        self.limit = target
        self.decreases += 1
        self.minimum_seen = min(self.minimum_seen, self.limit)
        needed = self.needed()
        if now - self._last_logged < _LOG_EVERY_S:
            return
        self._last_logged = now
        name, share = self.name or "this class", 100 * self.overload_share
        if needed is None or target < needed:  # the window now holds the class below what its limits allow
            logger.warning(
                "Overloaded by our own load (%s, %.0f%% of recent attempts): requests in flight for %s lowered to %d.",
                why,
                share,
                name,
                self.size,
            )
        else:
            logger.info(
                "Requests in flight for %s lowered to %d, still what its limits need (%s, %.0f%% of recent attempts).",
                name,
                self.size,
                why,
                share,
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
