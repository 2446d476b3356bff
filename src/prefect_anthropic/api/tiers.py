"""Rate-limit presets per usage tier and limit class (the `limit_class` of the model table).

Sources: Anthropic, "Rate limits" (docs.claude.com/en/api/rate-limits), stored copies of late 2025 for
Tiers 1-4 and of 2026 for the Evaluation / Start / Build / Scale tiers, summarised in
shared/ANTHROPIC_API_FACTS.md and shared/ANTHROPIC_API_2026.md (checked 2026-11-26). Limits are per
organization and per limit class: Opus 4.5-4.8 share one bucket, Sonnet 4.x another, each generation-5
model line has its own, fast mode has its own.

Most 2026 buckets have no published numbers (NF). A tier's class without numbers is not guessed: it starts
at the most conservative known preset (Tier 1, 50 requests/min) and adopts the server's
`anthropic-ratelimit-*-limit` headers from the first response on, as `auto` does for every class.
Explicit limits override a preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from .limits import RateLimits

__all__ = ["TIERS", "TIER_NAMES", "TierLimits", "limits_for_tier"]

_L = RateLimits

#: tier -> limit class -> limits (requests/min, input tokens/min, output tokens/min), as far as known.
TIERS: dict[str, dict[str, RateLimits]] = {
    "1": {
        "opus-4": _L(50, 30_000, 8_000),
        "sonnet-4": _L(50, 30_000, 8_000),
        "haiku-4-5": _L(50, 50_000, 10_000),
        "haiku-3": _L(50, 50_000, 10_000),
    },
    "2": {
        "opus-4": _L(1_000, 450_000, 90_000),
        "sonnet-4": _L(1_000, 450_000, 90_000),
        "haiku-4-5": _L(1_000, 450_000, 90_000),
        "haiku-3": _L(1_000, 100_000, 20_000),
    },
    "3": {
        "opus-4": _L(2_000, 800_000, 160_000),
        "sonnet-4": _L(2_000, 800_000, 160_000),
        "haiku-4-5": _L(2_000, 1_000_000, 200_000),
        "haiku-3": _L(2_000, 200_000, 40_000),
    },
    "4": {
        "opus-4": _L(4_000, 2_000_000, 400_000),
        "sonnet-4": _L(4_000, 2_000_000, 400_000),
        "haiku-4-5": _L(4_000, 4_000_000, 800_000),
        "haiku-3": _L(4_000, 400_000, 80_000),
    },
    # Evaluation (new organisations, below Start): no numbers published for any class.
    "evaluation": {},
    "start": {
        **{cls: _L(1_000, 2_000_000, 400_000) for cls in ("opus-4", "sonnet-4", "haiku-4-5")},
        "fable-5": _L(1_000, 500_000, 100_000),
    },
    "build": {cls: _L(5_000, 5_000_000, 1_000_000) for cls in ("opus-4", "sonnet-4", "haiku-4-5")},
    "scale": {
        **{cls: _L(10_000, 10_000_000, 2_000_000) for cls in ("opus-4", "sonnet-4", "haiku-4-5")},
        "fable-5": _L(4_000, 4_000_000, 800_000),  # third-party report
    },
}
TIER_NAMES = (*TIERS, "auto")
#: Where a tier gives no numbers for a class: the most conservative preset known, until the server says.
_UNKNOWN_START = TIERS["1"]["sonnet-4"]


@dataclass(frozen=True)
class TierLimits:
    """The limits of every limit class under one tier (or explicit limits), and whether the server's
    `-limit` headers are adopted for a class (for `auto`, and for a class whose numbers are not known).

    Calling it with a class name gives that class's limits.
    """

    tier: str | None
    requests_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    output_tokens_per_minute: float | None = None
    share: float = 1.0

    @property
    def _preset_table(self) -> dict[str, RateLimits]:
        return TIERS.get(self.tier or "", {})

    def known(self, limit_class: str) -> bool:
        """Whether this tier publishes numbers for the class (fast-mode buckets: never)."""
        return self.tier not in (None, "auto") and limit_class in self._preset_table

    def adopts_server_limits(self, limit_class: str) -> bool:
        return self.tier is not None and not self.known(limit_class)

    def __call__(self, limit_class: str) -> RateLimits:
        if self.tier is None:
            preset = RateLimits()
        elif self.known(limit_class):
            preset = self._preset_table[limit_class]
        else:
            preset = _UNKNOWN_START
        chosen = (
            self.requests_per_minute or preset.requests_per_minute,
            self.input_tokens_per_minute or preset.input_tokens_per_minute,
            self.output_tokens_per_minute or preset.output_tokens_per_minute,
        )
        return RateLimits(*(None if limit is None else limit * self.share for limit in chosen))

    def describe(self, limit_class: str) -> str:
        if self.tier is None or self.known(limit_class):
            return "configured"
        return "not published for this tier: started at Tier 1's and adopting the server's headers"


def limits_for_tier(
    tier: str | None,
    *,
    requests_per_minute: float | None = None,
    input_tokens_per_minute: float | None = None,
    output_tokens_per_minute: float | None = None,
    share: float = 1.0,
) -> TierLimits:
    """Limits for each limit class: the tier's preset (for a class the tier gives no numbers for, Tier 1's
    as a start, then the server's), each explicit limit overriding the preset's, times `share` (this
    process's part of an account that several machines use at once)."""
    key = (tier or "").lower().removeprefix("tier").strip(" -_") or None
    if key is not None and key not in TIER_NAMES:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIER_NAMES)}")
    return TierLimits(key, requests_per_minute, input_tokens_per_minute, output_tokens_per_minute, share)
