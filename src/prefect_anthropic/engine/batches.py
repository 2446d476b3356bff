"""Message Batches mode: the same requests at half the price, processed asynchronously by Anthropic.

`BatchAPI` speaks the Batches endpoints (create, retrieve, cancel, results) with the client's retry rules.
`plan_batches` cuts requests into batches within Anthropic's limits (100,000 requests, 256 MB) with
custom_ids that are valid and unique (`line-<n>`), so each result maps back to its input line whatever the
user's own ids look like. `batch_result_record` turns a result line into the same ResultRecord as
real-time mode, priced with the batch discount.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime
from typing import Any

import httpx
import orjson

from ..api.models import ModelTable
from ..settings import DEFAULT_ANTHROPIC_VERSION, DEFAULT_BASE_URL, ClientSettings
from .account import auth_headers
from .errors import APIStatusError, FatalAPIError
from .records import RequestItem, ResultRecord, record_from_message
from .retry import RetryPolicy

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_REQUESTS",
    "BatchAPI",
    "batch_custom_id",
    "batch_result_record",
    "line_of_custom_id",
    "plan_batches",
]

MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
_ENVELOPE_BYTES = 64  # {"custom_id": ..., "params": ...} around each request


def batch_custom_id(item: RequestItem) -> str:
    return f"line-{item.line}"


def line_of_custom_id(custom_id: str) -> int:
    """The input line a batch request's custom_id names (see batch_custom_id)."""
    return int(custom_id.removeprefix("line-"))


def plan_batches(
    items: Iterable[RequestItem], max_requests: int = MAX_BATCH_REQUESTS, max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[dict[str, Any]]]:
    """Batch request lists within the per-batch limits, in input order."""
    batch: list[dict[str, Any]] = []
    size = 16
    for item in items:
        params = {k: v for k, v in item.body.items() if k != "stream"}
        entry = {"custom_id": batch_custom_id(item), "params": params}
        entry_size = len(orjson.dumps(entry)) + _ENVELOPE_BYTES
        if batch and (len(batch) >= max_requests or size + entry_size > max_bytes):
            yield batch
            batch, size = [], 16
        batch.append(entry)
        size += entry_size
    if batch:
        yield batch


def batch_result_record(item: RequestItem, result: dict[str, Any], models: ModelTable | None = None) -> ResultRecord:
    """One line of a batch's results as a ResultRecord (succeeded, errored, canceled or expired)."""
    kind = result.get("type")
    if kind == "succeeded":
        return record_from_message(item, result.get("message") or {}, batch=True, attempts=1, models=models)
    if kind == "errored":
        envelope: dict[str, Any] = result.get("error") or {}
        inner = envelope.get("error")
        error: dict[str, Any] = inner if isinstance(inner, dict) else envelope
        error_type = str(error.get("type") or "api_error")
        message = str(error.get("message") or "")
        return ResultRecord.errored(
            item, error_type, message, errors=[f"{error_type}: {message}"], attempts=1, mode="batch"
        )
    reasons = {
        "canceled": "the batch was canceled before this request ran",
        "expired": "the batch expired (24 h) before this request ran",
    }
    reason = reasons.get(str(kind), f"result type {kind!r}")
    return ResultRecord.errored(item, f"batch_{kind}", reason, errors=[reason], attempts=1, mode="batch")


class BatchAPI:
    """The Message Batches endpoints, with the SDK's retry rules for 429/5xx and connection errors."""

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        anthropic_version: str = DEFAULT_ANTHROPIC_VERSION,
        retry: RetryPolicy = RetryPolicy(max_attempts=8),
        timeout: float = 600.0,
    ) -> None:
        self.retry = retry
        self._rng = random.Random()
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={
                **auth_headers(api_key, anthropic_version),
                "anthropic-version": anthropic_version,
                "content-type": "application/json",
            },
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    @classmethod
    def for_settings(cls, api_key: str, settings: ClientSettings) -> BatchAPI:
        return cls(
            api_key,
            base_url=settings.api_base_url,
            anthropic_version=settings.api_version,
            retry=RetryPolicy(max_attempts=max(settings.max_attempts, 5)),
            timeout=settings.timeout_s,
        )

    async def __aenter__(self) -> BatchAPI:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(1, self.retry.max_attempts + 1):
            headers: dict[str, str] | None = None
            try:
                response = await self._http.request(method, path, **kwargs)
            except (httpx.TimeoutException, httpx.TransportError):
                if attempt == self.retry.max_attempts:
                    raise
            else:
                if response.status_code < 400:
                    return response
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                error = APIStatusError.from_body(response.status_code, body, response.headers.get("request-id"))
                if isinstance(error, FatalAPIError) or not self.retry.is_retryable(
                    response.status_code, response.headers
                ):
                    raise error
                if attempt == self.retry.max_attempts:
                    raise error
                headers = dict(response.headers)
            await asyncio.sleep(self.retry.delay(attempt - 1, headers, self._rng))
        raise AssertionError("unreachable")

    async def create(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self._call("POST", "/v1/messages/batches", content=orjson.dumps({"requests": requests}))
        return response.json()

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return (await self._call("GET", f"/v1/messages/batches/{batch_id}")).json()

    async def created_since(self, since: datetime) -> list[dict[str, Any]]:
        """The key's batches created at or after `since` (the list is newest first; paged until older)."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after_id": after} if after else {})}
            page = (await self._call("GET", "/v1/messages/batches", params=params)).json()
            for batch in page.get("data") or []:
                if datetime.fromisoformat(str(batch["created_at"]).replace("Z", "+00:00")) < since:
                    return found
                found.append(batch)
            if not page.get("has_more") or not page.get("last_id"):
                return found
            after = page["last_id"]

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return (await self._call("POST", f"/v1/messages/batches/{batch_id}/cancel")).json()

    async def results(self, batch_id: str) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream("GET", f"/v1/messages/batches/{batch_id}/results") as response:
            if response.status_code >= 400:
                await response.aread()
                raise APIStatusError.from_body(
                    response.status_code, response.json(), response.headers.get("request-id")
                )
            async for line in response.aiter_lines():
                if line.strip():
                    yield orjson.loads(line)
