"""Validating a Messages request body and cutting it into the segments that caching and counting use.

The rules follow the Messages API reference: required fields, roles, content as a string or blocks,
parameter ranges, at most 4 cache_control breakpoints (1 hour entries before 5 minute ones), and unknown
top-level fields rejected.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..api.models import ModelInfo, ModelTable, model_table
from ..api.request_rules import API_VERSION_2023, rejections
from .errors import APIError, invalid
from .structured import check_schema
from .tokenizer import MESSAGE_OVERHEAD, REQUEST_OVERHEAD, count_tokens

MESSAGE_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "tools",
        "tool_choice",
        "thinking",
        "metadata",
        "stream",
        "service_tier",
        "container",
        "mcp_servers",
        "cache_control",
        "output_config",
        "output_format",
        "speed",
        "inference_geo",
        "diagnostics",
        "user_profile_id",
        "workspace_id",
    }
)
COUNT_TOKENS_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "mcp_servers",
        "cache_control",
        "output_config",
        "output_format",
        "speed",
        "user_profile_id",
        "workspace_id",
    }
)
EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})
MAX_BREAKPOINTS = 4
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
_BLOCK_TYPES = frozenset(
    {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking", "search_result"}
)


@dataclass(frozen=True)
class Breakpoint:
    #: Tokens from the start of the prompt up to and including the marked block.
    prefix_tokens: int
    prefix_hash: bytes
    ttl: str


@dataclass
class ParsedRequest:
    model: ModelInfo
    max_tokens: int
    total_input_tokens: int
    breakpoints: list[Breakpoint]
    last_user_text: str
    stop_sequences: list[str] = field(default_factory=list)
    #: The JSON schema of `output_config.format`, when the reply must be JSON matching it.
    output_schema: dict[str, Any] | None = None
    speed: str = "standard"
    inference_geo: str = "global"
    #: `diagnostics.previous_message_id`: the reply explains why the cache missed against that request.
    previous_message_id: str | None = None
    #: Digests of the prompt's parts in prefix order, to tell which part changed between two requests.
    part_digests: dict[str, bytes] = field(default_factory=dict)
    #: Thinking asked for (enabled or adaptive): the reply starts with a thinking block.
    thinking: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: dict[str, Any] | None = None
    stream: bool = False


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def _check_cache_control(block: Any, where: str) -> str | None:
    control = block.get("cache_control") if isinstance(block, dict) else None
    if control is None:
        return None
    at = f"{where}.cache_control" if where else "cache_control"
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise invalid(f"{at}.type: Input should be 'ephemeral'")
    ttl = control.get("ttl", "5m")
    if ttl not in TTL_SECONDS:
        raise invalid(f"{at}.ttl: Input should be '5m' or '1h'")
    extra = set(control) - {"type", "ttl"}
    if extra:
        raise invalid(f"{at}.{sorted(extra)[0]}: Extra inputs are not permitted")
    return ttl


def _block_text(block: dict[str, Any], where: str) -> str:
    kind = block.get("type")
    if kind not in _BLOCK_TYPES:
        raise invalid(f"{where}.type: Input tag '{kind}' found using 'type' does not match any of the expected tags")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}.text: Field required")
        if not text:
            raise invalid("text content blocks must be non-empty")
        return text
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return " ".join(b.get("text", "") for b in content if isinstance(b, dict))
        return str(content)
    if kind == "tool_use":
        return orjson.dumps(block.get("input", {})).decode()
    if kind == "thinking":
        return str(block.get("thinking", ""))
    # Images and documents: a flat charge, as the real service charges by size rather than by characters.
    return "x " * 400


class _Prompt:
    """Accumulates segments in Anthropic's prefix order (tools, system, messages)."""

    def __init__(self, model_id: str) -> None:
        self.tokens = REQUEST_OVERHEAD
        self.hash = hashlib.blake2b(model_id.encode(), digest_size=16)
        self.breakpoints: list[Breakpoint] = []
        self.part_digests: dict[str, bytes] = {"model": self.hash.copy().digest()}

    def end_part(self, name: str) -> None:
        self.part_digests[name] = self.hash.copy().digest()

    def add(self, payload: Any, tokens: int, ttl: str | None) -> None:
        self.tokens += tokens
        self.hash.update(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
        if ttl is not None:
            self.breakpoints.append(Breakpoint(self.tokens, self.hash.copy().digest(), ttl))


def _strip_cache_control(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"} if "cache_control" in block else block


def _output_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of `output_config.format` (or the older beta `output_format`), checked as the API does."""
    config = body.get("output_config")
    fmt = None
    if config is not None:
        if not isinstance(config, dict):
            raise invalid("output_config: Input should be a valid dictionary")
        extra = set(config) - {"effort", "format"}
        if extra:
            raise invalid(f"output_config.{sorted(extra)[0]}: Extra inputs are not permitted")
        effort = config.get("effort")
        if effort is not None and effort not in EFFORTS:
            raise invalid(f"output_config.effort: Input should be one of {', '.join(sorted(EFFORTS))}")
        fmt = config.get("format")
    if fmt is None:
        fmt = body.get("output_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise invalid("output_config.format.type: Input should be 'json_schema'")
    check_schema(fmt.get("schema"))
    return fmt["schema"]


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise invalid(f"{name}: Input should be {' or '.join(repr(a) for a in allowed)}")
    return value


def parse_request(
    body: Any,
    *,
    count_tokens_only: bool = False,
    api_version: str = API_VERSION_2023,
    beta: str = "",
    models: ModelTable | None = None,
) -> ParsedRequest:
    """Validate a request body under an API version; raise APIError exactly where the API would."""
    if not isinstance(body, dict):
        raise invalid(f"Input should be a valid dictionary (got {_type_name(body)})")
    allowed = COUNT_TOKENS_FIELDS if count_tokens_only else MESSAGE_FIELDS
    for key in body:
        if key not in allowed:
            raise invalid(f"{key}: Extra inputs are not permitted")

    model_name = body.get("model")
    if model_name is None:
        raise invalid("model: Field required")
    if not isinstance(model_name, str):
        raise invalid(f"model: Input should be a valid string (got {_type_name(model_name)})")
    model = (models or model_table()).lookup(model_name)
    if model is None or model.is_retired():
        raise APIError(404, f"model: {model_name}")

    max_tokens = 0
    if not count_tokens_only:
        if "max_tokens" not in body:
            raise invalid("max_tokens: Field required")
        max_tokens = body["max_tokens"]
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise invalid("max_tokens: Input should be a valid integer")
        if max_tokens < 0:
            raise invalid("max_tokens: Input should be greater than or equal to 0")
        _check_sampling(body)
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise invalid("metadata: Input should be a valid dictionary")
            for key in metadata:
                if key != "user_id":
                    raise invalid(f"metadata.{key}: Extra inputs are not permitted")
    found = rejections(body, model, api_version, beta=beta)
    if found:
        raise invalid(found[0].message)
    speed = _choice(body, "speed", ("standard", "fast"), "standard")
    inference_geo = _choice(body, "inference_geo", ("global", "us"), "global")
    diagnostics = body.get("diagnostics")
    previous_message_id = None
    if diagnostics is not None:
        if not isinstance(diagnostics, dict) or set(diagnostics) - {"previous_message_id"}:
            raise invalid("diagnostics: only previous_message_id is accepted")
        previous_message_id = diagnostics.get("previous_message_id")
    output_schema = _output_schema(body)
    automatic_ttl = _check_cache_control(body, "") if body.get("cache_control") is not None else None

    prompt = _Prompt(model.id)
    if output_schema is not None:
        # Structured outputs add a system prompt built from the schema: it is part of the cached prefix.
        schema_text = orjson.dumps(output_schema, option=orjson.OPT_SORT_KEYS).decode()
        prompt.add({"output_format": schema_text}, count_tokens(schema_text), None)
    breakpoint_ttls: list[str] = []

    def add_block(payload: Any, tokens: int, block: Any, where: str, automatic: str | None = None) -> None:
        ttl = _check_cache_control(block, where) or automatic
        if ttl is not None:
            breakpoint_ttls.append(ttl)
        prompt.add(payload, tokens, ttl)

    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not tool.get("name"):
                raise invalid(f"tools.{i}.name: Field required")
            clean = _strip_cache_control(tool)
            add_block(clean, count_tokens(orjson.dumps(clean).decode()), tool, f"tools.{i}")
    prompt.end_part("tools")

    system = body.get("system")
    if system is not None:
        if isinstance(system, str):
            if system:
                prompt.add(system, count_tokens(system), None)
        elif isinstance(system, list):
            for i, block in enumerate(system):
                if not isinstance(block, dict) or block.get("type") != "text":
                    raise invalid(f"system.{i}.type: Input should be 'text'")
                text = _block_text(block, f"system.{i}")
                add_block(_strip_cache_control(block), count_tokens(text), block, f"system.{i}")
        else:
            raise invalid("system: Input should be a valid string or a list of text blocks")
    prompt.end_part("system")

    messages = body.get("messages")
    if messages is None:
        raise invalid("messages: Field required")
    if not isinstance(messages, list):
        raise invalid("messages: Input should be a valid list")
    if not messages:
        raise invalid("messages: at least one message is required")
    last_user_text = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        extra = set(message) - {"role", "content"}
        if extra:
            raise invalid(f"messages.{i}.{sorted(extra)[0]}: Extra inputs are not permitted")
        if "content" not in message:
            raise invalid(f"messages.{i}.content: Field required")
        content = message["content"]
        is_last = i == len(messages) - 1
        # Automatic caching (a top-level cache_control) puts the breakpoint on the last cacheable block.
        automatic = automatic_ttl if is_last else None
        is_final_assistant = role == "assistant" and is_last
        prompt.tokens += MESSAGE_OVERHEAD
        if isinstance(content, str):
            if not content and not is_final_assistant:
                raise invalid(
                    f"messages.{i}: all messages must have non-empty content except for the optional "
                    "final assistant message"
                )
            add_block({"role": role, "text": content}, count_tokens(content), None, f"messages.{i}", automatic)
            if role == "user":
                last_user_text = content
        elif isinstance(content, list):
            if not content and not is_final_assistant:
                raise invalid(
                    f"messages.{i}: all messages must have non-empty content except for the optional "
                    "final assistant message"
                )
            texts = []
            for j, block in enumerate(content):
                where = f"messages.{i}.content.{j}"
                if not isinstance(block, dict):
                    raise invalid(f"{where}: Input should be a valid dictionary")
                text = _block_text(block, where)
                if block.get("type") == "text":
                    texts.append(text)
                last_block = automatic if j == len(content) - 1 and not block.get("cache_control") else None
                add_block({"role": role, **_strip_cache_control(block)}, count_tokens(text), block, where, last_block)
            if role == "user" and texts:
                last_user_text = "\n".join(texts)
        else:
            raise invalid(f"messages.{i}.content: Input should be a valid string or list of content blocks")
        prompt.end_part(f"messages.{i}")

    if len(breakpoint_ttls) > MAX_BREAKPOINTS:
        raise invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(breakpoint_ttls)}."
        )
    if "1h" in breakpoint_ttls and "5m" in breakpoint_ttls[: breakpoint_ttls.index("1h")]:
        raise invalid("cache_control: a ttl='1h' cache_control block must not come after a ttl='5m' block")

    stop_sequences = body.get("stop_sequences") or []
    if not isinstance(stop_sequences, list) or not all(isinstance(s, str) for s in stop_sequences):
        raise invalid("stop_sequences: Input should be a valid list of strings")
    return ParsedRequest(
        model=model,
        max_tokens=max_tokens,
        total_input_tokens=prompt.tokens,
        breakpoints=prompt.breakpoints,
        last_user_text=last_user_text,
        stop_sequences=stop_sequences,
        output_schema=output_schema,
        speed=speed,
        inference_geo=inference_geo,
        previous_message_id=previous_message_id,
        part_digests=prompt.part_digests,
        thinking=isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive"),
        tools=[tool for tool in tools or () if isinstance(tool, dict)],
        tool_choice=body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else None,
        stream=bool(body.get("stream")),
    )


def _check_sampling(body: dict[str, Any]) -> None:
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(f"{name}: Input should be a valid number")
        if not low <= value <= high:
            raise invalid(f"{name}: range: {low:g}..{high:g}")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise invalid("top_k: Input should be a non-negative integer")
