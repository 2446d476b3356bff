"""The emulated API's behaviour, free of HTTP: what each request gets, and the ledger of what was billed."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..api.models import ModelInfo, Usage, UsageTotals, cost_usd, model_table
from ..api.request_rules import API_VERSIONS
from ..engine.limiter import TokenBucket
from .cache import CacheOutcome, PromptCache
from .config import EmulatorConfig
from .errors import APIError
from .prompt import ParsedRequest, parse_request
from .ratelimit import ClassBuckets
from .structured import generate_value, violate
from .tokenizer import count_tokens, truncate

MAX_REQUEST_BYTES = 32 * 1024 * 1024
# Emulator-only test hook: a user message containing `[[emulator:status=NNN]]` gets that error status.
_DIRECTIVE = re.compile(r"\[\[emulator:status=(\d{3})\]\]")
_FAULT_MESSAGES = {
    429: "Number of requests has exceeded your rate limit. Please try again later.",
    529: "Overloaded",
    500: "Internal server error",
    503: "Service Unavailable",
    504: "Request timed out before completion",
    409: "Conflict: the request conflicts with another in progress",
    402: "Your credit balance is too low to access the Anthropic API.",
    403: "Your API key does not have permission to use the specified resource.",
    413: "Request exceeds the maximum allowed number of bytes.",
    401: "invalid x-api-key",
    400: "Invalid request",
    404: "Not found",
}


_REFUSAL_CATEGORIES = ("cyber", "bio", "frontier_llm", "reasoning_extraction", "general_harms")
_DIAGNOSTICS_KEPT = 10_000


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Moments:
    """When something happened first and last (wall clock); None before it happened."""

    first: float | None = None
    last: float | None = None

    def mark(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now


@dataclass
class Ledger(UsageTotals):
    """What the emulated Anthropic has served and billed since start or the last reset (the tokens and dollars
    billed: `UsageTotals`)."""

    requests_total: int = 0
    responses_by_status: Counter[int] = field(default_factory=Counter)
    billed_requests: int = 0
    billed_batch_requests: int = 0
    #: When the first and the last request were billed (their replies produced).
    billed: Moments = field(default_factory=Moments)
    #: When the first and the last Messages request were admitted (past validation, faults, capacity and
    #: rate limits): from one to the other, the time a client spent sending.
    arrived: Moments = field(default_factory=Moments)
    duplicate_billed_requests: int = 0
    #: Refusals before any output: answered, not billed.
    refused_requests: int = 0
    #: Billed requests of models the table has no prices for (not in cost_usd).
    unpriced_requests: int = 0
    #: Requests answered as a stream of server-sent events (`stream: true`).
    streamed_requests: int = 0
    #: count_tokens requests answered (free, never billed).
    counted_requests: int = 0
    #: The most Messages requests of one key in flight at once.
    max_in_flight: int = 0
    #: With `request_log`: every billed Messages request by key and body digest, each time it was billed as
    #: (admitted at, billed at, cost in USD), wall clock. Off by default: a load test bills millions.
    keep_requests: bool = False
    billed_log: dict[str, dict[int, list[tuple[float, float, float]]]] = field(default_factory=dict)
    _billed_bodies: set[int] = field(default_factory=set)

    def admit(self) -> None:
        self.arrived.mark(time.time())

    # Alike in shape only to other long signatures (positional, then keyword-only arguments).
    def bill(
        self,
        body_digest: int,
        model: ModelInfo,
        usage: Usage,
        *,
        batch: bool,
        key: str | None = None,
        admitted_at: float | None = None,
    ) -> None:
        now = time.time()
        self.billed.mark(now)
        self.billed_requests += 1
        self.billed_batch_requests += batch
        cost = cost_usd(model, usage, batch=batch)
        self.add_usage(usage, cost)
        if cost is None:
            self.unpriced_requests += 1
        if self.keep_requests and key is not None:
            times = self.billed_log.setdefault(key, {}).setdefault(body_digest, [])
            times.append((now if admitted_at is None else admitted_at, now, cost or 0.0))
        if body_digest in self._billed_bodies:
            self.duplicate_billed_requests += 1
        else:
            self._billed_bodies.add(body_digest)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "responses_by_status": {str(k): v for k, v in sorted(self.responses_by_status.items())},
            "billed_requests": self.billed_requests,
            "billed_batch_requests": self.billed_batch_requests,
            "duplicate_billed_requests": self.duplicate_billed_requests,
            "refused_requests": self.refused_requests,
            "unpriced_requests": self.unpriced_requests,
            "streamed_requests": self.streamed_requests,
            "counted_requests": self.counted_requests,
            "max_in_flight": self.max_in_flight,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "first_request_at": self.billed.first,
            "last_request_at": self.billed.last,
            "first_arrival_at": self.arrived.first,
            "last_arrival_at": self.arrived.last,
        }

    def requests_of(self, key: str) -> list[dict[str, Any]]:
        """The billed requests of one key (with `request_log`): each billing as [admitted at, billed at, cost]."""
        return [
            {"digest": f"{digest:016x}", "billed": [list(times) for times in billings]}
            for digest, billings in self.billed_log.get(key, {}).items()
        ]


def body_digest(raw: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Caller:
    """Who sent a request and under which API version and betas."""

    key: str
    api_version: str
    beta: str = ""


@dataclass
class Completion:
    """A message the emulator produced, before it is sent."""

    message: dict[str, Any]
    usage: Usage
    headers: dict[str, str]
    #: Seconds from admission to the first token, and from the first token to the last.
    first_token_s: float
    output_s: float
    drop_connection: bool = False
    #: Answer as server-sent events; `stream_error` interrupts the stream with an `error` event.
    stream: bool = False
    stream_error: bool = False
    on_finish: Callable[[], None] | None = field(default=None, repr=False)

    def finish(self) -> None:
        """Account for the reply once its last token is produced (or its stream is cut): output tokens,
        billing, its place in flight. Only the first call counts."""
        on_finish, self.on_finish = self.on_finish, None
        if on_finish is not None:
            on_finish()


class EmulatedAnthropic:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        #: The emulated API's own model table: ours (with the environment's models file), plus --models-file.
        table = model_table()
        self.models = table.extended(config.models_file) if config.models_file else table
        self.rng = random.Random(config.seed)
        self.cache = PromptCache(config.unknown_min_cacheable_tokens)
        self.ledger = Ledger(keep_requests=config.request_log)
        self._buckets: dict[tuple[str, str], ClassBuckets] = {}
        #: Prompt part digests of recent replies, by message id, for `diagnostics.previous_message_id`.
        self._recent_prompts: dict[str, tuple[str, dict[str, bytes]]] = {}
        self._count_buckets: dict[str, TokenBucket] = {}
        self._in_flight: Counter[str] = Counter()
        #: Seconds added to the clock: tests jump past a cache TTL or a minute of refill without waiting.
        self.clock_offset = 0.0

    def in_flight(self, key: str) -> int:
        """Messages requests of `key` admitted and not yet produced to their last token."""
        return self._in_flight[key]

    def now(self) -> float:
        return time.monotonic() + self.clock_offset

    def wall_now(self) -> float:
        return time.time() + self.clock_offset

    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.cache.clear()
        self.ledger = Ledger(keep_requests=self.config.request_log)
        self._buckets.clear()
        self._recent_prompts.clear()
        self._count_buckets.clear()
        self.clock_offset = 0.0

    # -- request checks shared by every endpoint -------------------------------------------------------

    def authenticate(self, headers: Any) -> Caller:
        """The key (x-api-key, else `Authorization: Bearer`, as the 2.x SDKs send it) and API version."""
        key = headers.get("x-api-key")
        if key is None:
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                key = auth[7:].strip()
        if not key:
            raise APIError(401, "x-api-key header is required")
        if self.config.api_key is not None and key != self.config.api_key:
            raise APIError(401, "invalid x-api-key")
        version = headers.get("anthropic-version")
        if not version:
            raise APIError(400, "anthropic-version: header is required")
        if version not in API_VERSIONS:
            raise APIError(400, f"anthropic-version: {version!r} is not a valid version; use one of {API_VERSIONS}")
        return Caller(key, version, headers.get("anthropic-beta", ""))

    @staticmethod
    def parse_json(raw: bytes) -> Any:
        if len(raw) > MAX_REQUEST_BYTES:
            raise APIError(413, _FAULT_MESSAGES[413])
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise APIError(400, "There was an error parsing the body of your request as JSON") from None

    # -- messages -----------------------------------------------------------------------------------------

    def _buckets_for(self, key: str, parsed: ParsedRequest, now: float) -> ClassBuckets:
        fast = ":fast" if parsed.speed == "fast" else ""
        scope = (key, parsed.model.rate_limit_class + fast)
        buckets = self._buckets.get(scope)
        if buckets is None:
            buckets = self._buckets[scope] = ClassBuckets(self.config, now)
        return buckets

    def _time_to_first_token(self) -> float:
        """--latency-ms + --ttft-ms with --latency-jitter-ms of uniform jitter, in seconds."""
        mean = (self.config.latency_ms + self.config.ttft_ms) / 1000.0
        jitter = self.config.latency_jitter_ms / 1000.0
        if jitter:
            return max(0.0, mean + self.rng.uniform(-jitter, jitter))
        return mean

    def _output_time(self, output_tokens: int) -> float:
        speed = self.config.output_tokens_per_second
        return output_tokens / speed if speed > 0 else 0.0

    def _injected_fault(self, parsed: ParsedRequest, key: str, now: float) -> APIError | None:
        match = _DIRECTIVE.search(parsed.last_user_text)
        if match:
            status = int(match.group(1))
            headers = {"retry-after": _retry_after_text(self.config.fault_retry_after_s)} if status == 429 else None
            return APIError(status, _FAULT_MESSAGES.get(status, "Injected error"), headers=headers)
        config = self.config
        if config.billing_error:
            return APIError(402, _FAULT_MESSAGES[402])
        if config.permission_error:
            return APIError(403, _FAULT_MESSAGES[403])
        if config.ramp_limit_rate and self.rng.random() < config.ramp_limit_rate:
            return APIError(
                429,
                "Your organization's usage is increasing too quickly. Please slow down and try again shortly.",
                details={"error_code": "ramp_limit_exceeded"},
                headers={"retry-after": _retry_after_text(config.fault_retry_after_s)},
            )
        if config.spend_limit_usd and self.ledger.cost_usd >= config.spend_limit_usd:
            return APIError(
                429,
                "You have reached your specified workspace API usage limits. You will regain access on "
                "the first day of next month.",
                details={"error_code": "enforced_spend_limit_reached"},
            )
        draw = self.rng.random()
        for status, rate in (
            (429, config.error_rate_429),
            (529, config.error_rate_529),
            (500, config.error_rate_500),
            (504, config.error_rate_504),
            (409, config.error_rate_409),
        ):
            if draw < rate:
                headers = {"retry-after": _retry_after_text(config.fault_retry_after_s)} if status == 429 else None
                return APIError(status, _FAULT_MESSAGES[status], headers=headers)
            draw -= rate
        return None

    async def create_message(self, caller: Caller, raw: bytes, body: Any) -> Completion:
        """Validate, fault, rate-limit, cache, wait for the reply and produce it; raise APIError where the
        API answers with an error. Above --capacity requests in flight, --capacity-status at once.

        A non-streamed reply returns complete (after the time to first token and the output time) and
        accounted for. A streamed one returns at its first token, still in flight: its sender paces the
        content over `output_s` and calls `finish()` once the last token is produced."""
        key = caller.key
        capacity = self.config.capacity
        if capacity and self._in_flight[key] >= capacity:
            status = self.config.capacity_status
            raise APIError(status, _FAULT_MESSAGES[status])
        self._in_flight[key] += 1
        self.ledger.max_in_flight = max(self.ledger.max_in_flight, self._in_flight[key])
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                self._in_flight[key] -= 1

        try:
            return await self._create_message(caller, raw, body, leave)
        except BaseException:
            leave()
            raise

    async def _create_message(self, caller: Caller, raw: bytes, body: Any, leave: Callable[[], None]) -> Completion:
        key = caller.key
        parsed = parse_request(body, api_version=caller.api_version, beta=caller.beta, models=self.models)
        now = self.now()
        fault = self._injected_fault(parsed, key, now)
        if fault is not None:
            raise fault
        model = parsed.model
        buckets = self._buckets_for(key, parsed, now)
        read_if_admitted = self.cache.peek_read_tokens(key, parsed, now)
        charged_input = parsed.total_input_tokens - (0 if model.cache_reads_count_toward_itpm else read_if_admitted)
        output_admission = parsed.max_tokens if self.config.reserve_max_tokens else 1
        wait, which = buckets.admission_wait(charged_input, output_admission, now)
        if wait > 0:
            headers = buckets.headers(now)
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            raise APIError(
                429,
                f"This request would exceed your organization's rate limit of {which} per minute "
                f"(model: {model.id}). For details, refer to: https://docs.claude.com/en/api/rate-limits.",
                headers=headers,
            )
        self.ledger.admit()
        admitted_at = time.time()
        stalled = self.config.stall_rate and self.rng.random() < self.config.stall_rate
        first_token_s = self.config.stall_s if stalled else self._time_to_first_token()
        drop = bool(self.config.drop_rate) and self.rng.random() < self.config.drop_rate
        for bucket, cost in ((buckets.requests, 1.0), (buckets.input, charged_input)):
            if bucket is not None:
                bucket.take(cost, now)
        if buckets.output is not None and self.config.reserve_max_tokens:
            buckets.output.take(parsed.max_tokens, now)

        refused = bool(self.config.refusal_rate) and self.rng.random() < self.config.refusal_rate
        message, usage = self.generate(key, parsed, now, ready_at=now + first_token_s, raw=raw, refused=refused)
        error_rate = self.config.stream_error_rate
        stream_error = parsed.stream and bool(error_rate) and self.rng.random() < error_rate

        def finish() -> None:
            done = self.now()
            if buckets.output is not None:
                if self.config.reserve_max_tokens:
                    buckets.output.give_back(parsed.max_tokens - usage.output_tokens, done)
                else:
                    buckets.output.take(usage.output_tokens, done)
            if refused:
                self.ledger.refused_requests += 1  # a refusal before any output is not billed
            else:
                self.ledger.bill(body_digest(raw), model, usage, batch=False, key=key, admitted_at=admitted_at)
            self.ledger.streamed_requests += parsed.stream
            leave()

        completion = Completion(
            message,
            usage,
            {},
            first_token_s,
            self._output_time(usage.output_tokens),
            drop_connection=drop,
            stream=parsed.stream,
            stream_error=stream_error,
            on_finish=finish,
        )
        # One sleep per reply: a stream is paced from its first token on by its sender.
        wait = first_token_s if parsed.stream else first_token_s + completion.output_s
        if wait > 0:
            await asyncio.sleep(wait)
        if not parsed.stream:
            completion.finish()
        completion.headers = buckets.headers(self.now())
        return completion

    def _reply_text(self, parsed: ParsedRequest, raw: bytes) -> str:
        """`echo: ` and the last user message; with a JSON schema, JSON matching it, drawn from a generator
        seeded by --seed and the request, so a seed always gives the same reply to the same request.
        The structured-output faults break that promise on purpose (--schema-violation-rate,
        --invalid-json-rate)."""
        if parsed.output_schema is None:
            return "echo: " + parsed.last_user_text
        rng = random.Random(f"{self.config.seed}:{body_digest(raw)}")
        value = generate_value(parsed.output_schema, rng)
        config = self.config
        if config.invalid_json_rate and self.rng.random() < config.invalid_json_rate:
            text = orjson.dumps(value).decode()
            return text[: max(1, len(text) // 2)]
        if config.schema_violation_rate and self.rng.random() < config.schema_violation_rate:
            value = violate(parsed.output_schema, value)
        return orjson.dumps(value).decode()

    def _tool_call(self, parsed: ParsedRequest, raw: bytes) -> dict[str, Any] | None:
        """The tool the reply calls: the forced one, any one when `any` is forced, or under `auto` a tool
        whose name the last user message mentions. Its input follows the tool's input_schema."""
        if not parsed.tools:
            return None
        choice = parsed.tool_choice or {"type": "auto"}
        by_name = {tool.get("name"): tool for tool in parsed.tools}
        tool = None
        if choice.get("type") == "tool":
            tool = by_name.get(choice.get("name"))
        elif choice.get("type") == "any":
            tool = parsed.tools[0]
        elif choice.get("type") == "auto":
            tool = next((t for t in parsed.tools if str(t.get("name")) in parsed.last_user_text), None)
        if tool is None:
            return None
        rng = random.Random(f"{self.config.seed}:tool:{body_digest(raw)}")
        schema = tool.get("input_schema") or {"type": "object", "properties": {}}
        tool_input = generate_value(schema, rng) if schema.get("properties") else {}
        return {"type": "tool_use", "id": new_id("toolu"), "name": tool.get("name"), "input": tool_input}

    def generate(
        self,
        scope: str,
        parsed: ParsedRequest,
        now: float,
        *,
        ready_at: float,
        raw: bytes = b"",
        refused: bool = False,
        service_tier: str = "standard",
    ) -> tuple[dict, Usage]:
        """The deterministic reply (thinking, then a tool call or text), cut by max_tokens and stop
        sequences, with its usage."""
        outcome = self.cache.lookup_and_write(scope, parsed, now, ready_at)
        stop_reason, stop_sequence = "end_turn", None
        stop_details = None
        content: list[dict[str, Any]] = []
        output_tokens = thinking_tokens = 0
        if refused:
            stop_reason = "refusal"
            category = _REFUSAL_CATEGORIES[body_digest(raw) % len(_REFUSAL_CATEGORIES)]
            stop_details = {"type": "refusal", "category": category, "explanation": "Emulated refusal."}
        else:
            budget = parsed.max_tokens
            if parsed.thinking and budget > 0:
                thought, thinking_tokens, _ = truncate(f"The user asks: {parsed.last_user_text[:300]}", budget)
                content.append({"type": "thinking", "thinking": thought, "signature": new_id("sig")})
                budget -= thinking_tokens
            tool_call = self._tool_call(parsed, raw) if budget > 0 else None
            if tool_call is not None:
                content.append(tool_call)
                budget -= count_tokens(orjson.dumps(tool_call["input"]).decode())
                stop_reason = "tool_use"
                text_tokens = 0
            else:
                reply = self._reply_text(parsed, raw)
                for sequence in parsed.stop_sequences:
                    at = reply.find(sequence)
                    if sequence and at >= 0:
                        reply, stop_reason, stop_sequence = reply[:at], "stop_sequence", sequence
                        break
                text, text_tokens, cut = truncate(reply, max(0, budget))
                if cut or budget <= 0:
                    stop_reason, stop_sequence = "max_tokens", None
                if text:
                    content.append({"type": "text", "text": text})
            output_tokens = min(parsed.max_tokens, parsed.max_tokens - budget + text_tokens)
        usage = Usage(
            input_tokens=parsed.total_input_tokens - outcome.read_tokens - outcome.creation_tokens,
            output_tokens=output_tokens,
            cache_creation_input_tokens=outcome.creation_tokens,
            cache_read_input_tokens=outcome.read_tokens,
            cache_creation_1h_input_tokens=outcome.creation_1h_tokens,
            thinking_tokens=thinking_tokens,
            service_tier=service_tier,
            speed=parsed.speed,
            inference_geo=parsed.inference_geo,
        )
        message_id = new_id("msg")
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": parsed.model.id,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "stop_details": stop_details,
            "usage": {
                "input_tokens": usage.input_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": usage.cache_creation_input_tokens
                    - usage.cache_creation_1h_input_tokens,
                    "ephemeral_1h_input_tokens": usage.cache_creation_1h_input_tokens,
                },
                "output_tokens": usage.output_tokens,
                "output_tokens_details": {"thinking_tokens": usage.thinking_tokens},
                "service_tier": service_tier,
                "speed": parsed.speed,
                "inference_geo": parsed.inference_geo,
            },
        }
        if parsed.previous_message_id is not None:
            message["diagnostics"] = self._diagnostics(scope, parsed, outcome)
        self._remember_prompt(message_id, scope, parsed)
        return message, usage

    def _remember_prompt(self, message_id: str, scope: str, parsed: ParsedRequest) -> None:
        if len(self._recent_prompts) >= _DIAGNOSTICS_KEPT:
            self._recent_prompts.pop(next(iter(self._recent_prompts)))
        self._recent_prompts[message_id] = (scope, parsed.part_digests)

    def _diagnostics(self, scope: str, parsed: ParsedRequest, outcome: CacheOutcome) -> dict[str, Any] | None:
        """Why the cache could not reuse the prefix of the request named by `previous_message_id`."""
        previous = self._recent_prompts.get(parsed.previous_message_id or "")
        if previous is None or previous[0] != scope:
            return {"cache_miss_reason": {"type": "previous_message_not_found"}}
        before, now = previous[1], parsed.part_digests
        missed = parsed.total_input_tokens - outcome.read_tokens
        for part, kind in (("model", "model_changed"), ("tools", "tools_changed"), ("system", "system_changed")):
            if before.get(part) != now.get(part):
                return {"cache_miss_reason": {"type": kind, "cache_missed_input_tokens": missed}}
        shared = [name for name in before if name.startswith("messages.") and name in now]
        if any(before[name] != now[name] for name in shared) or len(shared) < sum(
            name.startswith("messages.") for name in before
        ):
            return {"cache_miss_reason": {"type": "messages_changed", "cache_missed_input_tokens": missed}}
        return None

    def count_tokens(self, caller: Caller, body: Any) -> tuple[dict[str, int], dict[str, str]]:
        """The count and the rate-limit headers of count_tokens' own limit (requests per minute, per key)."""
        parsed = parse_request(
            body, count_tokens_only=True, api_version=caller.api_version, beta=caller.beta, models=self.models
        )
        headers: dict[str, str] = {}
        rpm = self.config.count_tokens_per_minute
        if rpm > 0:
            now = self.now()
            bucket = self._count_buckets.get(caller.key)
            if bucket is None:
                capacity = max(1.0, rpm * self.config.burst_seconds / 60.0)
                bucket = self._count_buckets[caller.key] = TokenBucket(rpm, capacity, now)
            wait = bucket.wait_time(1.0, now)
            headers = {
                "anthropic-ratelimit-requests-limit": str(int(rpm)),
                "anthropic-ratelimit-requests-remaining": str(max(0, int(bucket.level))),
            }
            if wait > 0:
                raise APIError(
                    429,
                    f"This request would exceed your organization's rate limit of {int(rpm)} count_tokens requests "
                    "per minute.",
                    headers={**headers, "retry-after": str(max(1, math.ceil(wait)))},
                )
            bucket.take(1.0, now)
        self.ledger.counted_requests += 1
        return {"input_tokens": parsed.total_input_tokens}, headers


def _retry_after_text(seconds: float) -> str:
    return str(max(0, math.ceil(seconds)))
