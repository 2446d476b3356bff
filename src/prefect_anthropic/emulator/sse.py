"""The Messages streaming protocol: a finished message told as server-sent events.

`message_start` (the message with empty content and the input usage), then per content block
`content_block_start`, its deltas (`text_delta`, `thinking_delta` + `signature_delta`, `input_json_delta`)
and `content_block_stop`, a `ping` now and then, `message_delta` (stop reason and output usage), and
`message_stop`. Faults cut the stream: a dropped connection half-way, or an `error` event.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["stream_events"]

_CHUNK = 24  # characters per delta


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), _CHUNK):
        yield text[start : start + _CHUNK]


def _start(index: int, block: dict[str, Any]) -> bytes:
    return _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _block_events(index: int, block: dict[str, Any]) -> Iterator[bytes]:
    kind = block.get("type")
    if kind == "text":
        yield _start(index, {"type": "text", "text": ""})
        for piece in _chunks(block["text"]):
            yield _delta(index, {"type": "text_delta", "text": piece})
    elif kind == "thinking":
        yield _start(index, {"type": "thinking", "thinking": "", "signature": ""})
        for piece in _chunks(block["thinking"]):
            yield _delta(index, {"type": "thinking_delta", "thinking": piece})
        yield _delta(index, {"type": "signature_delta", "signature": block["signature"]})
    elif kind == "tool_use":
        yield _start(index, {**block, "input": {}})
        for piece in _chunks(orjson.dumps(block["input"]).decode()):
            yield _delta(index, {"type": "input_json_delta", "partial_json": piece})
    yield _event("content_block_stop", {"type": "content_block_stop", "index": index})


def stream_events(message: dict[str, Any]) -> list[bytes]:
    """Every event of a streamed reply, in order."""
    usage = message["usage"]
    opening = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    opening["usage"] = {**usage, "output_tokens": min(1, usage["output_tokens"])}
    events = [_event("message_start", {"type": "message_start", "message": opening}), _event("ping", {"type": "ping"})]
    for index, block in enumerate(message["content"]):
        events += _block_events(index, block)
        events.append(_event("ping", {"type": "ping"}))
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    if message.get("stop_details") is not None:
        delta["stop_details"] = message["stop_details"]
    events.append(_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def error_event(error: dict[str, Any]) -> bytes:
    return _event("error", {"type": "error", "error": error})
