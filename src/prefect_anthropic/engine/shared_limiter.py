"""One account's rate limits shared by every process that sends on it, kept in Redis.

The buckets are the same continuously refilled token buckets as `RateLimiter`'s, held in one Redis hash
per account and limit class and changed only by one Lua script, which runs atomically on the Redis server
and reads the Redis server's clock: machines whose clocks disagree still share one exact rate.

A request costs one round trip. The script takes the request's tokens from the three buckets at once and
answers when it may be sent: now, or at a time in the near future when the buckets will have refilled
(the bucket goes below zero meanwhile, so the next caller, in any process, is scheduled after it: the
queue is fair across processes, and nobody polls). What happened since the last call travels with it:
reservations settled from `usage` (summed: a bucket only needs the total), leases released, a 429's
retry-after, the latest `anthropic-ratelimit-*` headers. A background task sends them when no request
comes for a while and keeps this process's leases alive.

The concurrency cap is shared through leases: a hash of slots held per process, and a sorted set of
process deadlines. A process that stops renewing (killed, cut off) loses its slots after `lease_ttl_s`.

The account is identified by a digest of the API key: the key itself is never sent to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..settings import is_secret_parameter
from .errors import FatalAPIError
from .limiter import HEADER_BUCKETS, RateLimits, Reservation

__all__ = ["SharedLimiter", "SharedLimiterUnavailable", "SharedRateLimiter", "account_digest", "redact_url"]

logger = logging.getLogger(__name__)

KEY_PREFIX = "prefect-anthropic"

# KEYS: 1 the class's buckets (hash), 2 slots held per process (hash), 3 process deadlines (sorted set)
# ARGV: 1 process id, 2 lease ttl s, 3 concurrency cap (0: none), 4 want a slot and tokens (1/0),
#       5 input tokens, 6 output tokens, 7-9 configured requests/input/output per minute ("" none),
#       10 adopt the server's limits (1/0), 11 burst seconds, 12 input tokens to give back (negative: take),
#       13 output tokens to give back, 14 slots to release, 15 pause seconds (0 none),
#       16-18 the server's limits per minute ("" unknown), 19-21 what the server says remains ("" unknown)
# Returns: admitted (1/0 as a string), seconds to wait, limits in force r/i/o ("" none), pause left s,
#          the output tokens taken, shared slots free (when there is a cap).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state, slots, deadlines = KEYS[1], KEYS[2], KEYS[3]
local pid = ARGV[1]
local ttl = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local want = ARGV[4] == '1'
local burst = tonumber(ARGV[11])
local adopt = ARGV[10] == '1'

local released = tonumber(ARGV[14])
if released > 0 then
  if redis.call('HINCRBY', slots, pid, -released) <= 0 then redis.call('HDEL', slots, pid) end
end
redis.call('ZADD', deadlines, now + ttl, pid)
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now)) do
  redis.call('HDEL', slots, dead)
  redis.call('ZREM', deadlines, dead)
end
redis.call('EXPIRE', slots, 86400)
redis.call('EXPIRE', deadlines, 86400)

local names = {'r', 'i', 'o'}
local s = {}
local raw = redis.call('HGETALL', state)
for k = 1, #raw, 2 do s[raw[k]] = tonumber(raw[k + 1]) end
local paused = s['paused'] or 0

local buckets = {}
local limits = {}
for n = 1, 3 do
  local b = names[n]
  local server = ARGV[15 + n]
  if server ~= '' then s[b .. 'srv'] = tonumber(server) end
  local configured = ARGV[6 + n]
  local pm = nil
  if configured ~= '' then
    pm = tonumber(configured)
    if s[b .. 'srv'] and (adopt or s[b .. 'srv'] < pm) then pm = s[b .. 'srv'] end
  elseif adopt and s[b .. 'srv'] then
    pm = s[b .. 'srv']
  end
  limits[n] = pm and tostring(pm) or ''
  if pm then
    local cap_b = math.max(1, pm * burst / 60)
    local level = s[b .. 'level'] or cap_b
    local updated = s[b .. 'at'] or now
    if now > updated then
      level = math.min(cap_b, level + (now - updated) * pm / 60)
      updated = now
    end
    level = math.min(level, cap_b)
    buckets[n] = {name = b, pm = pm, cap = cap_b, level = level, at = updated}
  end
end

local pause = tonumber(ARGV[15])
if pause > 0 and now + pause > paused then
  paused = now + pause
  for n = 1, 3 do
    local k = buckets[n]
    if k then
      k.level = math.min(k.level, 0)
      k.at = math.max(k.at, paused)
    end
  end
end

local giveback = {0, tonumber(ARGV[12]), tonumber(ARGV[13])}
for n = 2, 3 do
  local k = buckets[n]
  if k and giveback[n] ~= 0 then k.level = math.min(k.cap, k.level + giveback[n]) end
end

for n = 1, 3 do
  local k = buckets[n]
  local remaining = ARGV[18 + n]
  if k and remaining ~= '' then
    local granularity = 1000
    if n == 1 then granularity = 1 end
    k.level = math.min(k.level, tonumber(remaining) + granularity)
  end
end

local admitted = '0'
local wait = 0
local take = true
local held = 0
if cap > 0 then
  for _, v in ipairs(redis.call('HVALS', slots)) do held = held + tonumber(v) end
  if held >= cap then take = false end
end
if want and take then
  local costs = {1, tonumber(ARGV[5]), tonumber(ARGV[6])}
  wait = math.max(0, paused - now)
  for n = 1, 3 do
    local k = buckets[n]
    if k then
      local need = math.min(costs[n], k.cap)
      local w = math.max(0, k.at - now)
      if k.level < need then w = w + (need - k.level) * 60 / k.pm end
      if w > wait then wait = w end
    end
  end
  for n = 1, 3 do
    local k = buckets[n]
    if k then k.level = k.level - costs[n] end
  end
  if cap > 0 then
    redis.call('HINCRBY', slots, pid, 1)
    held = held + 1
  end
  admitted = '1'
end

local fields = {'paused', tostring(paused)}
for n = 1, 3 do
  local b = names[n]
  if s[b .. 'srv'] then
    table.insert(fields, b .. 'srv')
    table.insert(fields, tostring(s[b .. 'srv']))
  end
  local k = buckets[n]
  if k then
    table.insert(fields, b .. 'level')
    table.insert(fields, tostring(k.level))
    table.insert(fields, b .. 'at')
    table.insert(fields, tostring(k.at))
  end
end
redis.call('HSET', state, unpack(fields))
redis.call('EXPIRE', state, 86400)
return {admitted, tostring(wait), limits[1], limits[2], limits[3], tostring(math.max(0, paused - now)), ARGV[6],
  tostring(cap - held)}
"""

