"""Rate limiting the way Anthropic enforces it: continuously refilled token buckets.

`TokenBucket` is the exact arithmetic (also used by the emulator, so client and server agree on what a
bucket is). `RateLimiter` holds the three buckets of one model class (requests, input tokens, output
tokens per minute), admits requests in FIFO order, is steered by the server's `anthropic-ratelimit-*`
headers, and pauses as a whole on a 429's `retry-after`. The clock and sleep are injectable so the tests
check timing exactly without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..api.limits import RateLimits

__all__ = ["Limiter", "RateLimiter", "RateLimits", "Reservation", "TokenBucket"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """`per_minute` units a minute, refilled continuously, holding at most `capacity` units.

    A cost larger than the capacity is admitted once the bucket is full, and takes the level below zero:
    the debt is paid back by refill, so the long-run rate is exact whatever the cost of one request.
    """

    __slots__ = ("capacity", "level", "per_minute", "rate", "updated")

    def __init__(self, per_minute: float, capacity: float, now: float, level: float | None = None) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = capacity
        self.level = capacity if level is None else level
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until `cost` may be admitted (0 when it may be now)."""
        self.refill(now)
        need = min(cost, self.capacity)
        held = max(0.0, self.updated - now)  # refill starts again only at `updated` (see hold_until)
        if self.level >= need:
            return held
        return held + (need - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)

    def seconds_to_full(self, now: float) -> float:
        self.refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)

    def set_rate(self, per_minute: float, capacity: float, now: float) -> None:
        self.refill(now)
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = capacity
        self.level = min(self.level, capacity)

    def hold_until(self, until: float) -> None:
        """Empty the bucket and accrue nothing before `until` (the server said: not before then)."""
        self.level = min(self.level, 0.0)
        self.updated = max(self.updated, until)


@dataclass
class Reservation:
    """What one admitted request took from the buckets, settled when its usage is known."""

    input_tokens: float
    output_tokens: float
    shared_slot: bool = False  # holds a slot of a shared concurrency cap (see shared_limiter)


class Limiter(Protocol):
    """What the client needs of a limiter: this process's `RateLimiter`, or the Redis-shared one."""

    paused_until: float

    @property
    def limits(self) -> RateLimits: ...

    async def acquire(
        self, input_tokens: float | Callable[[], float], output_tokens: float | Callable[[], float]
    ) -> Reservation: ...

    def settle(self, reservation: Reservation, input_tokens: float, output_tokens: float) -> None: ...

    def refund(self, reservation: Reservation) -> None: ...

    def release(self, reservation: Reservation) -> None: ...

    def pause(self, seconds: float) -> None: ...

    def observe_headers(self, headers: Mapping[str, str]) -> None: ...


class Admission:
    """A request the limiter let go: settled by its usage, or refunded when the server did not process it. On
    leaving its `async with` (`admitted`) it is refunded unless it was settled or its request left (then the
    server may have counted it), and released."""

    def __init__(self, limiter: Limiter, reservation: Reservation) -> None:
        self.limiter = limiter
        self.reservation = reservation
        #: The request went out: from here on, unless told otherwise, the server may have counted it.
        self.left = False
        self._settled = False

    def settle(self, input_tokens: float, output_tokens: float) -> None:
        self.limiter.settle(self.reservation, input_tokens, output_tokens)
        self._settled = True

    def refund(self) -> None:
        self.limiter.refund(self.reservation)
        self._settled = True

    def close(self) -> None:
        if not self._settled and not self.left:
            self.limiter.refund(self.reservation)
        self.limiter.release(self.reservation)


@contextlib.asynccontextmanager
async def admitted(
    limiter: Limiter, input_tokens: float | Callable[[], float], output_tokens: float | Callable[[], float]
) -> AsyncIterator[Admission]:
    """Wait for the limiter to let the request go; settle or refund it, and release it, on exit."""
    admission = Admission(limiter, await limiter.acquire(input_tokens, output_tokens))
    try:
        yield admission
    finally:
        admission.close()


_MAX_NAP_S = 0.25
# Header name stem -> bucket attribute.
HEADER_BUCKETS = {"requests": "requests", "input-tokens": "input", "output-tokens": "output"}


