"""`estimate`: what a request file will cost and take, without a single API call."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Any

from .corrections import load_token_corrections
from .engine.caching import cached_prefix
from .engine.client import rate_limit_class
from .engine.estimator import InputTokenEstimator
from .inputs import iter_requests
from .models import Usage, cost_usd, lookup_model
from .settings import ClientSettings
from .tiers import limits_for_tier

__all__ = ["estimate_file", "format_estimate"]


def estimate_file(path: str | os.PathLike[str], settings: ClientSettings | None = None) -> dict[str, Any]:
    settings = settings or ClientSettings()
    corrections = load_token_corrections()
    estimator = InputTokenEstimator(initial_ratios=corrections)
    per_model: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    invalid: list[dict[str, Any]] = []
    prefixes_seen: set[str] = set()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"requests file not found: {path}")
    for item in iter_requests(path):
        if item.invalid is not None:
            invalid.append({"line": item.line, "error": item.invalid})
            continue
        model = item.model
        info = lookup_model(model)
        if info is None or info.is_retired():
            invalid.append({"line": item.line, "error": f"line {item.line}: unknown or retired model {model!r}"})
            continue
        stats = per_model[info.id]
        stats["requests"] += 1
        total = estimator.estimate(item.body)
        stats["input_tokens"] += total
        stats["max_output_tokens"] += item.body["max_tokens"]
        prefix = cached_prefix(item.body)
        if prefix is not None:
            cached = min(total, int(estimator.count_blocks_cl100k(prefix.blocks) * estimator.ratio(model)))
            if cached >= info.min_cacheable_tokens:
                # One write per distinct prefix (with warm-up), reads for every other request sharing it.
                kind = "cache_read_tokens" if prefix.key in prefixes_seen else "cache_write_tokens"
                prefixes_seen.add(prefix.key)
                stats[kind] += cached
                stats["uncached_input_tokens"] -= cached
        stats["uncached_input_tokens"] += total
    limits_for = limits_for_tier(
        settings.tier,
        requests_per_minute=settings.requests_per_minute,
        input_tokens_per_minute=settings.input_tokens_per_minute,
        output_tokens_per_minute=settings.output_tokens_per_minute,
    )
    models = {}
    by_class: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for model, stats in sorted(per_model.items()):
        input_only = Usage(
            input_tokens=int(stats["uncached_input_tokens"]),
            cache_creation_input_tokens=int(stats["cache_write_tokens"]),
            cache_read_input_tokens=int(stats["cache_read_tokens"]),
        )
        worst = dataclasses.replace(input_only, output_tokens=int(stats["max_output_tokens"]))
        models[model] = {
            "requests": int(stats["requests"]),
            "estimated_input_tokens": int(stats["input_tokens"]),
            "worst_case_output_tokens": int(stats["max_output_tokens"]),
            "estimated_cache_write_tokens": int(stats["cache_write_tokens"]),
            "estimated_cache_read_tokens": int(stats["cache_read_tokens"]),
            "cost_usd_min": round(cost_usd(model, input_only), 6),
            "cost_usd_max": round(cost_usd(model, worst), 6),
            "batch_cost_usd_min": round(cost_usd(model, input_only, batch=True), 6),
            "batch_cost_usd_max": round(cost_usd(model, worst, batch=True), 6),
        }
        totals = by_class[rate_limit_class(model)]
        totals["requests"] += stats["requests"]
        # Cache reads do not count toward input tokens/min.
        totals["input_tokens"] += stats["uncached_input_tokens"] + stats["cache_write_tokens"]
        totals["max_output_tokens"] += stats["max_output_tokens"]
    shortest = worst_case = 0.0
    for cls, totals in by_class.items():
        limits = limits_for(cls)
        minutes = [
            totals["requests"] / limits.requests_per_minute if limits.requests_per_minute else 0.0,
            totals["input_tokens"] / limits.input_tokens_per_minute if limits.input_tokens_per_minute else 0.0,
        ]
        output_minutes = (
            totals["max_output_tokens"] / limits.output_tokens_per_minute if limits.output_tokens_per_minute else 0.0
        )
        # Model classes have separate limits and run side by side: the slowest class decides.
        shortest = max(shortest, 60.0 * max(minutes))
        worst_case = max(worst_case, 60.0 * max(*minutes, output_minutes))
    return {
        "requests": sum(m["requests"] for m in models.values()),
        "invalid_lines": invalid,
        "estimated_input_tokens": sum(m["estimated_input_tokens"] for m in models.values()),
        "worst_case_output_tokens": sum(m["worst_case_output_tokens"] for m in models.values()),
        "cost_usd_min": round(sum(m["cost_usd_min"] for m in models.values()), 6),
        "cost_usd_max": round(sum(m["cost_usd_max"] for m in models.values()), 6),
        "models": models,
        "limits": {cls: limits_for(cls).as_dict() for cls in by_class},
        "token_corrections_used": {model: corrections[model] for model in models if model in corrections},
        "shortest_duration_s": round(shortest, 1),
        "duration_if_every_reply_hits_max_tokens_s": round(worst_case, 1),
    }


def format_estimate(result: dict[str, Any]) -> str:
    lines = [
        f"requests:                 {result['requests']:,}",
        f"estimated input tokens:   {result['estimated_input_tokens']:,}",
        f"worst-case output tokens: {result['worst_case_output_tokens']:,} (every reply at max_tokens)",
        f"cost:                     ${result['cost_usd_min']:,.4f} - ${result['cost_usd_max']:,.4f}",
    ]
    for model, m in result["models"].items():
        lines.append(
            f"  {model}: {m['requests']:,} requests, ${m['cost_usd_min']:,.4f} - ${m['cost_usd_max']:,.4f} "
            f"(batch mode ${m['batch_cost_usd_min']:,.4f} - ${m['batch_cost_usd_max']:,.4f})"
        )
    lines.append(f"shortest duration:        {result['shortest_duration_s']:,.1f} s at the chosen limits")
    lines.append(f"if replies hit max_tokens: {result['duration_if_every_reply_hits_max_tokens_s']:,.1f} s")
    if result["invalid_lines"]:
        lines.append(f"invalid lines ({len(result['invalid_lines'])}):")
        lines += [f"  {entry['error']}" for entry in result["invalid_lines"]]
    return "\n".join(lines)
