"""Numbers for people: 1,000 req/min, $12.34, 3 min 05 s (not 1000.0, 12.3400001, 185.2)."""

from __future__ import annotations

import math

__all__ = ["duration", "money", "number"]


def number(value: float | int | None, decimals: int = 0) -> str:
    """Thousands separated; floats rounded (an integral float loses its `.0`)."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    if decimals == 0 or float(value).is_integer():
        return f"{round(value):,}"
    return f"{value:,.{decimals}f}"


def money(value: float | None) -> str:
    """Dollars: cents above $1, four decimals below (a run of cheap requests is not $0.00)."""
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:,.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"
