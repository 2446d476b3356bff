"""When to retry and how long to wait: the official SDK's rules, which users already know."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["RetryPolicy", "retry_after_seconds"]

_RETRYABLE_STATUSES = frozenset({408, 409, 429})


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms`, else `retry-after` (seconds, float, or an HTTP date); None when absent."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return email.utils.mktime_tz(parsed) - time.time()


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` counts the first try; the backoff is min(initial * 2^n, max) s less up to 25% jitter.

    A positive `retry-after-ms` or `retry-after` is honoured whatever its length, as the official SDK (2.x)
    does: the server knows when it will take the request again, and retrying sooner only buys another 429.
    """

    max_attempts: int = 5
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    @staticmethod
    def is_retryable(status: int, headers: Mapping[str, str]) -> bool:
        should = headers.get("x-should-retry")
        if should == "true":
            return True
        if should == "false":
            return False
        return status in _RETRYABLE_STATUSES or status >= 500

    def delay(
        self, retries_so_far: int, headers: Mapping[str, str] | None = None, rng: random.Random | None = None
    ) -> float:
        if headers is not None:
            after = retry_after_seconds(headers)
            if after is not None and after > 0:
                return after
        base = min(self.initial_delay_s * 2.0**retries_so_far, self.max_delay_s)
        return base * (1.0 - 0.25 * (rng or random).random())
