"""The Messages streaming protocol: a finished message told as server-sent events.

`message_start` (the message with empty content and the input usage), then per content block
`content_block_start`, its deltas (`text_delta`, `thinking_delta` + `signature_delta`, `input_json_delta`)
and `content_block_stop`, a `ping` now and then, `message_delta` (stop reason and output usage), and
`message_stop`. Faults cut the stream: a dropped connection half-way, or an `error` event.
`paced_stream` also tells when each event is due, for a reply produced at a given output speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["PacedStream", "error_event", "paced_stream"]

_CHUNK = 24  # characters per delta


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), _CHUNK):
        yield text[start : start + _CHUNK]


def _start(index: int, block: dict[str, Any]) -> tuple[bytes, int]:
    event = _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
    return event, 0


def _delta(index: int, delta: dict[str, Any], output: str = "") -> tuple[bytes, int]:
    event = _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    return event, len(output)


def _block_events(index: int, block: dict[str, Any]) -> Iterator[tuple[bytes, int]]:
    """The events of one content block, each with the characters of output it carries."""
    kind = block.get("type")
    if kind == "text":
        yield _start(index, {"type": "text", "text": ""})
        for piece in _chunks(block["text"]):
            yield _delta(index, {"type": "text_delta", "text": piece}, piece)
    elif kind == "thinking":
        yield _start(index, {"type": "thinking", "thinking": "", "signature": ""})
        for piece in _chunks(block["thinking"]):
            yield _delta(index, {"type": "thinking_delta", "thinking": piece}, piece)
        yield _delta(index, {"type": "signature_delta", "signature": block["signature"]})
    elif kind == "tool_use":
        yield _start(index, {**block, "input": {}})
        for piece in _chunks(orjson.dumps(block["input"]).decode()):
            yield _delta(index, {"type": "input_json_delta", "partial_json": piece}, piece)
    yield _event("content_block_stop", {"type": "content_block_stop", "index": index}), 0


@dataclass(frozen=True)
class PacedStream:
    """A streamed reply's events with their times, in seconds after the first token."""

    #: message_start to the last content event, each with the time it is due: the output spread over
    #: `output_s` in proportion to the characters each delta carries.
    content: list[tuple[float, bytes]]
    #: message_delta and message_stop, due once the output is complete, at `output_s`.
    closing: list[bytes]
    output_s: float


def paced_stream(message: dict[str, Any], output_s: float = 0.0) -> PacedStream:
    """The events of a streamed reply whose output takes `output_s` seconds after its first token."""
    usage = message["usage"]
    opening = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    opening["usage"] = {**usage, "output_tokens": min(1, usage["output_tokens"])}
    events: list[tuple[bytes, int]] = [
        (_event("message_start", {"type": "message_start", "message": opening}), 0),
        (_event("ping", {"type": "ping"}), 0),
    ]
    for index, block in enumerate(message["content"]):
        events += _block_events(index, block)
        events.append((_event("ping", {"type": "ping"}), 0))
    total = sum(size for _, size in events)
    content: list[tuple[float, bytes]] = []
    produced = 0
    for event, size in events:
        produced += size
        content.append((output_s * produced / total if total else 0.0, event))
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    if message.get("stop_details") is not None:
        delta["stop_details"] = message["stop_details"]
    closing = [
        _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return PacedStream(content, closing, output_s)


def error_event(error: dict[str, Any]) -> bytes:
    return _event("error", {"type": "error", "error": error})
