"""The Message Batches API: create, retrieve, list, cancel, delete, results (JSONL, in any order).

Requests of a batch finish one by one over its processing time (`--batch-delay-s` on average, spread by
`--batch-delay-jitter`), so a client polling in between sees `request_counts` move; a cancel leaves the
batch `canceling` for `--batch-cancel-s`, during which due requests still finish, then ends the rest as
`canceled`. Params are validated when the request is processed (errors appear in the results), as the real
service does. Only succeeded requests are billed, at half price.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import APIError, invalid
from .prompt import parse_request
from .ratelimit import rfc3339
from .service import Caller, EmulatedAnthropic, body_digest, new_id

MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class _Item:
    custom_id: str
    params: Any
    due: float
    result: dict[str, Any] | None = None


@dataclass
class Batch:
    id: str
    key: str
    created_at: float
    items: list[_Item]
    base_url: str
    #: Requests of a batch follow the rules of the API version it was created under.
    api_version: str = "2023-06-01"
    beta: str = ""
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    next_due: int = 0

    @property
    def status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def as_dict(self) -> dict[str, Any]:
        ended = self.ended_at is not None
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": {"processing": len(self.items) - sum(self.counts.values()), **self.counts},
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + 24 * 3600),
            "ended_at": rfc3339(self.ended_at) if self.ended_at is not None else None,
            "cancel_initiated_at": (
                rfc3339(self.cancel_initiated_at) if self.cancel_initiated_at is not None else None
            ),
            "archived_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }


class BatchStore:
    def __init__(self, api: EmulatedAnthropic) -> None:
        self.api = api
        self._batches: dict[str, Batch] = {}

    def reset(self) -> None:
        self._batches.clear()

    def create(self, caller: Caller, body: Any, raw_size: int, base_url: str) -> dict[str, Any]:
        if raw_size > MAX_BATCH_BYTES:
            raise APIError(413, f"Batch exceeds the maximum size of {MAX_BATCH_BYTES} bytes.")
        if not isinstance(body, dict) or "requests" not in body:
            raise invalid("requests: Field required")
        extra = set(body) - {"requests"}
        if extra:
            raise invalid(f"{sorted(extra)[0]}: Extra inputs are not permitted")
        requests = body["requests"]
        if not isinstance(requests, list) or not requests:
            raise invalid("requests: List should have at least 1 item")
        if len(requests) > MAX_BATCH_REQUESTS:
            raise invalid(f"requests: List should have at most {MAX_BATCH_REQUESTS} items")
        seen: set[str] = set()
        for i, request in enumerate(requests):
            if not isinstance(request, dict) or "custom_id" not in request or "params" not in request:
                raise invalid(f"requests.{i}: custom_id and params are required")
            custom_id = request["custom_id"]
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                raise invalid(f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if custom_id in seen:
                raise invalid(f"requests.{i}.custom_id: Duplicate custom_id {custom_id!r}")
            seen.add(custom_id)
            if not isinstance(request["params"], dict):
                raise invalid(f"requests.{i}.params: Input should be a valid dictionary")
        now = self.api.wall_now()
        config, rng = self.api.config, self.api.rng
        delay = config.batch_delay_s * (1 + config.batch_delay_jitter * rng.uniform(-1.0, 1.0))
        n = len(requests)
        if config.batch_delay_jitter:  # finished at random moments, the last at the batch's end
            offsets = [*sorted(rng.uniform(0.0, delay) for _ in range(n - 1)), delay]
        else:
            offsets = [delay * (i + 1) / n for i in range(n)]
        items = [_Item(r["custom_id"], r["params"], now + offset) for r, offset in zip(requests, offsets, strict=True)]
        batch = Batch(new_id("msgbatch"), caller.key, now, items, base_url, caller.api_version, caller.beta)
        self._batches[batch.id] = batch
        return batch.as_dict()

    def _get(self, key: str, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None or batch.key != key:
            raise APIError(404, f"Batch {batch_id} not found")
        self._advance(batch)
        return batch

    def _advance(self, batch: Batch) -> None:
        if batch.ended_at is not None:
            return
        now = self.api.wall_now()
        items = batch.items
        canceled_at = None
        if batch.cancel_initiated_at is not None:
            canceled_at = batch.cancel_initiated_at + self.api.config.batch_cancel_s
        until = now if canceled_at is None else min(now, canceled_at)
        while batch.next_due < len(items) and items[batch.next_due].due <= until:
            self._process(batch, items[batch.next_due])
            batch.next_due += 1
        if canceled_at is not None and now >= canceled_at:
            for item in items[batch.next_due :]:
                item.result = {"type": "canceled"}
                batch.counts["canceled"] += 1
            batch.next_due = len(items)
        if batch.next_due == len(items):
            batch.ended_at = now

    def _process(self, batch: Batch, item: _Item) -> None:
        api = self.api
        if api.config.batch_expire_rate and api.rng.random() < api.config.batch_expire_rate:
            item.result = {"type": "expired"}
            batch.counts["expired"] += 1
            return
        try:
            params = item.params
            if params.get("stream"):
                raise invalid("stream: streaming is not supported in message batches")
            if params.get("max_tokens") == 0:
                raise invalid("max_tokens: pre-warming with max_tokens=0 is not supported in message batches")
            parsed = parse_request(params, api_version=batch.api_version, beta=batch.beta, models=api.models)
        except APIError as error:
            item.result = {"type": "errored", "error": error.envelope(new_id("req"))}
            batch.counts["errored"] += 1
            return
        now = api.now()
        raw = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
        message, usage = api.generate(batch.key, parsed, now, ready_at=now, raw=raw, service_tier="batch")
        api.ledger.bill(body_digest(raw), parsed.model, usage, batch=True)
        item.result = {"type": "succeeded", "message": message}
        batch.counts["succeeded"] += 1

    def retrieve(self, key: str, batch_id: str) -> dict[str, Any]:
        return self._get(key, batch_id).as_dict()

    def list(self, key: str, limit: int, after_id: str | None, before_id: str | None) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise invalid("limit: Input should be between 1 and 1000")
        batches = [b for b in reversed(self._batches.values()) if b.key == key]  # newest first
        ids = [b.id for b in batches]
        start, stop = 0, len(batches)
        if after_id is not None:
            start = ids.index(after_id) + 1 if after_id in ids else len(ids)
        if before_id is not None:
            stop = ids.index(before_id) if before_id in ids else 0
            start = max(start, stop - limit)
        page = batches[start:stop][:limit]
        for batch in page:
            self._advance(batch)
        return {
            "data": [b.as_dict() for b in page],
            "has_more": start + len(page) < stop,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }

    def cancel(self, key: str, batch_id: str) -> dict[str, Any]:
        batch = self._get(key, batch_id)
        if batch.ended_at is None and batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = self.api.wall_now()
            return batch.as_dict()  # canceling for --batch-cancel-s, then ended
        return batch.as_dict()

    def delete(self, key: str, batch_id: str) -> dict[str, Any]:
        batch = self._get(key, batch_id)
        if batch.ended_at is None:
            raise invalid(f"Batch {batch_id} cannot be deleted while it is still processing; cancel it first.")
        del self._batches[batch_id]
        return {"id": batch_id, "type": "message_batch_deleted"}

    def results(self, key: str, batch_id: str) -> bytes:
        batch = self._get(key, batch_id)
        if batch.ended_at is None:
            raise invalid(f"Batch {batch_id} has not finished processing; results are not available yet.")
        items = list(batch.items)
        self.api.rng.shuffle(items)  # any order, as the real API documents
        return b"".join(orjson.dumps({"custom_id": item.custom_id, "result": item.result}) + b"\n" for item in items)
