"""What goes into the engine (RequestItem) and what comes out (ResultRecord)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from ..api.models import ModelTable, Usage, UsageTotals, cost_usd, model_table
from ..api.schema import OutputSchema, parse_reply

__all__ = ["AnswerTotals", "RequestItem", "ResultRecord", "message_columns", "record_from_message", "validate_record"]


@dataclass
class RequestItem:
    """One input line: its number, an id, passthrough metadata (never sent), and the Messages API body.

    `invalid` holds why the line cannot be sent (bad JSON, missing fields...): it becomes an error row
    without any API call.
    """

    line: int
    custom_id: str
    body: dict[str, Any]
    metadata: Any = None
    invalid: str | None = None
    #: Digest of the input line: a restarted run skips a line only if it is the same request.
    digest: str = ""

    @property
    def model(self) -> str:
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else ""


@dataclass
class ResultRecord:
    line: int
    custom_id: str
    status: Literal["succeeded", "errored"]
    model: str | None = None
    text: str | None = None
    stop_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    #: None when the model table cannot price the response (see models.unpriced_reason).
    cost_usd: float | None = 0.0
    attempts: int = 0
    latency_s: float = 0.0
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    request_id: str | None = None
    estimated_input_tokens: int | None = None
    thinking_tokens: int = 0
    service_tier: str | None = None
    #: How the request was answered: "realtime" (the Messages API) or "batch" (Message Batches, half price).
    mode: str = "realtime"
    speed: str | None = None
    inference_geo: str | None = None
    refusal_category: str | None = None
    #: The reply parsed and valid against the dataset's schema (structured outputs), else None.
    parsed: Any = None
    #: Why the reply does not match the schema (None when it does or when there is no schema).
    validation_error: str | None = None
    request_digest: str = ""
    metadata: Any = None
    response: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    #: Every error met on the way, successful or not (the original script's output lists them).
    errors: list[str] = field(default_factory=list)

    @classmethod
    def errored(cls, item: RequestItem, error_type: str, message: str | None, **fields: Any) -> ResultRecord:
        """The error row of a request."""
        return cls(
            line=item.line,
            custom_id=item.custom_id,
            status="errored",
            request_digest=item.digest,
            model=item.model or None,
            error_type=error_type,
            error_message=message,
            metadata=item.metadata,
            **fields,
        )

    @classmethod
    def for_invalid_line(cls, item: RequestItem) -> ResultRecord:
        """The error row of an input line that cannot be sent (never sent, so no attempt)."""
        return cls.errored(item, "invalid_request", item.invalid, errors=[item.invalid or ""])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def usage(self) -> Usage:
        """The record's token counts."""
        return Usage.of_counts(vars(self))


@dataclass
class AnswerTotals(UsageTotals):
    """The tokens and dollars of answered requests, and how the input estimated before sending compares with
    what the answers counted: a run's `Progress`, a dataset's `DatasetTotals`."""

    estimated_input_tokens: int = 0
    #: The input (uncached, cache writes and reads) of the answers whose input was estimated.
    real_input_tokens_of_estimated: int = 0

    def add_answer(self, usage: Usage, cost: float | None, estimated_input_tokens: int | None) -> None:
        self.add_usage(usage, cost)
        if estimated_input_tokens:
            self.estimated_input_tokens += estimated_input_tokens
            self.real_input_tokens_of_estimated += usage.total_input_tokens


def _text_of(message: dict[str, Any]) -> str:
    return "".join(
        block.get("text", "")
        for block in message.get("content") or ()
        if isinstance(block, dict) and block.get("type") == "text"
    )


def record_from_message(
    item: RequestItem, message: dict[str, Any], *, batch: bool = False, models: ModelTable | None = None, **fields: Any
) -> ResultRecord:
    """The row of an answered request, from the API's Message (real time or a batch result).

    A refusal is an answer (priced, free before any output, never retried) but not a row of the dataset:
    it is errored with `error_type` refusal and the category from `stop_details`.
    """
    usage = Usage.from_api(message.get("usage"))
    model = str(message.get("model") or item.model)
    stop_reason = message.get("stop_reason")
    refused = stop_reason == "refusal"
    stop_details = message.get("stop_details")
    category = stop_details.get("category") if refused and isinstance(stop_details, dict) else None
    return ResultRecord(
        line=item.line,
        custom_id=item.custom_id,
        status="errored" if refused else "succeeded",
        error_type="refusal" if refused else None,
        error_message=f"line {item.line}: the model refused ({category or 'no category'})" if refused else None,
        refusal_category=category,
        request_digest=item.digest,
        model=model,
        text=_text_of(message),
        stop_reason=stop_reason,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        thinking_tokens=usage.thinking_tokens,
        service_tier=usage.service_tier,
        speed=usage.speed,
        inference_geo=usage.inference_geo,
        cost_usd=cost_usd(
            (models or model_table()).lookup(model) or model,
            usage,
            batch=batch,
            refused_before_output=refused and not usage.output_tokens,
        ),
        metadata=item.metadata,
        response=message,
        mode="batch" if batch else "realtime",
        **fields,
    )


def message_columns(message: dict[str, Any] | None) -> dict[str, Any]:
    """The reply's content as row columns: `thinking` (text), `tool_calls` (JSON text: a list of
    {name, input}), `content` (JSON text: every content block)."""
    if not message:
        return {"thinking": None, "tool_calls": None, "content": None}
    blocks = [block for block in message.get("content") or () if isinstance(block, dict)]
    thoughts = [str(block.get("thinking", "")) for block in blocks if block.get("type") == "thinking"]
    calls = [{"name": b.get("name"), "input": b.get("input")} for b in blocks if b.get("type") == "tool_use"]
    return {
        "thinking": "\n".join(thoughts) if thoughts else None,
        "tool_calls": orjson.dumps(calls).decode() if calls else None,
        "content": orjson.dumps(blocks).decode(),
    }


def validate_record(record: ResultRecord, schema: OutputSchema, *, replies: int = 1, last_try: bool = True) -> bool:
    """Check a succeeded row's reply against the full schema: set `parsed`, or `validation_error`; on the
    last try an invalid reply makes the row errored (`validation_error`, the reply kept in `text`)."""
    if not record.succeeded:
        return True
    record.parsed, record.validation_error = parse_reply(record.text, schema)
    if record.validation_error is None:
        return True
    if last_try:
        record.status, record.error_type = "errored", "validation_error"
        record.error_message = (
            f"line {record.line}: the reply does not match the schema after {replies} "
            f"{'reply' if replies == 1 else 'replies'}: {record.validation_error}"
        )
    return False
