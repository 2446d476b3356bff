"""Long outputs: when to stream a request, and how a stream of events becomes one Message.

The official SDK refuses a non-streaming request whose expected time (3,600 s x max_tokens / 128,000)
is above 10 minutes: such a request is sent with `stream: true` and the events are accumulated into the
same Message a non-streaming answer would hold. A stream that ends before `message_stop` is a cut
connection (retried like one); an `error` event is the API's error, with the status its type implies.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from httpx_sse import EventSource

__all__ = ["StreamCut", "accumulate", "needs_streaming"]

#: The SDK's rule: expected seconds = 3,600 x max_tokens / 128,000; above 600 s, stream.
_SECONDS_PER_HOUR = 3600.0
_TOKENS_PER_HOUR = 128_000
_NON_STREAMING_LIMIT_S = 600.0
#: The status an error event's type stands for.
_ERROR_STATUS = {
    "overloaded_error": 529,
    "api_error": 500,
    "rate_limit_error": 429,
    "timeout_error": 504,
    "invalid_request_error": 400,
    "request_too_large": 413,
}


def needs_streaming(max_tokens: int) -> bool:
    return _SECONDS_PER_HOUR * max_tokens / _TOKENS_PER_HOUR > _NON_STREAMING_LIMIT_S


class StreamCut(httpx.TransportError):
    """The stream ended before `message_stop`: the answer is incomplete, as with a dropped connection."""


def _apply_delta(block: dict[str, Any], delta: dict[str, Any], partial_json: dict[int, list[str]], index: int) -> None:
    kind = delta.get("type")
    if kind == "text_delta":
        block["text"] = block.get("text", "") + delta.get("text", "")
    elif kind == "thinking_delta":
        block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
    elif kind == "signature_delta":
        block["signature"] = delta.get("signature", "")
    elif kind == "input_json_delta":
        partial_json.setdefault(index, []).append(delta.get("partial_json", ""))
    elif kind == "citations_delta":
        block.setdefault("citations", []).append(delta.get("citation"))


async def accumulate(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    """(200, the Message) from a complete stream, or (status, error envelope) from an `error` event.

    Raises StreamCut when the stream ends before `message_stop`.
    """
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    partial_json: dict[int, list[str]] = {}
    async for event in EventSource(response).aiter_sse():
        if event.event == "ping" or not event.data:
            continue
        data = orjson.loads(event.data)
        kind = data.get("type", event.event)
        if kind == "error":
            error = data.get("error") or {}
            return _ERROR_STATUS.get(str(error.get("type")), 500), {"type": "error", "error": error}
        if kind == "message_start":
            message = dict(data["message"])
        elif kind == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
        elif kind == "content_block_delta":
            index = data["index"]
            _apply_delta(blocks.setdefault(index, {}), data.get("delta") or {}, partial_json, index)
        elif kind == "message_delta" and message is not None:
            message.update(data.get("delta") or {})
            message["usage"] = {**(message.get("usage") or {}), **(data.get("usage") or {})}
        elif kind == "message_stop" and message is not None:
            for index, pieces in partial_json.items():
                joined = "".join(pieces)
                blocks[index]["input"] = orjson.loads(joined) if joined else {}
            message["content"] = [blocks[i] for i in sorted(blocks)]
            return 200, message
    raise StreamCut("the stream ended before message_stop")
