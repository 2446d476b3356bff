"""Server-side rate limits: per API key and model class, three continuously refilled buckets."""

from __future__ import annotations

import datetime as dt
import math
import time

from ..engine.limiter import TokenBucket
from .config import EmulatorConfig


class ClassBuckets:
    def __init__(self, config: EmulatorConfig, now: float) -> None:
        window = config.burst_seconds / 60.0

        def make(limit: float, unit: float) -> TokenBucket | None:
            return TokenBucket(limit, max(unit, limit * window), now) if limit > 0 else None

        self.requests = make(config.requests_per_minute, 1.0)
        self.input = make(config.input_tokens_per_minute, 1.0)
        self.output = make(config.output_tokens_per_minute, 1.0)

    def admission_wait(self, input_cost: float, output_cost: float, now: float) -> tuple[float, str | None]:
        """(seconds to wait, name of the limiting bucket) or (0, None) when the request may go now."""
        worst, which = 0.0, None
        for name, bucket, cost in (
            ("requests", self.requests, 1.0),
            ("input tokens", self.input, input_cost),
            ("output tokens", self.output, output_cost),
        ):
            if bucket is None:
                continue
            wait = bucket.wait_time(cost, now)
            if wait > worst:
                worst, which = wait, name
        return worst, which

    def headers(self, now: float) -> dict[str, str]:
        """anthropic-ratelimit-* headers; reset is when the bucket would be full again (RFC 3339)."""
        wall = time.time()
        out: dict[str, str] = {}
        token_views = []
        for stem, bucket, rounding in (
            ("requests", self.requests, 1),
            ("input-tokens", self.input, 1000),
            ("output-tokens", self.output, 1000),
        ):
            if bucket is None:
                continue
            bucket.refill(now)
            remaining = max(0, math.floor(bucket.level))
            if rounding > 1:
                remaining -= remaining % rounding
            reset = rfc3339(wall + bucket.seconds_to_full(now))
            out[f"anthropic-ratelimit-{stem}-limit"] = str(int(bucket.per_minute))
            out[f"anthropic-ratelimit-{stem}-remaining"] = str(remaining)
            out[f"anthropic-ratelimit-{stem}-reset"] = reset
            if stem != "requests":
                token_views.append((remaining, stem))
        if token_views:
            _, stem = min(token_views)
            for part in ("limit", "remaining", "reset"):
                out[f"anthropic-ratelimit-tokens-{part}"] = out[f"anthropic-ratelimit-{stem}-{part}"]
        return out


def rfc3339(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
