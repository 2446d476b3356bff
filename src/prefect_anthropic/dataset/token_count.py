"""`estimate --exact`: input tokens counted by the API's own `/v1/messages/count_tokens`.

The endpoint is free and exact, with a rate limit of its own (requests per minute: 100 / 2,000 / 4,000 /
8,000 for Tiers 1-4; not published for the 2026 tiers, so it starts at 100 and adopts the server's
headers). Requests are counted concurrently within that limit, with the SDK's retry rules, and every
count is kept on disk as soon as it is known (keyed by a digest of what was counted), so counting a big
file again, after an interruption or an edit, asks only for what is new.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson

from ..engine.client import auth_headers
from ..engine.corrections import corrections_path
from ..engine.errors import APIStatusError, FatalAPIError
from ..engine.limiter import RateLimiter, RateLimits
from ..engine.records import RequestItem
from ..engine.retry import RetryPolicy, retry_after_seconds

__all__ = ["COUNT_TOKENS_FIELDS", "count_body", "count_input_tokens"]

#: What count_tokens takes of a Messages body.
COUNT_TOKENS_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control", "output_config",
     "output_format", "speed", "mcp_servers"}
)  # fmt: skip
#: count_tokens requests per minute by tier; tiers not listed adopt the server's headers from 100.
COUNT_TOKENS_RPM = {"1": 100, "2": 2_000, "3": 4_000, "4": 8_000}
_CONCURRENCY = 16


def count_body(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key in COUNT_TOKENS_FIELDS}


def _digest(body: dict[str, Any], api_version: str) -> str:
    raw = orjson.dumps([api_version, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _cache_path(requests_path: str | os.PathLike[str]) -> Path:
    key = hashlib.blake2b(str(Path(requests_path).resolve()).encode(), digest_size=8).hexdigest()
    return corrections_path().parent / "token_counts" / f"{key}.jsonl"


def _read_cache(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    try:
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a torn last line of an interrupted count
                counts[entry["digest"]] = int(entry["input_tokens"])
    except FileNotFoundError:
        pass
    return counts


async def count_input_tokens(
    items: Iterable[RequestItem],
    requests_path: str | os.PathLike[str],
    *,
    api_key: str,
    base_url: str,
    api_version: str,
    tier: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> dict[int, int]:
    """Line -> input tokens as the API counts them, for every item given."""
    cache_path = _cache_path(requests_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    known = _read_cache(cache_path)
    rpm = COUNT_TOKENS_RPM.get((tier or "").lower())
    limiter = RateLimiter(RateLimits(requests_per_minute=rpm or 100), adopt_server_limits=rpm is None)
    headers = {**auth_headers(api_key, api_version), "anthropic-version": api_version}
    counts: dict[int, int] = {}
    window = asyncio.Semaphore(_CONCURRENCY)

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        with open(cache_path, "ab") as cache:

            async def count(item: RequestItem) -> None:
                body = count_body(item.body)
                digest = _digest(body, api_version)
                if digest in known:
                    counts[item.line] = known[digest]
                    return
                async with window:
                    tokens = await _count_one(http, limiter, retry, body)
                known[digest] = counts[item.line] = tokens
                cache.write(orjson.dumps({"digest": digest, "input_tokens": tokens}) + b"\n")
                cache.flush()

            batch: list[RequestItem] = []
            for item in items:  # a bounded number of tasks at a time, whatever the size of the file
                batch.append(item)
                if len(batch) >= 5_000:
                    await asyncio.gather(*(count(queued) for queued in batch))
                    batch.clear()
            await asyncio.gather(*(count(queued) for queued in batch))
    return counts


async def _count_one(http: httpx.AsyncClient, limiter: RateLimiter, retry: RetryPolicy, body: dict[str, Any]) -> int:
    payload = orjson.dumps(body)
    last: Exception | None = None
    for attempt in range(retry.max_attempts):
        await limiter.acquire(0, 0)
        try:
            response = await http.post("/v1/messages/count_tokens", content=payload)
        except httpx.TransportError as exc:
            last = exc
            await asyncio.sleep(retry.delay(attempt))
            continue
        limiter.observe_headers(response.headers)
        if response.status_code == 200:
            return int(response.json()["input_tokens"])
        try:
            error_body = response.json()
        except json.JSONDecodeError:
            error_body = response.text
        last = APIStatusError.from_body(response.status_code, error_body, response.headers.get("request-id"))
        if isinstance(last, FatalAPIError) or not retry.is_retryable(response.status_code, response.headers):
            raise last
        if response.status_code == 429:
            limiter.pause(retry_after_seconds(response.headers) or retry.delay(attempt))
        await asyncio.sleep(retry.delay(attempt, response.headers))
    assert last is not None
    raise last
