"""The model table: ids, aliases, retirement, minimum cacheable length, prices and rate-limit class.

One table serves the client (cost, cache warnings, tier presets) and the emulator (404 for unknown or
retired ids, caching rules, prices in its ledger), so the two can never disagree.

Sources: Anthropic's models overview, pricing and prompt-caching pages, and the rate-limits page (stored
copies dated 2025 to Nov 2026, summarised in shared/ANTHROPIC_API_FACTS.md).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MODELS",
    "ModelInfo",
    "Prices",
    "UnknownModelError",
    "Usage",
    "cost_usd",
    "lookup_model",
    "resolve_model",
]


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens."""

    input: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    output: float


@dataclass(frozen=True)
class ModelInfo:
    id: str
    aliases: tuple[str, ...]
    #: Rate limits are shared per class: all Opus 4.x share one bucket, all Sonnet 4.x another.
    rate_limit_class: str
    min_cacheable_tokens: int
    max_output_tokens: int
    prices: Prices
    retired_on: dt.date | None = None
    #: Older models count cache reads toward input tokens/min; current ones do not.
    cache_reads_count_toward_itpm: bool = False

    def is_retired(self, today: dt.date | None = None) -> bool:
        return self.retired_on is not None and (today or dt.date.today()) >= self.retired_on


_OPUS_4 = Prices(15.0, 18.75, 30.0, 1.50, 75.0)
_OPUS_45 = Prices(5.0, 6.25, 10.0, 0.50, 25.0)
_SONNET = Prices(3.0, 3.75, 6.0, 0.30, 15.0)
_HAIKU_45 = Prices(1.0, 1.25, 2.0, 0.10, 5.0)
_HAIKU_35 = Prices(0.80, 1.0, 1.60, 0.08, 4.0)
_HAIKU_3 = Prices(0.25, 0.30, 0.50, 0.03, 1.25)

# Retirement dates as the official SDK (anthropic 2.12, DEPRECATED_MODELS) and the deprecations page give them.
MODELS: tuple[ModelInfo, ...] = (
    ModelInfo("claude-opus-4-7", (), "opus", 4096, 128_000, _OPUS_45),
    ModelInfo("claude-opus-4-6", (), "opus", 4096, 128_000, _OPUS_45),
    ModelInfo("claude-opus-4-5-20251101", ("claude-opus-4-5",), "opus", 4096, 64_000, _OPUS_45),
    ModelInfo("claude-opus-4-1-20250805", ("claude-opus-4-1",), "opus", 1024, 32_000, _OPUS_4),
    ModelInfo(
        "claude-opus-4-20250514", ("claude-opus-4-0",), "opus", 1024, 32_000, _OPUS_4, retired_on=dt.date(2026, 6, 15)
    ),
    ModelInfo("claude-sonnet-4-6", (), "sonnet", 2048, 64_000, _SONNET),
    ModelInfo(
        "claude-sonnet-4-5-20250929",
        ("claude-sonnet-4-5",),
        "sonnet",
        1024,
        64_000,
        _SONNET,
        retired_on=dt.date(2026, 11, 30),
    ),
    ModelInfo(
        "claude-sonnet-4-20250514",
        ("claude-sonnet-4-0",),
        "sonnet",
        1024,
        64_000,
        _SONNET,
        retired_on=dt.date(2026, 6, 15),
    ),
    ModelInfo(
        "claude-3-7-sonnet-20250219",
        ("claude-3-7-sonnet-latest",),
        "sonnet",
        1024,
        64_000,
        _SONNET,
        retired_on=dt.date(2026, 2, 19),
    ),
    ModelInfo("claude-haiku-4-5-20251001", ("claude-haiku-4-5",), "haiku", 4096, 64_000, _HAIKU_45),
    ModelInfo(
        "claude-3-5-haiku-20241022",
        ("claude-3-5-haiku-latest",),
        "haiku-3",
        2048,
        8_192,
        _HAIKU_35,
        retired_on=dt.date(2026, 2, 19),
        cache_reads_count_toward_itpm=True,
    ),
    ModelInfo(
        "claude-3-haiku-20240307",
        (),
        "haiku-3",
        2048,
        4_096,
        _HAIKU_3,
        cache_reads_count_toward_itpm=True,
    ),
    ModelInfo(
        "claude-3-5-sonnet-20240620",
        (),
        "sonnet-3",
        1024,
        8_192,
        _SONNET,
        retired_on=dt.date(2025, 10, 22),
        cache_reads_count_toward_itpm=True,
    ),
)

_BY_NAME: Mapping[str, ModelInfo] = {name: model for model in MODELS for name in (model.id, *model.aliases)}


class UnknownModelError(LookupError):
    pass


def lookup_model(name: str) -> ModelInfo | None:
    """The model an id or alias names, retired or not; None when the name is unknown."""
    return _BY_NAME.get(name)


def resolve_model(name: str) -> ModelInfo:
    model = lookup_model(name)
    if model is None:
        raise UnknownModelError(f"unknown model {name!r}")
    return model


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    #: Part of cache_creation_input_tokens written with the 1 hour TTL (priced higher than 5 minute writes).
    cache_creation_1h_input_tokens: int = 0

    @classmethod
    def from_api(cls, usage: Mapping[str, object] | None) -> Usage:
        usage = usage or {}
        creation = usage.get("cache_creation") or {}
        assert isinstance(creation, Mapping)
        return cls(
            input_tokens=int(usage.get("input_tokens") or 0),  # type: ignore[arg-type]
            output_tokens=int(usage.get("output_tokens") or 0),  # type: ignore[arg-type]
            cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens") or 0),  # type: ignore[arg-type]
            cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0),  # type: ignore[arg-type]
            cache_creation_1h_input_tokens=int(creation.get("ephemeral_1h_input_tokens") or 0),  # type: ignore[arg-type]
        )

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


def cost_usd(model: str | ModelInfo | None, usage: Usage, *, batch: bool = False) -> float:
    """What Anthropic charges for one response; 0.0 for a model missing from the table.

    Cache writes are priced by TTL (1.25x or 2x input), cache reads at 0.1x, and the batch discount of
    50% stacks with both.
    """
    info = model if isinstance(model, ModelInfo) else lookup_model(model or "")
    if info is None:
        return 0.0
    p = info.prices
    write_1h = usage.cache_creation_1h_input_tokens
    write_5m = usage.cache_creation_input_tokens - write_1h
    dollars = (
        usage.input_tokens * p.input
        + write_5m * p.cache_write_5m
        + write_1h * p.cache_write_1h
        + usage.cache_read_input_tokens * p.cache_read
        + usage.output_tokens * p.output
    ) / 1_000_000
    return dollars * 0.5 if batch else dollars
