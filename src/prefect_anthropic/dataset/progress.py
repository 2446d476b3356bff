"""Progress of a whole run, for the CLI's bar and the Prefect progress artifact.

It is built from the records themselves as shards write them, so it adds up across shard retries and
resumed shards: a line counts once however many attempts it took, and every dollar paid counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..api.formatting import duration, money, number
from ..api.limits import RateLimits
from ..engine.records import ResultRecord
from ..engine.results_file import LineSet

__all__ = ["RunProgress"]


@dataclass
class RunProgress:
    total_requests: int
    started: float = field(default_factory=time.monotonic)
    #: Lines answered in this run: succeeded, and failed (their last answer an error).
    succeeded_lines: LineSet = field(default_factory=LineSet)
    failed_lines: LineSet = field(default_factory=LineSet)
    #: Lines sent at least once in this run (never-sent lines, such as invalid ones, are not).
    sent_lines: LineSet = field(default_factory=LineSet)
    #: Lines answered by earlier runs of the dataset (skipped now).
    earlier_lines: LineSet = field(default_factory=LineSet)
    #: Lines of whole shards finished by earlier runs, by shard.
    earlier_shards: dict[int, int] = field(default_factory=dict)
    #: Dollars of this run's answers (every attempt paid for, repairs included).
    answered_cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    #: Requests in flight, by shard (as the shards last reported).
    in_flight_by_shard: dict[int, int] = field(default_factory=dict)
    #: The limits in force, by limit class (the client's), for the ETA.
    limits: Callable[[], dict[str, RateLimits]] | None = None
    #: What the client waits on now (a backoff, a pause), if anything.
    waiting: Callable[[], str | None] | None = None
    #: The concurrency window in force.
    concurrency: Callable[[], int] | None = None
    #: Dollars paid for what is not a row (cache pre-warm requests).
    extra_cost_usd: Callable[[], float] | None = None
    #: Lines of this run answered by a batch (at half price).
    batch_lines: LineSet = field(default_factory=LineSet)
    #: Auto mode: the phase and the cut-over time (short, for the bar; in full, for the artifact).
    phase: Callable[[], str] | None = None
    phase_detail: Callable[[], str] | None = None
    #: Called on every change (the command line's progress bar).
    listeners: list[Callable[[RunProgress], None]] = field(default_factory=list, repr=False)

    def _changed(self) -> None:
        for listener in self.listeners:
            listener(self)

    def record(self, record: ResultRecord) -> None:
        """A shard wrote a record (an answer, an error row, a line the budget did not let go)."""
        line = record.line
        if record.succeeded:
            self.succeeded_lines.add(line)
            self.failed_lines.discard(line)
            if record.mode == "batch":
                self.batch_lines.add(line)
        else:
            self.failed_lines.add(line)
        if record.attempts:
            self.sent_lines.add(line)
        self.answered_cost_usd += record.cost_usd or 0.0
        self.input_tokens += record.input_tokens + record.cache_creation_input_tokens + record.cache_read_input_tokens
        self.output_tokens += record.output_tokens

    def skipped(self, line: int) -> None:
        """A shard skipped a line an earlier run (or an earlier attempt of this run) answered."""
        if line not in self.succeeded_lines and line not in self.failed_lines:
            self.earlier_lines.add(line)

    def mark_done(self, shard_index: int, lines: int) -> None:
        """A whole shard finished before (or on another machine): its lines are done."""
        self.earlier_shards[shard_index] = lines
        self._changed()

    def report(self, shard_index: int, in_flight: int) -> None:
        self.in_flight_by_shard[shard_index] = in_flight
        self._changed()

    @property
    def cost_usd(self) -> float:
        return self.answered_cost_usd + (self.extra_cost_usd() if self.extra_cost_usd is not None else 0.0)

    @property
    def sent(self) -> int:
        """Lines sent at least once in this run."""
        return len(self.sent_lines)

    @property
    def done(self) -> int:
        answered = len(self.succeeded_lines) + len(self.failed_lines)
        return answered + len(self.earlier_lines) + sum(self.earlier_shards.values())

    @property
    def failed(self) -> int:
        return len(self.failed_lines)

    @property
    def in_flight(self) -> int:
        return sum(self.in_flight_by_shard.values())

    @property
    def percent(self) -> float:
        return 100.0 * min(self.done, self.total_requests) / self.total_requests if self.total_requests else 100.0

    def _per_request(self, total: float) -> float | None:
        answered = len(self.succeeded_lines) + len(self.failed_lines)
        return total / answered if answered else None

    @property
    def projected_cost_usd(self) -> float | None:
        """What the whole run will have cost, at the cost per request seen so far."""
        per_request = self._per_request(self.answered_cost_usd)
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
        per_input, per_output = self._per_request(self.input_tokens), self._per_request(self.output_tokens)
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
        answered = len(self.succeeded_lines) + len(self.failed_lines)
        return 60.0 * answered / elapsed if elapsed > 0 else 0.0

    @property
    def dollars_per_minute(self) -> float:
        elapsed = self.elapsed_s
        return 60.0 * self.cost_usd / elapsed if elapsed > 0 else 0.0

    def _rate_limit_text(self) -> str:
        limits = self.limits() if self.limits is not None else {}
        rpm = [limit.requests_per_minute for limit in limits.values() if limit.requests_per_minute]
        return f"/{number(sum(rpm))}" if rpm else ""

    def headline(self) -> str:
        """The bar's line (after a 16-character bar and the percentage: about 55 characters are left)."""
        waiting = self.waiting() if self.waiting is not None else None
        phase = self.phase() if self.phase is not None else None
        return f"{number(self.done)}/{number(self.total_requests)} requests, {number(self.failed)} failed | " + (
            waiting or phase or f"ETA {duration(self.eta_s())}"
        )

    def details(self) -> str:
        """The line under the bar, within 80 columns: spent of the projected total, $/min, requests/min
        against the limit, in flight (and the concurrency window only while overload holds it down)."""
        projected = self.projected_cost_usd
        window = self.concurrency() if self.concurrency is not None else None
        held = f", window {number(window)}" if window is not None and window < self.in_flight + 1 else ""
        return (
            f"{money(self.cost_usd)} of ~{money(projected) if projected is not None else '?'} | "
            f"{money(self.dollars_per_minute)}/min | {number(self.requests_per_minute)}"
            f"{self._rate_limit_text()} req/min | {number(self.in_flight)} in flight{held}"
        )

    def describe(self) -> str:
        text = f"{self.headline()} | {self.details()}"
        if self.phase_detail is not None:
            share = len(self.batch_lines) / self.total_requests if self.total_requests else 0.0
            text += f" | {self.phase_detail()}; {share:.0%} answered at batch price"
        return text
