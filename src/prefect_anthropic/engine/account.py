"""What every client of one account shares in a process: connections, rate limiters, concurrency.

The server counts an account's requests and tokens together, whoever sends them. Two runs in one process
(two datasets generated side by side in one flow) that send on the same account with the same limits
must draw from the same token buckets, concurrency windows and connections, but never share each other's
lifetime, budget or statistics. A client takes the account's shared state when it is created and gives it
back when it closes; the last client to close it closes the connections. Clients whose settings differ in
what is shared here (limits, concurrency, endpoint...) get separate states.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import httpx

from ..api.models import request_limit_class
from ..api.request_rules import API_VERSION_2026
from ..settings import ClientSettings, account_wide_fields
from .adaptive import AdaptiveWindow, CircuitBreaker
from .corrections import load_token_corrections
from .estimator import InputTokenEstimator, OutputTokenEstimator
from .limiter import Limiter, RateLimiter, RateLimits
from .shared_limiter import SharedLimiter

__all__ = ["Account", "auth_headers"]

LimitsForClass = Callable[[str], RateLimits]
#: What the account's shared state depends on (the fields settings.py marks ACCOUNT_WIDE): clients whose
#: settings differ here do not share it.
_SHARED_FIELDS = account_wide_fields()
_CONNECTIONS_PER_LANE = 2
logger = logging.getLogger(__name__)


def auth_headers(api_key: str, anthropic_version: str) -> dict[str, str]:
    """The key as the official SDKs send it: `x-api-key` before API version 2026-10-21, a bearer token
    from it on (the SDK 2.x way)."""
    if anthropic_version >= API_VERSION_2026:
        return {"authorization": f"Bearer {api_key}"}
    return {"x-api-key": api_key}


def rate_allowed(limits: RateLimits, input_tokens: float, output_tokens: float) -> float:
    """Requests a second `limits` allow when a request counts `input_tokens` and `output_tokens`."""
    rates = [math.inf]
    if limits.requests_per_minute:
        rates.append(limits.requests_per_minute / 60)
    if limits.input_tokens_per_minute and input_tokens >= 1:
        rates.append(limits.input_tokens_per_minute / 60 / input_tokens)
    if limits.output_tokens_per_minute and output_tokens >= 1:
        rates.append(limits.output_tokens_per_minute / 60 / output_tokens)
    return min(rates)


def _allow_open_files(wanted: int) -> None:
    """One socket per request in flight: raise this process's soft limit on open files towards `wanted`
    (up to the hard limit), as servers do at start; warn when even the hard limit is lower."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < wanted:
        logger.warning(
            "This process may open %d files (ulimit -n), fewer than the %d requests in flight max_concurrency "
            "allows: lower max_concurrency or raise the limit.",
            soft,
            wanted - 256,
        )


