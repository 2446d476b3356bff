"""Auto mode: half price by a deadline.

Every request goes to Message Batches first (half price, "within 24 hours"). The run watches how many
requests the batches have not answered yet and what real time would need to answer them at the limits in
force; at the latest moment that still leaves that time before the deadline (the cut-over), it cancels the
unfinished batches, keeps every result they return (a canceled batch still returns what it processed, also
what finished while it was canceling) and sends only the requests without a result in real time.

Real time's need is the estimate's duration with every reply at `max_tokens` (the limits decide it, not the
replies' luck), scaled to the requests left, times `1 + deadline_margin`, plus `deadline_slack_s` for the
last replies, the cancel and writing the dataset. A deadline that this leaves no room for is refused before
anything is sent, naming the earliest deadline that would do.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["CutOver", "DeadlineInfeasible", "absolute_deadline", "auto_estimate", "parse_deadline"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|min|s)", re.IGNORECASE)
_UNIT_S = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "min": 60.0, "s": 1.0}


class DeadlineInfeasible(ValueError):
    """Even real time cannot finish by the deadline."""


def parse_deadline(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time with its zone (`2026-12-03T06:00:00+00:00`, `...Z`) or a duration from `now`
    (`90m`, `6h`, `1h30m`, `45s`, `2d`)."""
    now = now or datetime.now(timezone.utc)
    spec = text.strip()
    compact = spec.replace(" ", "")
    pieces = _DURATION.findall(compact)
    if pieces and "".join(f"{n}{u}" for n, u in pieces).lower() == compact.lower():
        return now + timedelta(seconds=sum(float(n) * _UNIT_S[u.lower()] for n, u in pieces))
    try:
        when = datetime.fromisoformat(spec.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--deadline {text!r}: give an ISO 8601 time with its zone (2026-12-03T06:00:00+00:00) or a "
            "duration (90m, 6h, 1h30m)"
        ) from None
    if when.tzinfo is None:
        raise ValueError(f"--deadline {text!r} has no time zone: add one (+00:00 or Z for UTC)")
    return when


def absolute_deadline(text: str, now: datetime | None = None) -> str:
    """The deadline as an ISO 8601 time in UTC (a duration counts from `now`)."""
    return parse_deadline(text, now).astimezone(timezone.utc).isoformat(timespec="seconds")


def _clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="seconds")


def _time(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%H:%M:%S UTC")


@dataclass
class CutOver:
    """When the batches give way to real time. `remaining` holds, per shard, its requests without a batch
    result (all of them until its batches are polled)."""

    deadline: float  # epoch seconds
    realtime_s: float  # every request in real time, at the limits in force, replies at max_tokens
    total: int
    margin: float
    slack_s: float
    remaining: dict[int, int] = field(default_factory=dict)
    cut_at: float | None = None  # epoch seconds, once it happened
    late: bool = False  # a resumed run that can no longer make the deadline: real time at once
    answered_in_batch: int = 0

    @classmethod
    def plan(
        cls,
        deadline: str,
        estimate: dict[str, Any],
        *,
        margin: float,
        slack_s: float,
        remaining: dict[int, int] | None = None,
        resumed: bool = False,
        now: float | None = None,
    ) -> CutOver:
        """The cut-over plan for a run whose shards have `remaining` requests without an answer (default: all
        of them). When even real time from now would be late for them: DeadlineInfeasible for a new run
        (nothing is sent); a resumed run (its batches submitted, its rows partly written) cuts over at once,
        finishing as early as it can."""
        now = time.time() if now is None else now
        at = parse_deadline(deadline, datetime.fromtimestamp(now, timezone.utc)).timestamp()
        realtime_s = float(estimate.get("duration_s_if_replies_hit_max_tokens") or 0.0)
        total = max(1, int(estimate.get("requests") or 0))
        plan = cls(at, realtime_s, total, margin, slack_s, dict(remaining) if remaining is not None else {0: total})
        earliest = now + plan.needed_s(plan.left)
        if earliest > at and resumed:
            plan.cut_at = now
            plan.late = True
        elif earliest > at:
            raise DeadlineInfeasible(
                f"the deadline {_clock(at)} cannot be met even in real time: {plan.left:,} requests need "
                f"{plan.needed_s(plan.left) - slack_s:,.0f} s at the limits in force (every reply at max_tokens, "
                f"+{margin:.0%}) and {slack_s:,.0f} s in hand; the earliest feasible deadline is {_clock(earliest)}"
            )
        return plan

    def needed_s(self, requests: int) -> float:
        """Real time's need for `requests`, margin and slack included."""
        return self.realtime_s * requests / self.total * (1 + self.margin) + self.slack_s

    @property
    def left(self) -> int:
        """Requests without a batch result (shards not yet polled count whole)."""
        return sum(self.remaining.values())

    def cutover_time(self) -> float:
        """The latest moment real time can take over the requests left and still finish by the deadline."""
        return self.deadline - self.needed_s(self.left)

    def due(self, now: float | None = None) -> bool:
        """Whether to cut over now (once it is, it stays so)."""
        if self.cut_at is None and (time.time() if now is None else now) >= self.cutover_time():
            self.cut_at = time.time() if now is None else now
        return self.cut_at is not None

    def summary(self) -> dict[str, Any]:
        return {
            "deadline": _clock(self.deadline),
            "cutover_at": _clock(self.cut_at) if self.cut_at is not None else None,
            "deadline_missed_at_start": self.late,
            "realtime_estimate_s": round(self.realtime_s, 1),
        }

    def short(self) -> str:
        """The phase for the progress bar's line."""
        if self.cut_at is not None:
            return f"real time, deadline {_time(self.deadline)}"
        return f"batches, cut-over by {_time(self.cutover_time())}"

    def describe(self) -> str:
        if self.late:
            return f"real time at once: the deadline {_clock(self.deadline)} can no longer be met"
        if self.cut_at is not None:
            return f"real time since {_clock(self.cut_at)} (deadline {_clock(self.deadline)})"
        return f"batches until {_clock(self.cutover_time())} at the latest (deadline {_clock(self.deadline)})"


def auto_estimate(
    estimate: dict[str, Any], deadline: str | None, *, margin: float, slack_s: float, now: float | None = None
) -> dict[str, Any]:
    """Auto mode beside real time and batch in `estimate`: its cost from all at batch price (the batches
    finish before the cut-over) to its worst case (all in real time after the cut-over), and with a
    deadline, the cut-over time (or why the deadline cannot be met)."""
    result: dict[str, Any] = {
        "cost_usd_min": estimate["batch_cost_usd_min"],
        "cost_usd_worst_case": estimate["cost_usd_max"],
        "deadline": None,
        "cutover_at": None,
        "feasible": None,
    }
    if deadline:
        now = time.time() if now is None else now
        at = parse_deadline(deadline, datetime.fromtimestamp(now, timezone.utc)).timestamp()
        result["deadline"] = _clock(at)
        try:
            plan = CutOver.plan(deadline, estimate, margin=margin, slack_s=slack_s, now=now)
        except DeadlineInfeasible as infeasible:
            result.update(feasible=False, problem=str(infeasible))
        else:
            result.update(feasible=True, cutover_at=_clock(plan.cutover_time()))
    return result