class RateLimiter:
    """The three buckets of one model class, admitting requests evenly and in order.

    Buckets hold `burst_seconds` of refill (default 0.5 s). Anthropic may enforce a per-minute limit over
    intervals as short as a second, so the limiter paces requests evenly instead of spending a minute's
    budget at once, and keeps its own burst below a second's worth so that network jitter does not push
    the server's bucket under zero.
    """

    def __init__(
        self,
        limits: RateLimits,
        *,
        burst_seconds: float = 0.5,
        adopt_server_limits: bool = False,
        server_limit_share: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.configured = limits
        self.burst_seconds = burst_seconds
        self.adopt_server_limits = adopt_server_limits
        #: This process's part of the server's limits (several machines on one account).
        self.server_limit_share = server_limit_share
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self.requests = self._bucket(limits.requests_per_minute, now)
        self.input = self._bucket(limits.input_tokens_per_minute, now)
        self.output = self._bucket(limits.output_tokens_per_minute, now)
        if self.output is not None:
            # No burst of output at the start: the server counts output tokens as they are produced, one reply
            # time after we reserve them, so a first burst would land on its bucket on top of the steady rate
            # (measured: ~1.3% 429s at 2 s and 10 s replies with it, none without).
            self.output.level = 0.0
        self.paused_until = 0.0
        self._last_429_until = 0.0
        self._lock = asyncio.Lock()

    def _capacity(self, per_minute: float) -> float:
        return max(1.0, per_minute * self.burst_seconds / 60.0)

    def _bucket(self, per_minute: float | None, now: float) -> TokenBucket | None:
        if per_minute is None:
            return None
        return TokenBucket(per_minute, self._capacity(per_minute), now)

    @property
    def limits(self) -> RateLimits:
        """The limits in force now (configured, or lowered/adopted from the server's headers)."""
        return RateLimits(
            self.requests.per_minute if self.requests else None,
            self.input.per_minute if self.input else None,
            self.output.per_minute if self.output else None,
        )

    def _wait_time(self, input_tokens: float, output_tokens: float, now: float) -> float:
        wait = self.paused_until - now
        for bucket, cost in ((self.requests, 1.0), (self.input, input_tokens), (self.output, output_tokens)):
            if bucket is not None:
                wait = max(wait, bucket.wait_time(cost, now))
        return wait

    async def acquire(
        self, input_tokens: float | Callable[[], float], output_tokens: float | Callable[[], float]
    ) -> Reservation:
        """Wait until the request fits in every bucket, then take it. Callers are served in order.

        Either cost may be a function: the estimate is then taken at admission, not when the caller started
        waiting (what has been learned meanwhile counts).
        """
        async with self._lock:
            while True:
                now = self._clock()
                input_tokens = input_tokens() if callable(input_tokens) else input_tokens
                output = output_tokens() if callable(output_tokens) else output_tokens
                wait = self._wait_time(input_tokens, output, now)
                if wait <= 0:
                    break
                # Wake up now and then: a settled reservation (a refund) can make room before the wait is over.
                await self._sleep(min(wait, _MAX_NAP_S))
            for bucket, cost in ((self.requests, 1.0), (self.input, input_tokens), (self.output, output)):
                if bucket is not None:
                    bucket.take(cost, now)
            return Reservation(input_tokens, output)

    def settle(self, reservation: Reservation, input_tokens: float, output_tokens: float) -> None:
        """Correct a reservation by what the request really used (refund or extra charge)."""
        now = self._clock()
        for bucket, reserved, actual in (
            (self.input, reservation.input_tokens, input_tokens),
            (self.output, reservation.output_tokens, output_tokens),
        ):
            if bucket is None or actual == reserved:
                continue
            if actual < reserved:
                bucket.give_back(reserved - actual, now)
            else:
                bucket.take(actual - reserved, now)

    def refund(self, reservation: Reservation) -> None:
        """Give back the tokens of a request the server did not process (an error answer)."""
        self.settle(reservation, 0.0, 0.0)

    def release(self, reservation: Reservation) -> None:
        """The request is over (concurrency here is capped by the client's own semaphore)."""

    def pause(self, seconds: float) -> None:
        """A 429 with its retry-after. A lone 429 of a client pacing at the limit (the server's bucket and
        ours a few milliseconds apart) empties the buckets: no burst until they refill, the class goes on at
        the rate. Another within that retry-after is the limits being lower than ours: every request of the
        class holds for `seconds`, then resumes at the rate from empty buckets (no stampede)."""
        now = self._clock()
        storm = now < self._last_429_until
        self._last_429_until = max(self._last_429_until, now + seconds)
        until = now + seconds if storm else now
        if until < self.paused_until:
            return
        self.paused_until = max(self.paused_until, until)
        for bucket in (self.requests, self.input, self.output):
            if bucket is not None:
                bucket.hold_until(until)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Reconcile with the server's view: its limits (never exceed them) and what it says remains."""
        now = self._clock()
        for stem, attr in HEADER_BUCKETS.items():
            limit_text = headers.get(f"anthropic-ratelimit-{stem}-limit")
            if limit_text is None:
                continue
            try:
                server_limit = float(limit_text) * self.server_limit_share
                remaining = float(headers.get(f"anthropic-ratelimit-{stem}-remaining", "nan"))
            except ValueError:
                continue
            if server_limit <= 0:
                continue
            bucket: TokenBucket | None = getattr(self, attr)
            if bucket is None:
                if not self.adopt_server_limits:
                    continue
                bucket = TokenBucket(server_limit, self._capacity(server_limit), now, level=0.0)
                setattr(self, attr, bucket)
            elif server_limit < bucket.per_minute or (self.adopt_server_limits and server_limit != bucket.per_minute):
                bucket.set_rate(server_limit, self._capacity(server_limit), now)
            if math.isnan(remaining):
                continue
            # The server's remaining count is the truth, but token counts come rounded down to the
            # thousand: only act on a gap wider than the rounding, or the client would starve itself.
            granularity = 1.0 if stem == "requests" else 1000.0
            bucket.refill(now)
            bucket.level = min(bucket.level, remaining + granularity)
