"""`estimate`: what a request file will cost and take, without a single API call."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from ..api.formatting import duration, money, number
from ..api.models import Usage, cost_usd, model_table, request_limit_class, unpriced_reason, use_models_file
from ..api.schema import OutputSchema, with_output_format
from ..engine.caching import cached_prefix
from ..engine.corrections import load_token_corrections
from ..engine.estimator import InputTokenEstimator
from ..engine.preflight import Preflight
from ..engine.records import RequestItem
from ..settings import ClientSettings
from ..storage import Storage
from .inputs import iter_requests

__all__ = ["estimate_file", "format_estimate"]


def prepared_requests(
    path: str | os.PathLike[str], settings: ClientSettings, storage: Storage | None = None
) -> Iterator[tuple[RequestItem, str | None]]:
    """Each line as it would be sent (the schema applied, unsupported parameters dropped if asked), with
    why it would not be sent (None: it would)."""
    storage = storage or Storage()
    if not storage.exists(str(path)):
        raise FileNotFoundError(f"requests file not found: {path}")
    models = use_models_file(settings.models_file) if settings.models_file else model_table()
    preflight = Preflight(settings.api_version, drop_unsupported_params=settings.drop_unsupported_params, models=models)
    schema = OutputSchema(settings.output_schema) if settings.output_schema is not None else None
    for item in iter_requests(path, storage=storage):
        if item.invalid is not None:
            yield item, item.invalid
            continue
        if schema is not None:  # the schema is sent with every request: its tokens are input tokens
            item = dataclasses.replace(item, body=with_output_format(item.body, schema))
        checked = preflight(item)
        if isinstance(checked, RequestItem):
            yield checked, None
        else:
            yield item, checked.error_message


def estimate_file(
    path: str | os.PathLike[str],
    settings: ClientSettings | None = None,
    *,
    exact_input_tokens: Mapping[int, int] | None = None,
    storage: Storage | None = None,
) -> dict[str, Any]:
    """Count, price and time a request file. Input tokens are estimated (tiktoken x the correction
    learned from earlier runs) unless `exact_input_tokens` (line -> count_tokens' answer) is given."""
    settings = settings or ClientSettings()
    corrections = load_token_corrections()
    estimator = InputTokenEstimator(initial_ratios=corrections)
    per_model: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    limit_classes: dict[str, str] = {}
    invalid: list[dict[str, Any]] = []
    prefixes_seen: set[str] = set()
    for item, problem in prepared_requests(path, settings, storage):
        if problem is not None:
            invalid.append({"line": item.line, "error": problem})
            continue
        model = item.model
        info = model_table(settings.models_file).lookup(model)
        name = info.id if info is not None else model
        limit_classes[name] = request_limit_class(model, item.body.get("speed"), models_file=settings.models_file)
        stats = per_model[name]
        stats["requests"] += 1
        total = exact_input_tokens[item.line] if exact_input_tokens is not None else estimator.estimate(item.body)
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
        priced = model_table(settings.models_file).lookup(model) or model
        why = unpriced_reason(priced, input_only)
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
            "cost_usd_min": _rounded(cost_usd(priced, input_only)),
            "cost_usd_max": _rounded(cost_usd(priced, worst)),
            "batch_cost_usd_min": _rounded(cost_usd(priced, input_only, batch=True)),
            "batch_cost_usd_max": _rounded(cost_usd(priced, worst, batch=True)),
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
        "input_tokens": sum(m["estimated_input_tokens"] for m in models.values()),
        "input_tokens_exact": exact_input_tokens is not None,
        "output_tokens_max": sum(m["worst_case_output_tokens"] for m in models.values()),
        **{key: _total(models, key) for key in _COST_KEYS},
        "duration_s_min": round(shortest, 1),
        "duration_s_if_replies_hit_max_tokens": round(worst_case, 1),
        "rejected_lines": invalid,
        "unpriced_models": [model for model, m in models.items() if m["cost_usd_min"] is None],
        "warnings": warnings,
        "models": models,
        "limits": {cls: limits_for(cls).as_dict() for cls in by_class},
        "token_corrections_used": {model: corrections[model] for model in models if model in corrections},
    }


_COST_KEYS = ("cost_usd_min", "cost_usd_max", "batch_cost_usd_min", "batch_cost_usd_max")


def _rounded(cost: float | None) -> float | None:
    return None if cost is None else round(cost, 6)


def _total(models: dict[str, dict[str, Any]], key: str) -> float:
    """The sum over the models that have a price (unpriced ones are listed apart, never counted as $0)."""
    return round(sum(m[key] for m in models.values() if m[key] is not None), 6)


def format_estimate(result: dict[str, Any]) -> str:
    lines = [
        f"requests:                 {number(result['requests'])}",
        f"input tokens:             {number(result['input_tokens'])} "
        f"({'exact, from count_tokens' if result['input_tokens_exact'] else 'estimated'})",
        f"worst-case output tokens: {number(result['output_tokens_max'])} (every reply at max_tokens)",
        f"cost:                     {money(result['cost_usd_min'])} - {money(result['cost_usd_max'])} "
        f"(batch mode {money(result['batch_cost_usd_min'])} - {money(result['batch_cost_usd_max'])})",
    ]
    if result["unpriced_models"]:
        lines[-1] += f" (without {', '.join(result['unpriced_models'])}: price unknown)"
    for model, m in result["models"].items():
        if m["cost_usd_min"] is None:
            lines.append(f"  {model}: {m['requests']:,} requests, price unknown (add it with --models-file)")
            continue
        lines.append(
            f"  {model}: {m['requests']:,} requests, {money(m['cost_usd_min'])} - {money(m['cost_usd_max'])} "
            f"(batch mode {money(m['batch_cost_usd_min'])} - {money(m['batch_cost_usd_max'])})"
        )
    lines.append(f"shortest duration:        {duration(result['duration_s_min'])} at the chosen limits")
    lines.append(f"if replies hit max_tokens: {duration(result['duration_s_if_replies_hit_max_tokens'])}")
    auto = result.get("auto")
    if auto is not None:
        lines += [
            "",
            f"{'mode':<9} {'cost':<23} duration",
            f"{'realtime':<9} {money(result['cost_usd_min']) + ' - ' + money(result['cost_usd_max']):<23} "
            f"{duration(result['duration_s_min'])} - {duration(result['duration_s_if_replies_hit_max_tokens'])}",
            f"{'batch':<9} {money(result['batch_cost_usd_min']) + ' - ' + money(result['batch_cost_usd_max']):<23} "
            "up to 24 h",
            f"{'auto':<9} {money(auto['cost_usd_min']) + ' - ' + money(auto['cost_usd_worst_case']):<23} "
            + (f"by {auto['deadline']}" if auto["deadline"] else "by --deadline"),
        ]
        if auto["feasible"]:
            lines.append(
                f"  auto: batches until {auto['cutover_at']} at the latest, then real time for what they have not "
                "answered; worst case all of it in real time after the cut-over"
            )
        elif auto["feasible"] is False:
            lines.append(f"  auto: {auto['problem']}")
    lines += [f"warning: {warning}" for warning in result["warnings"]]
    if result["rejected_lines"]:
        lines.append(f"lines the API would reject, never sent ({len(result['rejected_lines'])}):")
        lines += [f"  {entry['error']}" for entry in result["rejected_lines"]]
    return "\n".join(lines)