class Account:
    """One account's connections, limiters, concurrency windows, breakers and token estimators."""

    _open: ClassVar[dict[tuple[Any, ...], Account]] = {}

    def __init__(
        self,
        api_key: str,
        settings: ClientSettings,
        *,
        limits: LimitsForClass,
        adopts: Callable[[str], bool],
        burst_seconds: float,
        limiter_url: str | None = None,
        input_estimator: InputTokenEstimator | None = None,
        output_estimator: OutputTokenEstimator | None = None,
    ) -> None:
        self.settings = settings
        self.max_concurrency = settings.max_concurrency
        self._limits = limits
        self._adopts = adopts
        self.burst_seconds = burst_seconds
        self.input_estimator = input_estimator or InputTokenEstimator(initial_ratios=load_token_corrections())
        self.output_estimator = output_estimator or OutputTokenEstimator()
        self.limiters: dict[str, Limiter] = {}
        self.windows: dict[str, AdaptiveWindow] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        _allow_open_files(settings.max_concurrency + 256)
        #: Limits shared with every process on the account through Redis (None: this process's own).
        self.shared_limiter = (
            SharedLimiter(
                limiter_url,
                api_key,
                max_in_flight=settings.shared_max_concurrency or 0,
                burst_seconds=burst_seconds,
            )
            if limiter_url
            else None
        )
        timeout = httpx.Timeout(settings.timeout_s, connect=min(5.0, settings.timeout_s))
        self._lane_options: dict[str, Any] = {
            "base_url": settings.api_base_url,
            "headers": {
                **auth_headers(api_key, settings.api_version),
                "anthropic-version": settings.api_version,
                "content-type": "application/json",
            },
            "timeout": timeout,
            "verify": ssl.create_default_context(),  # one context for every lane: loading CA roots costs ~25 ms
            "limits": httpx.Limits(
                max_connections=_CONNECTIONS_PER_LANE, max_keepalive_connections=_CONNECTIONS_PER_LANE
            ),
        }
        # httpcore's pool scans every connection for every queued request (cost ~ connections x queue),
        # which caps one pool of 100 connections near 300 requests/s on our 2-core machines. Pools of two
        # connections ("lanes") keep each scan short; a request holds one lane place while in flight, so no
        # lane ever queues. Lanes are made as requests in flight need them, never more than the ceiling's.
        self._lanes: list[httpx.AsyncClient] = []
        self._free_lanes: deque[httpx.AsyncClient] = deque()
        self._users = 0
        self._key: tuple[Any, ...] | None = None

    # -- sharing ----------------------------------------------------------------------------------------

    @classmethod
    def acquire(
        cls,
        api_key: str,
        settings: ClientSettings,
        *,
        limits: LimitsForClass | None = None,
        burst_seconds: float = 0.5,
        limiter_url: str | None = None,
        input_estimator: InputTokenEstimator | None = None,
        output_estimator: OutputTokenEstimator | None = None,
    ) -> Account:
        """The account's shared state in this event loop, made on first use. Explicit limits or estimators
        (tests, benchmarks) make a private one."""
        tier_limits = settings.limits()
        private = limits is not None or input_estimator is not None or output_estimator is not None
        key = None
        if not private:
            digest = hashlib.sha256(api_key.encode()).hexdigest()
            fields = tuple(repr(getattr(settings, name)) for name in _SHARED_FIELDS)
            key = (id(asyncio.get_running_loop()), digest, settings.api_base_url, burst_seconds, limiter_url, *fields)
            account = cls._open.get(key)
            if account is not None:
                account._users += 1
                return account
        account = cls(
            api_key,
            settings,
            limits=limits or tier_limits,
            adopts=(lambda _cls: False) if limits is not None else tier_limits.adopts_server_limits,
            burst_seconds=burst_seconds,
            limiter_url=limiter_url,
            input_estimator=input_estimator,
            output_estimator=output_estimator,
        )
        account._users = 1
        if key is not None:
            account._key = key
            cls._open[key] = account
        return account

    async def release(self) -> None:
        """A client is done with it: the last one closes the connections and the shared limiter."""
        self._users -= 1
        if self._users > 0:
            return
        if self._key is not None:
            self._open.pop(self._key, None)
        if self.shared_limiter is not None:
            await self.shared_limiter.aclose()
        for lane in self._lanes:
            await lane.aclose()

    # -- per limit class --------------------------------------------------------------------------------

    def limiter(self, model: str, speed: Any = None) -> Limiter:
        """The limiter of the bucket a request draws from: its model's limit class (fast mode apart)."""
        cls = request_limit_class(model, speed, models_file=self.settings.models_file)
        limiter = self.limiters.get(cls)
        if limiter is None and self.shared_limiter is not None:
            limiter = self.limiters[cls] = self.shared_limiter.for_class(
                cls, self._limits(cls), adopt_server_limits=self._adopts(cls)
            )
        elif limiter is None:
            limiter = self.limiters[cls] = RateLimiter(
                self._limits(cls),
                burst_seconds=self.burst_seconds,
                adopt_server_limits=self._adopts(cls),
                server_limit_share=self.settings.limit_share,
            )
        return limiter

    def window(self, model: str, speed: Any = None) -> AdaptiveWindow:
        """The concurrency window of the request's limit class."""
        cls = request_limit_class(model, speed, models_file=self.settings.models_file)
        window = self.windows.get(cls)
        if window is None:
            limiter = self.limiter(model, speed)
            window = self.windows[cls] = AdaptiveWindow(
                self.max_concurrency,
                adaptive=self.settings.adaptive_concurrency,
                rate_allowed=lambda input_tokens, output_tokens: rate_allowed(
                    limiter.limits, input_tokens, output_tokens
                ),
            )
            window.name = cls
        return window

    def breaker(self, window: AdaptiveWindow) -> CircuitBreaker:
        breaker = self.breakers.get(window.name)
        if breaker is None:
            breaker = self.breakers[window.name] = CircuitBreaker(self.settings.give_up_after_s)
        return breaker

    @property
    def in_flight(self) -> int:
        return self.max_concurrency - self.slots._value

    # -- connections ------------------------------------------------------------------------------------

    def take_lane(self) -> httpx.AsyncClient:
        """A connection place for one request in flight (callers hold one of max_concurrency slots)."""
        if not self._free_lanes:
            if len(self._lanes) >= math.ceil(self.max_concurrency / _CONNECTIONS_PER_LANE):
                raise RuntimeError("more requests in flight than slots")  # never: a slot is held per request
            lane = httpx.AsyncClient(**self._lane_options)
            self._lanes.append(lane)
            self._free_lanes.extend([lane] * _CONNECTIONS_PER_LANE)
        return self._free_lanes.popleft()

    def give_lane(self, lane: httpx.AsyncClient) -> None:
        self._free_lanes.appendleft(lane)  # the warm connection goes out again first
