"""A budget several processes spend together, kept in Redis beside the shared limits.

The flow that starts a run writes the limit and what the dataset's earlier runs paid; every shard process
(on any worker) reserves an attempt's worst case with one atomic script before sending it, and settles it
to the real cost afterwards (settlements ride on the next reservation, or a background flush). Reservations
are held per process, with a deadline the process renews. Each call states this process's totals (all it
spent since it started, all it holds now), not changes since the last call: a call that fails, or whose
reply is lost after Redis ran it, loses nothing and counts nothing twice; the next call says it again. A
process that dies with attempts in flight may have been billed for them: when its deadline passes, what it
held is counted as spent, never given back.
Each process also keeps its own journal (see `budget`), so the next run of the dataset knows the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from .budget import Budget, SpendingJournal
from .shared_limiter import KEY_PREFIX, SharedLimiter, SharedLimiterUnavailable

__all__ = ["SharedBudget", "start_shared_budget"]

logger = logging.getLogger(__name__)

# KEYS: 1 the budget (hash: limit, spent, r:<process> reserved), 2 process deadlines (sorted set)
# ARGV: 1 process, 2 lease ttl s, 3 worst case to reserve (0: none), 4 all this process spent since it started,
#       5 what this process holds now (its reservations, the one asked for in ARGV 3 apart)
# The hash keeps `s:<process>`, the spending of each process counted so far, so a total said twice counts once.
# Returns: reserved (1/0), spent, reserved by all, limit
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local budget, deadlines, pid = KEYS[1], KEYS[2], ARGV[1]
redis.call('ZADD', deadlines, now + tonumber(ARGV[2]), pid)
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now)) do
  local held = tonumber(redis.call('HGET', budget, 'r:' .. dead) or '0')
  if held > 0 then redis.call('HINCRBYFLOAT', budget, 'spent', held) end
  redis.call('HDEL', budget, 'r:' .. dead)
  redis.call('ZREM', deadlines, dead)
end
local counted = tonumber(redis.call('HGET', budget, 's:' .. pid) or '0')
if tonumber(ARGV[4]) > counted then
  redis.call('HINCRBYFLOAT', budget, 'spent', tostring(tonumber(ARGV[4]) - counted))
  redis.call('HSET', budget, 's:' .. pid, ARGV[4])
end
if tonumber(ARGV[5]) > 0 then
  redis.call('HSET', budget, 'r:' .. pid, ARGV[5])
else
  redis.call('HDEL', budget, 'r:' .. pid)
end
local limit, spent, reserved = nil, 0, 0
local raw = redis.call('HGETALL', budget)
for k = 1, #raw, 2 do
  local name, value = raw[k], tonumber(raw[k + 1])
  if name == 'limit' then limit = value
  elseif name == 'spent' then spent = value
  elseif string.sub(name, 1, 2) == 'r:' and value > 1e-9 then reserved = reserved + value end
end
if limit == nil then return {'-1', '0', '0', '0'} end
local worst = tonumber(ARGV[3])
local ok = '0'
if worst > 0 and spent + reserved + worst <= limit then
  redis.call('HINCRBYFLOAT', budget, 'r:' .. pid, worst)
  reserved = reserved + worst
  ok = '1'
end
redis.call('EXPIRE', budget, 604800)
redis.call('EXPIRE', deadlines, 604800)
return {ok, tostring(spent), tostring(reserved), tostring(limit)}
"""

#: Waits between two asks while other processes' reservations hold the room an attempt needs.
_WAIT_S = (0.05, 0.5)


def _keys(budget_id: str) -> list[str]:
    return [f"{KEY_PREFIX}:budget:{budget_id}", f"{KEY_PREFIX}:budget:{budget_id}:processes"]


async def start_shared_budget(shared: SharedLimiter, budget_id: str, limit_usd: float, spent_usd: float) -> None:
    """Open the run's budget: its limit and what the dataset's earlier runs paid (called by the flow)."""
    budget_key, deadlines = _keys(budget_id)
    try:
        async with (await shared.connection()).pipeline(transaction=True) as pipe:
            pipe.delete(budget_key, deadlines)
            pipe.hset(budget_key, mapping={"limit": repr(limit_usd), "spent": repr(spent_usd)})
            pipe.expire(budget_key, 604800)
            await pipe.execute()
    except Exception as exc:
        raise SharedLimiterUnavailable(shared.url, exc) from exc