_CONNECTIONS = 16
_SCHEDULED_AHEAD = 16
_FLUSH_INTERVAL_S = 0.1  # what no request carried for this long is sent on its own
_FULL_RETRY_S = (0.02, 0.2)  # when every shared slot is taken: first and longest wait between asks


class SharedLimiterUnavailable(FatalAPIError):
    """Redis, which holds the shared limits, cannot be reached: nothing more is sent (never fall open)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(
            0,
            "limiter_unavailable",
            f"the shared rate limiter at {redact_url(url)} cannot be reached ({type(cause).__name__}: {cause}); "
            "nothing more is sent. Finished requests are saved: run the same command again to resume.",
        )


def redact_url(url: str) -> str:
    """The URL for messages and logs: without its userinfo (a password; a lone user part may be a token too) or
    the values of query parameters that carry secrets (`?password=`, `?token=`, `?sig=`...), whatever it is."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: say nothing of it
        return "<a URL that cannot be parsed>"

    def redacted(query: str) -> str:
        pairs = re.split(r"([&;])", query)
        return "".join(
            f"{pair.split('=', 1)[0]}=***" if "=" in pair and is_secret_parameter(pair.split("=", 1)[0]) else pair
            for pair in pairs
        )

    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc, query=redacted(parts.query), fragment=redacted(parts.fragment)))


