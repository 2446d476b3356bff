"""A hard spending limit: never pay more than asked.

Before a request is sent, its worst case is reserved: the estimated input (with a margin for the
estimate's error) at the right price, cache-aware, plus `max_tokens` of output, with every multiplier of
the model table (long context, fast mode, US-only inference, batch). A reply settles the reservation to
its real cost; an error answer that is not billed (429, 5xx) gives it back; an answer lost on the way (a
dropped connection) keeps it, as it may have been billed. A request whose reservation would cross the
limit is not sent: the budget is exhausted and every request after it becomes a `budget_exhausted` row,
so the same command with a higher limit resumes from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..formatting import money
from ..models import ModelInfo, Usage, cost_usd
from .caching import cached_prefix
from .records import RequestItem, ResultRecord

__all__ = ["Budget", "worst_case_cost"]

#: The input estimate may be low before the estimator has learned the model's ratio: reserve this much more.
_INPUT_MARGIN = 1.25


def worst_case_cost(
    info: ModelInfo | str,
    body: dict[str, Any],
    estimated_input_tokens: int,
    *,
    warm_tokens: int = 0,
    batch: bool = False,
) -> float | None:
    """The most a request can cost (None when the model table cannot price it)."""
    input_tokens = math.ceil(estimated_input_tokens * _INPUT_MARGIN) + 16
    read = min(warm_tokens, input_tokens)
    rest = input_tokens - read
    prefix = cached_prefix(body)
    one_hour = prefix is not None and math.isclose(prefix.ttl_s, 3600.0)
    max_tokens = body.get("max_tokens")
    usage = Usage(
        # A request with a cache breakpoint may write its whole prompt to the cache: price it as a write.
        input_tokens=0 if prefix is not None else rest,
        cache_creation_input_tokens=rest if prefix is not None else 0,
        cache_creation_1h_input_tokens=rest if one_hour else 0,
        cache_read_input_tokens=read,
        output_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0,
        speed=body.get("speed"),
        inference_geo=body.get("inference_geo"),
    )
    return cost_usd(info, usage, batch=batch)


@dataclass
class Budget:
    """Dollars this run may still commit: `limit_usd` less what is spent (earlier runs of the same output
    included) and what is reserved by requests in flight."""

    limit_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    exhausted: bool = False
    #: Reservations held for batches in flight, by batch id (settled when their results are downloaded).
    holds: dict[str, float] = field(default_factory=dict)

    def reserve(self, worst_usd: float) -> bool:
        """Take `worst_usd` from the budget; False (and the budget is exhausted) when it does not fit."""
        if self.exhausted or self.spent_usd + self.reserved_usd + worst_usd > self.limit_usd:
            self.exhausted = True
            return False
        self.reserved_usd += worst_usd
        return True

    async def areserve(self, worst_usd: float) -> bool:
        """`reserve`, awaitable (a shared budget asks Redis)."""
        return self.reserve(worst_usd)

    async def aclose(self) -> None:
        """Nothing to send: this budget is this process's."""

    def settle(self, reserved_usd: float, actual_usd: float | None) -> None:
        """The request was answered (or may have been billed): its real cost, or the reservation, is spent."""
        self.reserved_usd -= reserved_usd
        self.spent_usd += reserved_usd if actual_usd is None else actual_usd

    def refund(self, reserved_usd: float) -> None:
        """The request was not billed (an error answer): give its reservation back."""
        self.reserved_usd -= reserved_usd

    @property
    def remaining_usd(self) -> float:
        return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)

    def exhausted_record(self, item: RequestItem, why: str | None = None, **fields: Any) -> ResultRecord:
        """The row of a request the budget did not let go: not sent; a later run with more budget sends it."""
        why = why or (
            f"the budget of {money(self.limit_usd)} is spent or committed ({money(self.spent_usd)} spent); run "
            "again with a higher --max-cost-usd to resume"
        )
        return ResultRecord.errored(item, "budget_exhausted", f"line {item.line}: not sent: {why}", **fields)