class SharedBudget(Budget):
    """`Budget` whose spending and reservations are every process's of the run."""

    def __init__(
        self,
        shared: SharedLimiter,
        budget_id: str,
        limit_usd: float,
        *,
        journal: SpendingJournal | None = None,
        lease_ttl_s: float = 60.0,
        owns_connection: bool = False,
    ) -> None:
        super().__init__(limit_usd, journal=journal)
        self.shared = shared
        self._owns_connection = owns_connection
        self.budget_id = budget_id
        self.lease_ttl_s = lease_ttl_s
        self._script: Any = None
        #: What this process spent since it started, and holds now: said whole in every call (see the module).
        self._spent_total = 0.0
        self._held_usd = 0.0
        #: Changes of those totals, and the last count Redis has confirmed: the keeper says them until it has.
        self._changes = 0
        self._said = 0
        #: One call at a time: each states the totals as they are after the one before it.
        self._calling = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self._closing = False

    # Alike in shape only to other long signatures (positional, then keyword-only arguments).
    @classmethod
    def connect(
        cls, limiter_url: str, api_key: str, budget_id: str, limit_usd: float, journal: SpendingJournal | None = None
    ) -> SharedBudget:
        """The run's budget through a Redis connection of its own (the shared limiter's, resolved at the edge)."""
        shared = SharedLimiter(limiter_url, api_key)
        return cls(shared, budget_id, limit_usd, journal=journal, owns_connection=True)

    async def _call(self, worst: float) -> bool:
        """One run of the script: this process's totals, and `worst` reserved if it fits (True)."""
        async with self._calling:
            spent, held, changes = self._spent_total, (self._held_usd if self.holding else 0.0), self._changes
            argv: list[Any] = [self.shared.process_id, self.lease_ttl_s, worst, repr(spent), repr(max(0.0, held))]
            try:
                if self._script is None:
                    self._script = (await self.shared.connection()).register_script(_SCRIPT)
                reply = await self._script(keys=_keys(self.budget_id), args=argv)
            except Exception as exc:
                # Nothing is lost: the totals are said again by the next call (and a reservation the script may
                # have made is overwritten by it: this process did not get it, and sends nothing for it).
                self._changes += 1
                raise SharedLimiterUnavailable(self.shared.url, exc) from exc
            values = [part.decode() if isinstance(part, bytes) else str(part) for part in reply]
            if values[0] == "-1":
                raise SharedLimiterUnavailable(
                    self.shared.url, RuntimeError(f"the run's budget {self.budget_id} is not in Redis (expired?)")
                )
            self._said = max(self._said, changes)
            self.spent_usd, self.reserved_usd = float(values[1]), float(values[2])
            if values[0] == "1":
                self.holding += 1
                self._held_usd += worst
                return True
            return False

    def reserve(self, worst_usd: float) -> int | None:
        raise TypeError("a shared budget is reserved with `await areserve(...)`")

    async def areserve(self, worst_usd: float) -> int | None:
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep())
        delay = _WAIT_S[0]
        while not self.exhausted:
            if await self._call(worst_usd):
                return next(self._entries)
            assert self.limit_usd is not None
            if self.spent_usd + worst_usd > self.limit_usd:
                self.exhausted = True  # not even with every process's attempts settled at nothing
                break
            await asyncio.sleep(delay)  # reservations in flight (here or elsewhere) hold the room: they settle
            delay = min(delay * 2, _WAIT_S[1])
        return None

    # Budget's settle and refund, but the spending goes into this process's total (spent_usd is Redis's view),
    # and what is let go is said to Redis with the next call.
    def _spend(self, usd: float) -> None:
        self._spent_total += usd

    def _release(self, reserved_usd: float) -> None:
        self.holding -= 1
        self._held_usd = self._held_usd - reserved_usd if self.holding else 0.0  # no float dust left
        self._changes += 1

    async def _keep(self) -> None:
        """Send settlements no reservation carried, and renew this process's hold on its reservations."""
        last = time.monotonic()
        while not self._closing:
            await asyncio.sleep(0.2)
            if self._said < self._changes or time.monotonic() - last > self.lease_ttl_s / 3:
                with contextlib.suppress(SharedLimiterUnavailable):
                    await self._call(0.0)
                last = time.monotonic()

    async def aclose(self) -> None:
        self._closing = True  # asked to stop, not cancelled mid-call (see SharedLimiter.aclose)
        if self._keeper is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._keeper, 1.0 + self.shared.timeout_s)
        deadline = time.monotonic() + 2.0 * (1.0 + self.shared.timeout_s)
        while self._said < self._changes:  # what this process owes Redis: said again while Redis is briefly away
            try:
                await self._call(0.0)
            except SharedLimiterUnavailable as exc:
                if time.monotonic() > deadline:
                    logger.warning("Could not record this process's spending in the shared budget: %s", exc)
                    break
                await asyncio.sleep(0.2)
        if self._owns_connection:
            await self.shared.aclose()
        await super().aclose()
