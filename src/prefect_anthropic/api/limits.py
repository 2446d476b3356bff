"""The API's rate limits as a value: requests, input tokens and output tokens per minute of one model class."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RateLimits"]


@dataclass(frozen=True)
class RateLimits:
    """Per-minute limits of one model class; None means unlimited."""

    requests_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    output_tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "input_tokens_per_minute", "output_tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None (unlimited), got {value}")

    def as_dict(self) -> dict[str, float | None]:
        return {
            "requests_per_minute": self.requests_per_minute,
            "input_tokens_per_minute": self.input_tokens_per_minute,
            "output_tokens_per_minute": self.output_tokens_per_minute,
        }
