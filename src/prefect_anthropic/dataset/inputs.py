"""Reading request files: lines into RequestItems, and the file into shards (byte ranges).

Two line formats are accepted:
- the original script's: a Messages API body, with an optional top-level `metadata` object that is
  passed through to the results and never sent;
- the Batches API's: `{"custom_id": ..., "params": {...}}` (plus optional `metadata`).

A line that cannot be sent becomes a RequestItem with `invalid` set, which the engine turns into an error
row naming the line: one bad line never stops the others. Blank lines are not requests and are skipped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from ..engine.records import RequestItem
from ..storage import Storage, is_url, local_path

__all__ = ["MAX_REQUEST_BYTES", "Shard", "ShardPlan", "iter_requests", "parse_line", "plan_shards"]

MAX_REQUEST_BYTES = 32 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_REQUIRED = ("model", "max_tokens", "messages")


def line_digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def _invalid(line: int, custom_id: str, why: str, metadata: Any = None) -> RequestItem:
    return RequestItem(line=line, custom_id=custom_id, body={}, metadata=metadata, invalid=f"line {line}: {why}")


def _check_body(body: dict[str, Any]) -> str | None:
    missing = [name for name in _REQUIRED if name not in body]
    if missing:
        return f"missing required field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    if not isinstance(body["model"], str) or not body["model"]:
        return "model must be a non-empty string"
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        return "max_tokens must be a non-negative integer"
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object"
        if message.get("role") not in ("user", "assistant"):
            return f"messages[{i}].role must be 'user' or 'assistant', not {message.get('role')!r}"
    return None


def parse_line(line: int, raw: bytes) -> RequestItem | None:
    """One input line (without its line ending) as a RequestItem; None for a blank line."""
    default_id = f"line-{line}"
    if line == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    if not raw.strip():
        return None
    item = _parse_nonblank(line, raw, default_id)
    item.digest = line_digest(raw)
    return item


def _parse_nonblank(line: int, raw: bytes, default_id: str) -> RequestItem:
    if len(raw) > MAX_REQUEST_BYTES:
        return _invalid(line, default_id, f"request is {len(raw):,} bytes, over the API's 32 MB limit")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _invalid(line, default_id, f"not valid UTF-8 (byte {exc.start})")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _invalid(line, default_id, f"invalid JSON: {exc}")
    if not isinstance(data, dict):
        return _invalid(line, default_id, f"expected a JSON object, got {type(data).__name__}")
    metadata = data.get("metadata")
    if "params" in data and "custom_id" in data:
        custom_id = data["custom_id"]
        custom_id = str(custom_id) if custom_id is not None else default_id
        body = data["params"]
        if not isinstance(body, dict):
            return _invalid(line, custom_id, "params must be a JSON object", metadata)
        body = dict(body)
    else:
        custom_id = default_id
        body = {k: v for k, v in data.items() if k != "metadata"}
        # A metadata object of only `user_id` is the API's own field: send it as well as passing it through.
        if isinstance(metadata, dict) and set(metadata) == {"user_id"}:
            body["metadata"] = metadata
    problem = _check_body(body)
    if problem is not None:
        return _invalid(line, custom_id, problem, metadata)
    return RequestItem(line=line, custom_id=custom_id, body=body, metadata=metadata)


@dataclass(frozen=True)
class Shard:
    """Lines [first_line, first_line + line_count) of a file, stored in bytes [start, end)."""

    index: int
    start: int
    end: int
    first_line: int
    line_count: int
    #: Digest of the shard's bytes and position: a shard's results are never mistaken for another's.
    digest: str = ""

    @property
    def lines(self) -> str:
        """Its lines, for names and messages: `lines 201-300`."""
        return f"lines {self.first_line:,}-{self.first_line + self.line_count - 1:,}".replace(",", "")


def _open(path: str | os.PathLike[str], storage: Storage | None) -> IO[bytes]:
    if is_url(path):
        return (storage or Storage()).open(str(path), "rb")
    return open(local_path(path), "rb")


def iter_requests(
    path: str | os.PathLike[str],
    start: int = 0,
    end: int | None = None,
    first_line: int = 1,
    storage: Storage | None = None,
) -> Iterator[RequestItem]:
    """The requests stored in bytes [start, end) of a file (a path or a URL); lines are numbered from
    `first_line`."""
    with _open(path, storage) as handle:
        handle.seek(start)
        position = start
        line = first_line
        for raw in handle:
            if end is not None and position >= end:
                break
            position += len(raw)
            item = parse_line(line, raw.rstrip(b"\r\n"))
            if item is not None:
                yield item
            line += 1


@dataclass(frozen=True)
class ShardPlan:
    shards: list[Shard]
    lines: int
    size_bytes: int


def plan_shards(path: str | os.PathLike[str], lines_per_shard: int, storage: Storage | None = None) -> ShardPlan:
    """Cut a file (a path or a URL) into shards of `lines_per_shard` lines, in one pass over its bytes."""
    if lines_per_shard < 1:
        raise ValueError("lines_per_shard must be at least 1")
    shards: list[Shard] = []
    start = 0
    first_line = 1
    line = 0
    position = 0

    def new_digest(first: int):
        return hashlib.blake2b(f"{first}:".encode(), digest_size=8)

    digest = new_digest(1)
    with _open(path, storage) as handle:
        for raw in handle:
            digest.update(raw)
            position += len(raw)
            line += 1
            if line - first_line + 1 == lines_per_shard:
                shards.append(Shard(len(shards), start, position, first_line, lines_per_shard, digest.hexdigest()))
                start, first_line = position, line + 1
                digest = new_digest(first_line)
    if position > start:
        shards.append(Shard(len(shards), start, position, first_line, line - first_line + 1, digest.hexdigest()))
    return ShardPlan(shards, line, position)
