"""Progress of a whole run, summed over its shards, for the CLI's bar and the Prefect progress artifact."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine.runner import Progress

__all__ = ["RunProgress", "listeners"]


@dataclass
class RunProgress:
    total_requests: int
    started: float = field(default_factory=time.monotonic)
    shards: dict[int, Progress] = field(default_factory=dict)
    #: Lines finished in earlier runs (skipped shards or lines), counted as done.
    already_done: dict[int, int] = field(default_factory=dict)

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

    def describe(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = 60.0 * sum(p.done for p in self.shards.values()) / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.done:,}/{self.total_requests:,} requests, {self.failed:,} failed, {self.in_flight} in flight, "
            f"{rate:,.0f} requests/min, ${self.cost_usd:,.4f}"
        )


#: In-process observers of every RunProgress (the CLI's progress bar registers here).
listeners: list[Callable[[RunProgress], None]] = []
