"""Progress of a whole run, summed over its shards, for the CLI's bar and the Prefect progress artifact."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine.limiter import RateLimits
from .engine.runner import Progress
from .formatting import duration, money, number

__all__ = ["RunProgress", "listeners"]


@dataclass
class RunProgress:
    total_requests: int
    started: float = field(default_factory=time.monotonic)
    shards: dict[int, Progress] = field(default_factory=dict)
    #: Lines finished in earlier runs (skipped shards or lines), counted as done.
    already_done: dict[int, int] = field(default_factory=dict)
    #: The limits in force, by limit class (the client's), for the ETA.
    limits: Callable[[], dict[str, RateLimits]] | None = None
    #: What the client waits on now (a backoff, a pause), if anything.
    waiting: Callable[[], str | None] | None = None
    #: The concurrency window in force.
    concurrency: Callable[[], int] | None = None

    def update(self, shard_index: int, progress: Progress) -> None:
        self.shards[shard_index] = progress
        for listener in listeners:
            listener(self)

    def mark_done(self, shard_index: int, lines: int) -> None:
        self.already_done[shard_index] = lines
        for listener in listeners:
            listener(self)

    @property
    def done(self) -> int:
        return sum(p.done + p.skipped for p in self.shards.values()) + sum(self.already_done.values())

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.shards.values())

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self.shards.values())

    @property
    def cost_usd(self) -> float:
        return sum(p.cost_usd for p in self.shards.values())

    @property
    def output_tokens(self) -> int:
        return sum(p.output_tokens for p in self.shards.values())

    @property
    def percent(self) -> float:
        return 100.0 * min(self.done, self.total_requests) / self.total_requests if self.total_requests else 100.0

    @property
    def sent(self) -> int:
        """Requests answered in this run (lines skipped as done before are not)."""
        return sum(p.done for p in self.shards.values())

    def _per_request(self, attribute: str) -> float | None:
        sent = self.sent
        return sum(getattr(p, attribute) for p in self.shards.values()) / sent if sent else None

    @property
    def projected_cost_usd(self) -> float | None:
        """What the whole run will have cost, at the cost per request seen so far."""
        per_request = self._per_request("cost_usd")
        if per_request is None:
            return None
        return self.cost_usd + per_request * max(0, self.total_requests - self.done)

    def eta_s(self) -> float | None:
        """Seconds left, from the limits in force (requests, input and output tokens per minute, with the
        tokens per request seen so far); from the rate seen so far where no limit binds."""
        remaining = max(0, self.total_requests - self.done)
        if remaining == 0:
            return 0.0
        minutes: list[float] = []
        limits = self.limits() if self.limits is not None else {}
        per_input, per_output = self._per_request("input_tokens"), self._per_request("output_tokens")
        for limit in limits.values():
            if limit.requests_per_minute:
                minutes.append(remaining / limit.requests_per_minute)
            if limit.input_tokens_per_minute and per_input:
                minutes.append(remaining * per_input / limit.input_tokens_per_minute)
            if limit.output_tokens_per_minute and per_output:
                minutes.append(remaining * per_output / limit.output_tokens_per_minute)
        rate = self.requests_per_minute
        if not minutes and rate > 0:
            minutes.append(remaining / rate)
        return 60.0 * max(minutes) if minutes else None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def requests_per_minute(self) -> float:
        elapsed = self.elapsed_s
        return 60.0 * self.sent / elapsed if elapsed > 0 else 0.0

    @property
    def dollars_per_minute(self) -> float:
        elapsed = self.elapsed_s
        return 60.0 * self.cost_usd / elapsed if elapsed > 0 else 0.0

    def _rate_limit_text(self) -> str:
        limits = self.limits() if self.limits is not None else {}
        rpm = [limit.requests_per_minute for limit in limits.values() if limit.requests_per_minute]
        return f"/{number(sum(rpm))}" if rpm else ""

    def headline(self) -> str:
        waiting = self.waiting() if self.waiting is not None else None
        return f"{number(self.done)}/{number(self.total_requests)} requests, {number(self.failed)} failed | " + (
            waiting if waiting else f"ETA {duration(self.eta_s())}"
        )

    def details(self) -> str:
        projected = self.projected_cost_usd
        return (
            f"{money(self.cost_usd)} spent, ~{money(projected) if projected is not None else '?'} projected, "
            f"{money(self.dollars_per_minute)}/min | {number(self.requests_per_minute)}"
            f"{self._rate_limit_text()} req/min | {number(self.in_flight)} in flight"
            + (f" (window {number(self.concurrency())})" if self.concurrency is not None else "")
        )

    def describe(self) -> str:
        return f"{self.headline()} | {self.details()}"


#: In-process observers of every RunProgress (the CLI's progress bar registers here).
listeners: list[Callable[[RunProgress], None]] = []