def account_digest(api_key: str) -> str:
    """Who the account is, without the key: one-way, short, the same on every machine."""
    return hashlib.sha256(b"prefect-anthropic/account/" + api_key.encode()).hexdigest()[:24]


@dataclass
class SharedStats:
    round_trips: int = 0
    admissions: int = 0
    slot_waits: int = 0
    round_trip_s: list[float] = field(default_factory=list)  # how long each admission's script call took


class SharedLimiter:
    """The Redis connection, the process's identity and the background flush, shared by every class."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        max_in_flight: int = 0,
        lease_ttl_s: float = 15.0,
        burst_seconds: float = 0.5,
        timeout_s: float = 5.0,
    ) -> None:
        if not url:
            raise ValueError("a shared limiter needs a Redis URL")
        #: For messages: the URL without its password.
        self.url = redact_url(url)
        self._url = url
        self.timeout_s = timeout_s
        self.account = account_digest(api_key)
        self.max_in_flight = max_in_flight
        self.lease_ttl_s = lease_ttl_s
        self.burst_seconds = burst_seconds
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = SharedStats()
        self._redis: Any = None
        self._script: Any = None
        self._classes: dict[str, SharedRateLimiter] = {}
        self._keeper: asyncio.Task[None] | None = None
        self.error: SharedLimiterUnavailable | None = None
        self._releases = 0
        self.held = 0  # shared slots this process holds
        self.slots_free = 1  # as the last reply said
        self._last_call = time.monotonic()
        self._closing = False
        self.slot_gate = asyncio.Lock()
        self._slot_waiters: deque[asyncio.Future[None]] = deque()

    def key(self, *parts: str) -> str:
        # One hash tag per account: on Redis Cluster every key of an account lives on one node.
        return ":".join((KEY_PREFIX, "{" + self.account + "}", *parts))

    async def connection(self) -> Any:
        """The Redis client, connected on first use."""
        if self._redis is None:
            import redis.asyncio as redis

            url = self._url
            # Thousands of requests may ask at once: they queue for a few connections (a Lua call takes well
            # under a millisecond), never open one each.
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=_CONNECTIONS,
                timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
            )
            self._redis = redis.Redis(connection_pool=pool)
            self._script = self._redis.register_script(_SCRIPT)
        return self._redis

    async def check(self) -> None:
        """Raise SharedLimiterUnavailable unless Redis answers (called before anything is sent)."""
        try:
            await (await self.connection()).ping()
        except Exception as exc:  # redis raises its own ConnectionError, OSError, TimeoutError
            raise SharedLimiterUnavailable(self.url, exc) from exc

    def for_class(self, limit_class: str, limits: RateLimits, *, adopt_server_limits: bool) -> SharedRateLimiter:
        limiter = self._classes.get(limit_class)
        if limiter is None:
            limiter = self._classes[limit_class] = SharedRateLimiter(self, limit_class, limits, adopt_server_limits)
            if self._keeper is None:
                self._keeper = asyncio.create_task(self._keep())
        return limiter

    async def call(
        self, limiter: SharedRateLimiter, want: bool, input_tokens: float, output_tokens: float
    ) -> list[str]:
        """Run the script once: what is pending for `limiter`, and (when `want`) one admission."""
        if self.error is not None:
            raise self.error
        args = limiter.take_pending()
        args.insert(2, self._releases)
        self._releases = 0
        configured = limiter.configured
        argv: list[Any] = [
            self.process_id,
            self.lease_ttl_s,
            self.max_in_flight,
            1 if want else 0,
            input_tokens,
            output_tokens,
            _number(configured.requests_per_minute),
            _number(configured.input_tokens_per_minute),
            _number(configured.output_tokens_per_minute),
            1 if limiter.adopt_server_limits else 0,
            self.burst_seconds,
            *args,
        ]
        keys = [self.key("limits", limiter.limit_class), self.key("slots"), self.key("processes")]
        await self.connection()
        self.stats.round_trips += 1
        self._last_call = time.monotonic()
        started = time.perf_counter()
        try:
            reply = await self._script(keys=keys, args=argv)
            if want:
                self.stats.round_trip_s.append(time.perf_counter() - started)
        except Exception as exc:
            self.error = SharedLimiterUnavailable(self.url, exc)
            logger.error("%s", self.error)
            raise self.error from exc
        return [part.decode() if isinstance(part, bytes) else str(part) for part in reply]

    async def _keep(self) -> None:
        """Send what is pending when no request has carried it for a while, and renew this process's leases."""
        while self.error is None and not self._closing:
            await asyncio.sleep(_FLUSH_INTERVAL_S)
            idle = time.monotonic() - self._last_call
            due = [lim for lim in self._classes.values() if lim.has_pending()]
            if self._releases and not due and not self._slot_waiters:
                due = list(self._classes.values())[:1]
            if (due and idle >= _FLUSH_INTERVAL_S) or idle >= self.lease_ttl_s / 3:
                for limiter in due or list(self._classes.values())[:1]:
                    with contextlib.suppress(SharedLimiterUnavailable):
                        await limiter.flush()

    def summary(self) -> dict[str, Any]:
        """What the shared limiter cost this process: Redis round trips per request, their latency."""
        times = sorted(self.stats.round_trip_s)

        def quantile(q: float) -> float | None:
            return round(1000 * times[min(len(times) - 1, int(q * len(times)))], 3) if times else None

        admissions = self.stats.admissions
        return {
            "url": redact_url(self.url),
            "account": self.account,
            "round_trips": self.stats.round_trips,
            "admissions": admissions,
            "round_trips_per_request": round(self.stats.round_trips / admissions, 3) if admissions else None,
            "round_trip_ms_p50": quantile(0.5),
            "round_trip_ms_p99": quantile(0.99),
            "waits_for_a_shared_slot": self.stats.slot_waits,
        }

    def release_slot(self) -> None:
        """A request is over: its slot is given back with the next call, which a waiting request makes at
        once (so the slot goes to it, in the same round trip)."""
        self._releases += 1
        self.held -= 1
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def wait_for_slot(self, timeout: float) -> None:
        """Until a request of this process ends, or `timeout` (another process may free one meanwhile)."""
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter, timeout)

    async def aclose(self) -> None:
        # The keeper is asked to stop, not cancelled: a Redis call cancelled half-way can leave redis-py's
        # connection hanging (seen: a shard's process that never ended).
        self._closing = True
        if self._keeper is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._keeper, 1.0 + self.timeout_s)
        if self.error is None:
            for limiter in self._classes.values():
                if limiter.has_pending() or self._releases:
                    with contextlib.suppress(SharedLimiterUnavailable):
                        await limiter.flush()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._redis.aclose(), self.timeout_s)


