"""The model table: ids, aliases, retirement, limits of a request, prices and rate-limit class, as data.

The facts live in `models.toml` beside this file (one `[[model]]` entry per model, with its source and
the date it was checked). A user adds or overrides entries with a file in the same format, named by
`--models-file` or the environment variable PREFECT_ANTHROPIC_MODELS_FILE. The client, `estimate`, the
tier presets and the emulator all read this one table, so they can never disagree.

A fact our sources do not give is left out of the table, never guessed: a model without prices is priced
`None` (the rows say `cost_usd` null and the run warns), a model without a minimum cacheable length gets
no "too short to cache" warning.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cache, lru_cache
from importlib import resources
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "MODELS_FILE_ENV",
    "REJECTABLE",
    "TOKEN_COUNTS",
    "ModelInfo",
    "ModelTable",
    "ModelsFileError",
    "Prices",
    "UnknownModelError",
    "Usage",
    "UsageTotals",
    "cost_usd",
    "current_date",
    "lookup_model",
    "model_table",
    "request_limit_class",
    "resolve_model",
    "server_tool_fee",
    "unpriced_reason",
    "use_models_file",
]

MODELS_FILE_ENV = "PREFECT_ANTHROPIC_MODELS_FILE"
TODAY_ENV = "PREFECT_ANTHROPIC_TODAY"
#: What a model may reject on any API version (the `rejects` field).
REJECTABLE = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "prefill",
        "manual_thinking",
        "disabled_thinking",
        "forced_tool_choice",
        "inference_geo",
    }
)
_PRICE_KINDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


class ModelsFileError(ValueError):
    """A models file that cannot be read or holds an entry the table cannot take."""


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens, with the modifiers that change them."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    #: Above this many prompt tokens (input + cache writes + cache reads), `long_context` prices apply.
    long_context_threshold: int | None = None
    long_context: Prices | None = None
    #: Multiplier of the whole request with `speed: "fast"`; None where it is not known.
    fast: float | None = None
    #: Multiplier with `inference_geo: "us"`; None where it is not known.
    us_geo: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    id: str
    aliases: tuple[str, ...] = ()
    #: Models of one class share a rate-limit bucket (Opus 4.5-4.8 share one); None: a bucket of its own.
    limit_class: str | None = None
    #: The most tokens a request can hold (prompt and output): the bound of input the request's bytes do not
    #: size (an image or PDF by URL or file id, a server tool's results); None where it is not known.
    context_window: int | None = None
    max_output_tokens: int | None = None
    min_cacheable_tokens: int | None = None
    retired_on: dt.date | None = None
    rejects: frozenset[str] = frozenset()
    #: "ga" or "preview" where `speed: "fast"` is accepted (preview needs a beta header); None: rejected.
    fast_mode: str | None = None
    #: Older models count cache reads toward input tokens/min; current ones do not.
    cache_reads_count_toward_itpm: bool = False
    prices: Prices | None = None
    source: str = ""
    checked: dt.date | None = None

    @property
    def rate_limit_class(self) -> str:
        return self.limit_class or self.id

    def is_retired(self, today: dt.date | None = None) -> bool:
        return self.retired_on is not None and (today or current_date()) >= self.retired_on


def current_date() -> dt.date:
    """Today, where the model table's dates are concerned (retirements): the one clock the client, the
    pre-flight check, `estimate` and the emulator read. PREFECT_ANTHROPIC_TODAY=YYYY-MM-DD sets it, to check
    a run against a date to come (or to pin it in tests)."""
    pinned = os.environ.get(TODAY_ENV, "").strip()
    if not pinned:
        return dt.date.today()
    try:
        return dt.date.fromisoformat(pinned)
    except ValueError:
        raise ValueError(f"{TODAY_ENV} must be a date YYYY-MM-DD, got {pinned!r}") from None


class UnknownModelError(LookupError):
    pass


def _prices(table: Mapping[str, Any], where: str) -> Prices:
    missing = [kind for kind in _PRICE_KINDS if kind not in table]
    if missing:
        raise ModelsFileError(f"{where}: prices lack {', '.join(missing)} (leave the whole table out if unknown)")
    long_context = None
    threshold = table.get("long_context_threshold")
    if threshold is not None:
        long_kinds = {kind: table.get(f"long_context_{kind}") for kind in _PRICE_KINDS}
        if any(value is None for value in long_kinds.values()):
            raise ModelsFileError(f"{where}: long_context_threshold needs long_context_{{{','.join(_PRICE_KINDS)}}}")
        long_context = Prices(**{k: float(v) for k, v in long_kinds.items()})  # type: ignore[arg-type]
    return Prices(
        **{kind: float(table[kind]) for kind in _PRICE_KINDS},
        long_context_threshold=int(threshold) if threshold is not None else None,
        long_context=long_context,
        fast=float(table["fast"]) if "fast" in table else None,
        us_geo=float(table["us_geo"]) if "us_geo" in table else None,
    )


def _model(entry: Mapping[str, Any], where: str, base: ModelInfo | None = None) -> ModelInfo:
    """A table entry as a ModelInfo; with `base`, the entry overrides base's fields one by one."""
    known = {f.name for f in fields(ModelInfo)}
    unknown = set(entry) - known
    if unknown:
        raise ModelsFileError(f"{where}: unknown field {sorted(unknown)[0]!r}; fields are {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for name, value in entry.items():
        if name == "aliases":
            value = tuple(str(alias) for alias in value)
        elif name == "rejects":
            bad = set(value) - REJECTABLE
            if bad:
                raise ModelsFileError(
                    f"{where}: rejects {sorted(bad)[0]!r} is not one of {', '.join(sorted(REJECTABLE))}"
                )
            value = frozenset(value)
        elif name == "prices":
            value = _prices(value, where)
        elif name in ("retired_on", "checked") and isinstance(value, str):
            value = dt.date.fromisoformat(value)
        elif name == "fast_mode" and value not in ("ga", "preview"):
            raise ModelsFileError(f"{where}: fast_mode must be 'ga' or 'preview'")
        values[name] = value
    if base is not None:
        return replace(base, **values)
    if "id" not in values:
        raise ModelsFileError(f"{where}: every [[model]] needs an id")
    return ModelInfo(**values)


def _server_tool_fees(table: Any, where: str) -> dict[str, float]:
    """`[server_tool_fees]`: US dollars per use of a server tool, by its type without the date suffix."""
    if not isinstance(table, Mapping):
        raise ModelsFileError(f"{where}: server_tool_fees must be a table of tool name = dollars per use")
    fees: dict[str, float] = {}
    for name, fee in table.items():
        if isinstance(fee, bool) or not isinstance(fee, (int, float)) or fee < 0:
            raise ModelsFileError(f"{where}: server_tool_fees.{name} must be a number of dollars >= 0")
        fees[str(name)] = float(fee)
    return fees


@dataclass(frozen=True)
class ModelTable:
    models: tuple[ModelInfo, ...]
    sources: tuple[str, ...] = ()
    #: Dollars per use of a server tool (`web_search`, `web_fetch`...): a fee our sources do not give is absent.
    server_tool_fees: Mapping[str, float] = field(default_factory=dict, compare=False)
    _by_name: dict[str, ModelInfo] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for model in self.models:
            for name in (model.id, *model.aliases):
                self._by_name[name] = model

    def lookup(self, name: str) -> ModelInfo | None:
        return self._by_name.get(name)

    def extended(self, path: str | os.PathLike[str]) -> ModelTable:
        """This table with the entries of the file at `path` added, or overriding those with the same id."""
        try:
            data = tomllib.loads(_read_text(path))
        except OSError as exc:
            raise ModelsFileError(f"cannot read models file {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ModelsFileError(f"models file {path} is not valid TOML: {exc}") from exc
        by_id = {model.id: model for model in self.models}
        for i, entry in enumerate(data.get("model", [])):
            where = f"{path}: model #{i + 1} ({entry.get('id', '?')})"
            base = by_id.get(entry.get("id", "")) or self.lookup(entry.get("id", ""))
            model = _model(entry, where, base)
            by_id.pop(base.id if base is not None else "", None)
            by_id[model.id] = model
        fees = {**self.server_tool_fees, **_server_tool_fees(data.get("server_tool_fees", {}), str(path))}
        return ModelTable(tuple(by_id.values()), (*self.sources, str(path)), fees)


def _read_text(path: str | os.PathLike[str]) -> str:
    """A local file's text, or a URL's (s3://, gs://...: a models file kept in the bucket beside the data)."""
    from ..storage import Storage, is_url, local_path

    if is_url(path):
        return Storage.from_environment().read_text(str(path))
    return local_path(path).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _shipped_table() -> ModelTable:
    text = resources.files(__package__).joinpath("models.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    models = tuple(_model(entry, f"models.toml: model #{i + 1}") for i, entry in enumerate(data["model"]))
    return ModelTable(models, ("models.toml",), _server_tool_fees(data.get("server_tool_fees", {}), "models.toml"))


def model_table(models_file: str | os.PathLike[str] | None = None) -> ModelTable:
    """The shipped table, extended by `models_file`, else by the file PREFECT_ANTHROPIC_MODELS_FILE names (the
    command line sets it for --models-file, for itself and the processes it starts), else none."""
    path = str(models_file) if models_file else os.environ.get(MODELS_FILE_ENV) or None
    return _table_of(path)


@cache
def _table_of(path: str | None) -> ModelTable:
    """The table of one models file (None: the shipped one), read once per process: looked up for every
    request, so kept at hand."""
    if path is None:
        return _shipped_table()
    if "://" not in path and not os.path.exists(path):
        raise ModelsFileError(f"models file not found: {path} ({MODELS_FILE_ENV} or --models-file)")
    return _shipped_table().extended(path)


def use_models_file(path: str | os.PathLike[str] | None) -> ModelTable:
    """The table `model_table(path)` answers with, read afresh now (a file may have changed since it was
    read): a wrong file fails here, naming it, rather than at the first request."""
    _table_of.cache_clear()
    return model_table(path)


def lookup_model(name: str, *, models_file: str | os.PathLike[str] | None = None) -> ModelInfo | None:
    """The model an id or alias names, retired or not; None when the name is unknown."""
    return model_table(models_file).lookup(name)


def resolve_model(name: str, *, models_file: str | os.PathLike[str] | None = None) -> ModelInfo:
    model = lookup_model(name, models_file=models_file)
    if model is None:
        raise UnknownModelError(f"unknown model {name!r}")
    return model


def server_tool_fee(name: str, *, models_file: str | os.PathLike[str] | None = None) -> float | None:
    """Dollars per use of the server tool `name` (its type without the date: "web_search"); None when the
    model table does not know it (then a request using it cannot be budgeted)."""
    return model_table(models_file).server_tool_fees.get(name)


def request_limit_class(model: str, speed: Any = None, *, models_file: str | os.PathLike[str] | None = None) -> str:
    """The rate-limit bucket a request draws from: its model's class; fast mode has buckets of its own."""
    info = lookup_model(model, models_file=models_file)
    base = info.rate_limit_class if info is not None else model
    return f"{base}:fast" if speed == "fast" else base


#: Usage's token counts, by the names the API's `usage`, result records and result rows give them.
TOKEN_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    #: Part of cache_creation_input_tokens written with the 1 hour TTL (priced higher than 5 minute writes).
    cache_creation_1h_input_tokens: int = 0
    #: Part of output_tokens spent thinking (already inside output_tokens, which is what is billed).
    thinking_tokens: int = 0
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None

    @classmethod
    def from_api(cls, usage: Mapping[str, Any] | None) -> Usage:
        usage = usage or {}
        creation = usage.get("cache_creation") or {}
        details = usage.get("output_tokens_details") or {}
        return cls(
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens") or 0),
            cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0),
            cache_creation_1h_input_tokens=int(creation.get("ephemeral_1h_input_tokens") or 0),
            thinking_tokens=int(details.get("thinking_tokens") or 0),
            service_tier=usage.get("service_tier"),
            speed=usage.get("speed"),
            inference_geo=usage.get("inference_geo"),
        )

    @classmethod
    def of_counts(cls, fields: Mapping[str, Any]) -> Usage:
        """The token counts among a result record's or a result row's fields (a null count is 0)."""
        counts: dict[str, Any] = {name: fields[name] or 0 for name in TOKEN_COUNTS}
        return cls(**counts)

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


@dataclass
class UsageTotals:
    """Tokens and dollars summed over answers: what the emulator billed, a run's progress, a dataset's totals."""

    # Usage's token counts by the same names, summed (Usage is one answer's, frozen): alike in shape only.
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0

    def add_usage(self, usage: Usage, cost: float | None) -> None:
        """One answer's tokens, and its cost (None: the model table cannot price it, no dollars are added)."""
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_creation_input_tokens += usage.cache_creation_input_tokens
        self.cache_read_input_tokens += usage.cache_read_input_tokens
        self.cost_usd += cost or 0.0


def _info(model: str | ModelInfo | None) -> ModelInfo | None:
    return model if isinstance(model, ModelInfo) else lookup_model(model or "")


def unpriced_reason(model: str | ModelInfo | None, usage: Usage) -> str | None:
    """Why a response cannot be priced from the table (None when it can)."""
    info = _info(model)
    name = info.id if info is not None else (model if isinstance(model, str) else "") or "(no model)"
    if info is None:
        return f"model {name!r} is not in the model table"
    if info.prices is None:
        return f"the model table has no prices for {name!r}"
    if usage.speed == "fast" and info.prices.fast is None:
        return f"the fast-mode price of {name!r} is not known"
    if usage.inference_geo == "us" and info.prices.us_geo is None:
        return f"the inference_geo 'us' price of {name!r} is not known"
    return None


def cost_usd(
    model: str | ModelInfo | None, usage: Usage, *, batch: bool = False, refused_before_output: bool = False
) -> float | None:
    """What Anthropic charges for one response; None when the table cannot price it (see unpriced_reason).

    Cache writes are priced by TTL, the long-context price applies over the model's threshold, fast mode
    and US-only inference multiply the whole request, the batch discount of 50% stacks with all of them,
    and a refusal before any output is free (from 2026-06-02).
    """
    if refused_before_output:
        return 0.0
    info = _info(model)
    if info is None or unpriced_reason(info, usage) is not None:
        return None
    assert info.prices is not None
    p = info.prices
    threshold = p.long_context_threshold
    if p.long_context is not None and threshold is not None and usage.total_input_tokens > threshold:
        p = replace(p.long_context, fast=p.fast, us_geo=p.us_geo)
    write_1h = usage.cache_creation_1h_input_tokens
    write_5m = usage.cache_creation_input_tokens - write_1h
    dollars = (
        usage.input_tokens * p.input
        + write_5m * p.cache_write_5m
        + write_1h * p.cache_write_1h
        + usage.cache_read_input_tokens * p.cache_read
        + usage.output_tokens * p.output
    ) / 1_000_000
    if usage.speed == "fast" and p.fast is not None:
        dollars *= p.fast
    if usage.inference_geo == "us" and p.us_geo is not None:
        dollars *= p.us_geo
    return dollars * 0.5 if batch else dollars
