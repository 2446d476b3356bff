"""Rate-limit presets per usage tier and model class.

Source: Anthropic, "Rate limits" (docs.claude.com/en/api/rate-limits), stored copies of late 2025 for
Tiers 1-4 and of 2026 for the Start / Build / Scale tiers (summarised in shared/ANTHROPIC_API_FACTS.md,
checked 2026-11-24). Limits are per organization and per model class: every Opus 4.x model shares one
bucket, every Sonnet 4.x another. Explicit limits override a preset; `auto` starts conservatively (Tier 1)
and adopts whatever the server reports in its `anthropic-ratelimit-*` headers.
"""

from __future__ import annotations

from collections.abc import Callable

from .engine.limiter import RateLimits

__all__ = ["TIERS", "TIER_NAMES", "limits_for_tier"]

_L = RateLimits

#: tier -> model class -> limits (requests/min, input tokens/min, output tokens/min).
TIERS: dict[str, dict[str, RateLimits]] = {
    "1": {
        "opus": _L(50, 30_000, 8_000),
        "sonnet": _L(50, 30_000, 8_000),
        "haiku": _L(50, 50_000, 10_000),
        "haiku-3": _L(50, 50_000, 10_000),
    },
    "2": {
        "opus": _L(1_000, 450_000, 90_000),
        "sonnet": _L(1_000, 450_000, 90_000),
        "haiku": _L(1_000, 450_000, 90_000),
        "haiku-3": _L(1_000, 100_000, 20_000),
    },
    "3": {
        "opus": _L(2_000, 800_000, 160_000),
        "sonnet": _L(2_000, 800_000, 160_000),
        "haiku": _L(2_000, 1_000_000, 200_000),
        "haiku-3": _L(2_000, 200_000, 40_000),
    },
    "4": {
        "opus": _L(4_000, 2_000_000, 400_000),
        "sonnet": _L(4_000, 2_000_000, 400_000),
        "haiku": _L(4_000, 4_000_000, 800_000),
        "haiku-3": _L(4_000, 400_000, 80_000),
    },
    # The 2026 tiers apply to Opus 4.x, Sonnet 4.x and Haiku 4.5 alike.
    "start": {cls: _L(1_000, 2_000_000, 400_000) for cls in ("opus", "sonnet", "haiku")},
    "build": {cls: _L(5_000, 5_000_000, 1_000_000) for cls in ("opus", "sonnet", "haiku")},
    "scale": {cls: _L(10_000, 10_000_000, 2_000_000) for cls in ("opus", "sonnet", "haiku")},
}
TIER_NAMES = (*TIERS, "auto")


def limits_for_tier(
    tier: str | None,
    *,
    requests_per_minute: float | None = None,
    input_tokens_per_minute: float | None = None,
    output_tokens_per_minute: float | None = None,
    share: float = 1.0,
) -> Callable[[str], RateLimits]:
    """Limits for each model class: the tier's preset (Tier 1 for `auto` and for a class the tier does
    not list), with each explicit limit overriding the preset's, times `share` (this process's part of an
    account that several machines use at once)."""
    key = (tier or "").lower().removeprefix("tier").strip(" -_") or None
    if key is not None and key not in TIERS and key != "auto":
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIER_NAMES)}")
    preset_table = TIERS.get("1" if key == "auto" else key or "", {})

    def for_class(model_class: str) -> RateLimits:
        preset = preset_table.get(model_class) or (TIERS["1"]["sonnet"] if key else RateLimits())
        chosen = (
            requests_per_minute or preset.requests_per_minute,
            input_tokens_per_minute or preset.input_tokens_per_minute,
            output_tokens_per_minute or preset.output_tokens_per_minute,
        )
        return RateLimits(*(None if limit is None else limit * share for limit in chosen))

    return for_class
