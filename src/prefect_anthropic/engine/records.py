"""What goes into the engine (RequestItem) and what comes out (ResultRecord)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["RequestItem", "ResultRecord"]


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
    cost_usd: float = 0.0
    attempts: int = 0
    latency_s: float = 0.0
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    request_id: str | None = None
    estimated_input_tokens: int | None = None
    request_digest: str = ""
    metadata: Any = None
    response: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    #: Every error met on the way, successful or not (the original script's output lists them).
    errors: list[str] = field(default_factory=list)

    @classmethod
    def for_invalid_line(cls, item: RequestItem) -> ResultRecord:
        """The error row of an input line that cannot be sent (never sent, so no attempt)."""
        return cls(
            line=item.line,
            custom_id=item.custom_id,
            status="errored",
            request_digest=item.digest,
            model=item.model or None,
            error_type="invalid_request",
            error_message=item.invalid,
            errors=[item.invalid or ""],
            metadata=item.metadata,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"
