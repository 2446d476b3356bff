"""`estimate`: what a request file will cost and take, without a single API call."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Any

from .corrections import load_token_corrections
from .engine.caching import cached_prefix
from .engine.estimator import InputTokenEstimator
from .engine.preflight import Preflight
from .inputs import iter_requests
from .models import Usage, cost_usd, lookup_model, request_limit_class, unpriced_reason, use_models_file
from .schema import OutputSchema, with_output_format
from .settings import ClientSettings

__all__ = ["estimate_file", "format_estimate"]


def estimate_file(path: str | os.PathLike[str], settings: ClientSettings | None = None) -> dict[str, Any]:
    settings = settings or ClientSettings()
    if settings.models_file:
        use_models_file(settings.models_file)
    preflight = Preflight(settings.anthropic_version, drop_unsupported_params=settings.drop_unsupported_params)
    schema = OutputSchema(settings.output_schema) if settings.output_schema is not None else None
    corrections = load_token_corrections()
    estimator = InputTokenEstimator(initial_ratios=corrections)
    per_model: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    limit_classes: dict[str, str] = {}
    invalid: list[dict[str, Any]] = []
    prefixes_seen: set[str] = set()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"requests file not found: {path}")
    for item in iter_requests(path):
        if item.invalid is not None:
            invalid.append({"line": item.line, "error": item.invalid})
            continue
        if schema is not None:  # the schema is sent with every request: its tokens are input tokens
            item = dataclasses.replace(item, body=with_output_format(item.body, schema))
        problem = preflight.problem(item)
        if problem is not None:
            invalid.append({"line": item.line, "error": f"line {item.line}: {problem}"})
            continue
        model = item.model
        info = lookup_model(model)
        name = info.id if info is not None else model
        limit_classes[name] = request_limit_class(model, item.body.get("speed"))
        stats = per_model[name]
        stats["requests"] += 1
        total = estimator.estimate(item.body)
        stats["input_tokens"] += total
        stats["max_output_tokens"] += item.body["max_tokens"]
        prefix = cached_prefix(item.body)
        if prefix is not None:
            cached = min(total, int(estimator.count_blocks_cl100k(prefix.blocks) * estimator.ratio(model)))
            if info is not None and cached >= (info.min_cacheable_tokens or 0):
                # One write per distinct prefix (with warm-up), reads for every other request sharing it.
                kind = "cache_read_tokens" if prefix.key in prefixes_seen else "cache_write_tokens"
                prefixes_seen.add(prefix.key)
                stats[kind] += cached
                stats["uncached_input_tokens"] -= cached
        stats["uncached_input_tokens"] += total
    limits_for = settings.limits()
    models = {}
    warnings: list[str] = []
    by_class: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for model, stats in sorted(per_model.items()):
        input_only = Usage(
            input_tokens=int(stats["uncached_input_tokens"]),
            cache_creation_input_tokens=int(stats["cache_write_tokens"]),
            cache_read_input_tokens=int(stats["cache_read_tokens"]),
        )
        worst = dataclasses.replace(input_only, output_tokens=int(stats["max_output_tokens"]))
        why = unpriced_reason(model, input_only)
        if why is not None:
            warnings.append(
                f"No price for {model}: {why}. Its {int(stats['requests']):,} requests are left out of the cost; "
                "add its prices with --models-file."
            )
        models[model] = {
            "requests": int(stats["requests"]),
            "estimated_input_tokens": int(stats["input_tokens"]),
            "worst_case_output_tokens": int(stats["max_output_tokens"]),
            "estimated_cache_write_tokens": int(stats["cache_write_tokens"]),
            "estimated_cache_read_tokens": int(stats["cache_read_tokens"]),
            "cost_usd_min": _rounded(cost_usd(model, input_only)),
            "cost_usd_max": _rounded(cost_usd(model, worst)),
            "batch_cost_usd_min": _rounded(cost_usd(model, input_only, batch=True)),
            "batch_cost_usd_max": _rounded(cost_usd(model, worst, batch=True)),
        }
        totals = by_class[limit_classes[model]]
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
        **{key: _total(models, key) for key in _COST_KEYS},
        "unpriced_models": [model for model, m in models.items() if m["cost_usd_min"] is None],
        "warnings": warnings,
        "models": models,
        "limits": {cls: limits_for(cls).as_dict() for cls in by_class},
        "token_corrections_used": {model: corrections[model] for model in models if model in corrections},
        "shortest_duration_s": round(shortest, 1),
        "duration_if_every_reply_hits_max_tokens_s": round(worst_case, 1),
    }


_COST_KEYS = ("cost_usd_min", "cost_usd_max", "batch_cost_usd_min", "batch_cost_usd_max")


def _rounded(cost: float | None) -> float | None:
    return None if cost is None else round(cost, 6)


def _total(models: dict[str, dict[str, Any]], key: str) -> float:
    """The sum over the models that have a price (unpriced ones are listed apart, never counted as $0)."""
    return round(sum(m[key] for m in models.values() if m[key] is not None), 6)


def _money(cost: float | None) -> str:
    return "price unknown" if cost is None else f"${cost:,.4f}"


def format_estimate(result: dict[str, Any]) -> str:
    lines = [
        f"requests:                 {result['requests']:,}",
        f"estimated input tokens:   {result['estimated_input_tokens']:,}",
        f"worst-case output tokens: {result['worst_case_output_tokens']:,} (every reply at max_tokens)",
        f"cost:                     ${result['cost_usd_min']:,.4f} - ${result['cost_usd_max']:,.4f}",
    ]
    if result["unpriced_models"]:
        lines[-1] += f" (without {', '.join(result['unpriced_models'])}: price unknown)"
    for model, m in result["models"].items():
        if m["cost_usd_min"] is None:
            lines.append(f"  {model}: {m['requests']:,} requests, price unknown (add it with --models-file)")
            continue
        lines.append(
            f"  {model}: {m['requests']:,} requests, {_money(m['cost_usd_min'])} - {_money(m['cost_usd_max'])} "
            f"(batch mode {_money(m['batch_cost_usd_min'])} - {_money(m['batch_cost_usd_max'])})"
        )
    lines.append(f"shortest duration:        {result['shortest_duration_s']:,.1f} s at the chosen limits")
    lines.append(f"if replies hit max_tokens: {result['duration_if_every_reply_hits_max_tokens_s']:,.1f} s")
    lines += [f"warning: {warning}" for warning in result["warnings"]]
    if result["invalid_lines"]:
        lines.append(f"lines the API would reject, never sent ({len(result['invalid_lines'])}):")
        lines += [f"  {entry['error']}" for entry in result["invalid_lines"]]
    return "\n".join(lines)