def _value(amount: float | Callable[[], float]) -> float:
    return amount() if callable(amount) else amount


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class SharedRateLimiter:
    """`RateLimiter`'s interface over the shared buckets of one limit class."""

    def __init__(self, shared: SharedLimiter, limit_class: str, limits: RateLimits, adopt: bool) -> None:
        self.shared = shared
        self.limit_class = limit_class
        self.configured = limits
        self.adopt_server_limits = adopt
        self.server_limit_share = 1.0
        self.paused_until = 0.0
        self._limits = limits
        self._give_back_input = 0.0
        self._give_back_output = 0.0
        self._pause_s = 0.0
        self._headers: tuple[float, list[str]] | None = None
        # Requests of this process holding an admission time not reached yet: a few, so that what changes
        # (a 429's pause, lower limits, Redis lost) reaches the next ones.
        self._ahead = asyncio.Semaphore(_SCHEDULED_AHEAD)

    @property
    def limits(self) -> RateLimits:
        return self._limits

    def has_pending(self) -> bool:
        return bool(self._give_back_input or self._give_back_output or self._pause_s)

    def take_pending(self) -> list[Any]:
        server = ["", "", ""]
        remaining = ["", "", ""]
        if self._headers is not None and time.monotonic() - self._headers[0] < 0.5:
            server, remaining = self._headers[1][:3], self._headers[1][3:]
        self._headers = None
        pending = [self._give_back_input, self._give_back_output, self._pause_s, *server, *remaining]
        self._give_back_input = self._give_back_output = 0.0
        self._pause_s = 0.0
        return pending

    def _read(self, reply: list[str]) -> bool:
        self.shared.slots_free = int(float(reply[7])) if self.shared.max_in_flight else 1
        self._limits = RateLimits(*(float(v) if v else None for v in reply[2:5]))
        pause_left = float(reply[5])
        if pause_left > 0:
            self.paused_until = max(self.paused_until, time.monotonic() + pause_left)
        return reply[0] == "1"

    async def flush(self) -> None:
        self._read(await self.shared.call(self, False, 0.0, 0.0))

    async def acquire(
        self, input_tokens: float | Callable[[], float], output_tokens: float | Callable[[], float]
    ) -> Reservation:
        """Take the request's tokens and a shared slot in one round trip; wait until its admission time."""
        async with self._ahead:
            return await self._acquire(_value(input_tokens), output_tokens)

    async def _acquire(self, input_tokens: float, output_tokens: float | Callable[[], float]) -> Reservation:
        shared = self.shared
        reply = None
        if not shared.slot_gate.locked():  # nobody of this process is waiting for a slot: ask at once
            reply = await shared.call(self, True, input_tokens, _value(output_tokens))
        if reply is None or not self._read(reply):
            # Every shared slot is taken. One request of this process at a time asks again, when one of ours
            # ends (its slot goes to the asker in the same round trip) or, failing that, after a short wait.
            async with shared.slot_gate:
                delay = _FULL_RETRY_S[0]
                while True:
                    if shared.slots_free <= 0 and shared.held:
                        await shared.wait_for_slot(1.0)
                    reply = await shared.call(self, True, input_tokens, _value(output_tokens))
                    if self._read(reply):
                        break
                    shared.stats.slot_waits += 1
                    if not shared.held:
                        await shared.wait_for_slot(delay)
                        delay = min(delay * 2, _FULL_RETRY_S[1])
        shared.stats.admissions += 1
        shared.held += shared.max_in_flight > 0
        output = float(reply[6])
        wait = float(reply[1])
        if wait > 0:
            await asyncio.sleep(wait)
        return Reservation(input_tokens, output, shared_slot=shared.max_in_flight > 0)

    def settle(self, reservation: Reservation, input_tokens: float, output_tokens: float) -> None:
        self._give_back_input += reservation.input_tokens - input_tokens
        self._give_back_output += reservation.output_tokens - output_tokens

    def refund(self, reservation: Reservation) -> None:
        self.settle(reservation, 0.0, 0.0)

    def release(self, reservation: Reservation) -> None:
        if reservation.shared_slot:
            self.shared.release_slot()

    def pause(self, seconds: float) -> None:
        self._pause_s = max(self._pause_s, seconds)
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        values: list[str] = []
        for part in ("limit", "remaining"):
            for stem in HEADER_BUCKETS:
                text = headers.get(f"anthropic-ratelimit-{stem}-{part}", "")
                try:
                    values.append(repr(float(text)) if text and math.isfinite(float(text)) else "")
                except ValueError:
                    values.append("")
        if any(values):
            self._headers = (time.monotonic(), values)
