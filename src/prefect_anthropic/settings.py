"""Every option, declared once: its type, default and help, and how the command line spells it.

`ClientSettings` is how requests are sent (where, how fast, how many attempts, caching, a budget...);
`RunOptions` is how a dataset run is organised (shards, their retries, the mode). Both carry no secret:
they are what a flow run takes as parameters and shows in the UI. The API key comes from a credentials
block (by name) or ANTHROPIC_API_KEY and is read where the client is built.

From these declarations follow the command line's flags (`add_arguments`, `explicit_options`), the client
block's field (it holds a `ClientSettings`), the flow's parameters and what the client reads. Options given
explicitly (flags typed, fields passed) merge over a block's (`merged_over`); nothing else replaces them.
A field left None is resolved where it is used: from the environment of the process that sends.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import quote, unquote_plus, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo

from .api.models import MODELS_FILE_ENV
from .api.request_rules import API_VERSION_2023, API_VERSION_2026, API_VERSIONS

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_ANTHROPIC_VERSION",
    "DEFAULT_BASE_URL",
    "ClientSettings",
    "Flag",
    "MissingAPIKeyError",
    "RunOptions",
    "account_wide_fields",
    "add_arguments",
    "api_key_from_env",
    "explicit_options",
]

API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"
LIMITER_URL_ENV = "PREFECT_ANTHROPIC_LIMITER_URL"
LIMITER_PASSWORD_ENV = "PREFECT_ANTHROPIC_REDIS_PASSWORD"
DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_ANTHROPIC_VERSION = API_VERSION_2023
#: The tiers.py presets' names (tiers.py is not imported here: it imports the engine, which imports this).
TIER_CHOICES = ("1", "2", "3", "4", "evaluation", "start", "build", "scale", "auto")


class MissingAPIKeyError(RuntimeError):
    pass


#: Words of a query parameter's name that say its value is a credential (`password`, `api_key`, `accessToken`,
#: `X-Amz-Signature`, Azure's `sig`...), and fragments that say so even where the words are run together.
_SECRET_WORDS = frozenset(
    {"password", "passwd", "pwd", "pass", "passphrase", "token", "secret", "key", "apikey", "sig", "signature",
     "auth", "authorization", "credential", "credentials"}
)  # fmt: skip
_SECRET_FRAGMENTS = ("password", "passwd", "secret", "token", "apikey", "signature", "credential")


def is_secret_parameter(name: str) -> bool:
    """Whether a URL query parameter of this name carries a secret (to refuse it, or to redact its value)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", unquote_plus(name))
    words = [word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word]
    squashed = "".join(words)
    return bool(_SECRET_WORDS.intersection(words)) or any(fragment in squashed for fragment in _SECRET_FRAGMENTS)


def secrets_in_url(url: str) -> list[str]:
    """What in a URL carries a secret, in words that do not repeat it: userinfo (a lone user part may be a token
    as well), query parameters by name. Empty for a URL without any."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = ["a user or password before '@'"] if "@" in parts.netloc else []
    names = [pair.split("=", 1)[0] for pair in re.split(r"[&;]", parts.query) if pair]
    secret = sorted({unquote_plus(name) for name in names if is_secret_parameter(name)})
    if secret:
        found.append("the query parameter" + ("s " if len(secret) > 1 else " ") + ", ".join(map(repr, secret)))
    return found


def _check_limiter_url(url: str, source: str) -> str:
    """`url` if it is a Redis URL without a secret; else a ValueError saying where the password goes. URLs land in
    flow parameters (shown in the UI), summary.json and messages: a password in one would be everywhere."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{source} must be redis://HOST:PORT/DB (or rediss://, unix://), not {parts.scheme}://...")
    found = secrets_in_url(url)
    if found:
        raise ValueError(
            f"{source} must carry no secret (it has {' and '.join(found)}): give redis://HOST:PORT/DB and put the "
            f"Redis password in env {LIMITER_PASSWORD_ENV}, or name a prefect-redis RedisDatabase block with "
            "--limiter-block NAME (limiter_block), which keeps the user and password"
        )
    return url


def _check_base_url(url: str, source: str) -> str:
    """`url` if it carries no secret; else a ValueError saying where the key goes (see `_check_limiter_url`)."""
    found = secrets_in_url(url)
    if found:
        raise ValueError(
            f"{source} must carry no secret (it has {' and '.join(found)}): the API key goes in env {API_KEY_ENV}, "
            "--api-key, or an AnthropicCredentials block (--credentials-block NAME), and is sent as a header"
        )
    return url


def _url_from_env(name: str, check: Callable[[str, str], str]) -> str | None:
    """A URL from the environment, checked as the field it stands in for is."""
    url = os.environ.get(name) or None
    return check(url, f"env {name}") if url is not None else None


def api_key_from_env() -> str:
    return os.environ.get(API_KEY_ENV, "")


@dataclass(frozen=True)
class Flag:
    """How the command line spells a field, where the plain rule (`--field-name`, a trailing `_s` for
    seconds dropped, booleans as switches) does not say it all."""

    name: str | None = None
    #: A switch that sets the field to False (`--fixed-concurrency` for adaptive_concurrency).
    negate: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    #: Turns the flag's text into the field's value (a schema file into the schema); raise ValueError.
    parse: Callable[[str], Any] | None = None
    #: The environment variable a None field falls back to, for the help text.
    env: str | None = None
    #: No flag at all (set in Python or through a block only).
    hidden: bool = False


NoFlag = Flag(hidden=True)


@dataclass(frozen=True)
class AccountWide:
    """Marks a ClientSettings field the account's shared state depends on (its connections, rate limiters and
    concurrency, see engine/account.py): clients whose settings differ in one of them do not share it."""


ACCOUNT_WIDE = AccountWide()


def _load_schema(path: str) -> dict[str, Any]:
    from .api.schema import load_schema

    return load_schema(path).full


class ClientSettings(BaseModel):
    """How to reach the API and how fast to go. Every field has a safe default."""

    # A refused value is never echoed: it may be the secret (a password in limiter_url, say).
    model_config = ConfigDict(validate_assignment=True, extra="forbid", hide_input_in_errors=True)

    base_url: Annotated[str | None, Flag(env=BASE_URL_ENV), ACCOUNT_WIDE] = Field(
        default=None,
        description=f"API base URL: the emulator's or a gateway's (default: the credentials block's, else env "
        f"{BASE_URL_ENV}, else {DEFAULT_BASE_URL}); no user, password or token in it (the key is sent as a header).",
    )
    anthropic_version: Annotated[str | None, Flag(choices=API_VERSIONS), ACCOUNT_WIDE] = Field(
        default=None,
        description=f"API version, the anthropic-version header (default: the credentials block's, else "
        f"{DEFAULT_ANTHROPIC_VERSION}; {API_VERSION_2026} rejects sampling parameters).",
    )
    tier: Annotated[str | None, Flag(choices=TIER_CHOICES), ACCOUNT_WIDE] = Field(
        default=None,
        description="Rate-limit preset: 1-4, evaluation, start, build, scale, or auto (start at Tier 1, adopt "
        "the server's headers).",
    )
    requests_per_minute: Annotated[float | None, ACCOUNT_WIDE] = Field(
        default=None, gt=0, description="Requests per minute (over the tier)."
    )
    input_tokens_per_minute: Annotated[float | None, ACCOUNT_WIDE] = Field(
        default=None, gt=0, description="Input tokens per minute (over the tier)."
    )
    output_tokens_per_minute: Annotated[float | None, ACCOUNT_WIDE] = Field(
        default=None, gt=0, description="Output tokens per minute (over the tier)."
    )
    limit_share: Annotated[float, ACCOUNT_WIDE] = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of the account's limits this run may use (e.g. 0.25 on each of four machines).",
    )
    max_concurrency: Annotated[int, ACCOUNT_WIDE] = Field(
        default=6_000,
        ge=1,
        description="Most requests in flight at once: a safety ceiling (the limits set the pace; the default lets "
        "10,000 requests/min of 30 s replies through).",
    )
    adaptive_concurrency: Annotated[bool, Flag("--fixed-concurrency", negate=True), ACCOUNT_WIDE] = Field(
        default=True,
        description="Adapt the requests in flight per limit class to overload (529, 503, resets); the switch "
        "--fixed-concurrency keeps max_concurrency whatever the answers.",
    )
    give_up_after_s: Annotated[float, ACCOUNT_WIDE] = Field(
        default=300.0,
        gt=0,
        description="Stop (resumable, exit 2) when nothing of a limit class succeeded for this many seconds while "
        "requests kept failing with retryable errors.",
    )
    max_attempts: int = Field(default=5, ge=1, description="Attempts per request, the first included.")
    timeout_s: Annotated[float, ACCOUNT_WIDE] = Field(
        default=600.0, gt=0, description="Seconds one HTTP request may take."
    )
    include_request: bool = Field(default=False, description="Keep each request body in the results.")
    use_caching: bool = Field(
        default=False, description="Warm each shared cached prefix once before the requests that share it are sent."
    )
    auto_cache: bool = Field(
        default=False,
        description="Add a cache breakpoint to a long system prompt that several requests share (and warm it).",
    )
    drop_unsupported_params: bool = Field(
        default=False,
        description="Send lines without the sampling parameters their model or the API version rejects "
        "(otherwise such lines are error rows, never sent).",
    )
    models_file: Annotated[str | None, Flag(metavar="PATH", env=MODELS_FILE_ENV)] = Field(
        default=None, description="A TOML file adding or overriding entries of the model table (prices, limits)."
    )
    output_schema: Annotated[dict[str, Any] | None, Flag("--schema", metavar="FILE", parse=_load_schema)] = Field(
        default=None,
        description="A JSON Schema every reply must match (structured outputs; a file on the command line, a "
        "dict or a Pydantic model in Python): its fields become the typed `parsed` column.",
    )
    validation_retries: int = Field(
        default=2,
        ge=0,
        description="Times a reply that does not match the schema is asked for again, the error fed back.",
    )
    max_cost_usd: float | None = Field(
        default=None,
        gt=0,
        description="Hard budget in dollars for the output directory's dataset, earlier runs included: a request "
        "whose worst case would cross it is not sent (exit 3).",
    )
    limiter_url: Annotated[str | None, Flag(env=LIMITER_URL_ENV), ACCOUNT_WIDE] = Field(
        default=None,
        description="redis://HOST:PORT/DB: one set of limits for every process and machine using this Redis "
        f"(password from env {LIMITER_PASSWORD_ENV}, never in the URL).",
    )
    limiter_block: Annotated[str | None, ACCOUNT_WIDE] = Field(
        default=None,
        description="Instead of limiter_url: a prefect-redis RedisDatabase block by name (its password stays in it).",
    )
    shared_max_concurrency: Annotated[int | None, ACCOUNT_WIDE] = Field(
        default=None, ge=1, description="With a shared limiter: most requests in flight across every process."
    )

    @field_validator("limiter_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        return None if url is None else _check_limiter_url(url, "limiter_url")

    @field_validator("base_url")
    @classmethod
    def _base_url_without_secrets(cls, url: str | None) -> str | None:
        return None if url is None else _check_base_url(url, "base_url")

    @field_validator("output_schema", mode="before")
    @classmethod
    def _schema_from_model(cls, schema: Any) -> Any:
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            return schema.model_json_schema()
        return getattr(schema, "full", schema)  # an OutputSchema

    @field_validator("output_schema")
    @classmethod
    def _schema_the_api_takes(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            from .api.schema import OutputSchema

            OutputSchema(schema)  # raises SchemaError naming the keyword the API cannot take
        return schema

    @field_validator("anthropic_version")
    @classmethod
    def _known_version(cls, version: str | None) -> str | None:
        if version is not None and version not in API_VERSIONS:
            raise ValueError(f"unknown API version {version!r}; choose one of {', '.join(API_VERSIONS)}")
        return version

    @field_validator("tier", mode="before")
    @classmethod
    def _known_tier(cls, tier: Any) -> Any:
        if tier is None:
            return None
        from .api.tiers import limits_for_tier

        tier = str(tier).lower()
        limits_for_tier(tier)  # raises on an unknown name
        return tier

    # -- resolved where used ------------------------------------------------------------------------------

    @property
    def api_base_url(self) -> str:
        return (self.base_url or _url_from_env(BASE_URL_ENV, _check_base_url) or DEFAULT_BASE_URL).rstrip("/")

    @property
    def api_version(self) -> str:
        return self.anthropic_version or DEFAULT_ANTHROPIC_VERSION

    @property
    def redis_url(self) -> str | None:
        """The shared limiter's Redis URL, with the password from the environment (never log it)."""
        url = self.limiter_url or _url_from_env(LIMITER_URL_ENV, _check_limiter_url)
        password = os.environ.get(LIMITER_PASSWORD_ENV)
        if url is None or not password:
            return url
        parts = urlsplit(url)
        return parts._replace(netloc=f"{parts.username or ''}:{quote(password, safe='')}@{parts.netloc}").geturl()

    @property
    def shares_limits(self) -> bool:
        """Whether the limits are kept in Redis for every process on the account."""
        return bool(self.limiter_block or self.limiter_url or _url_from_env(LIMITER_URL_ENV, _check_limiter_url))

    def limits(self) -> Any:
        """The limits of each limit class under these settings (a `TierLimits`)."""
        from .api.tiers import limits_for_tier

        return limits_for_tier(
            self.tier,
            requests_per_minute=self.requests_per_minute,
            input_tokens_per_minute=self.input_tokens_per_minute,
            output_tokens_per_minute=self.output_tokens_per_minute,
            share=self.limit_share,
        )

    # -- layering ------------------------------------------------------------------------------------------

    def with_options(self, **options: Any) -> ClientSettings:
        """A copy with `options` set (validated; the SDK's `with_options`). The result's explicit fields are
        this one's and the new ones."""
        values = {name: getattr(self, name) for name in self.model_fields_set}
        return type(self)(**{**values, **options})

    def merged_over(self, base: ClientSettings) -> ClientSettings:
        """`base` (a block's settings, say) with the fields set explicitly here laid over it."""
        values = {name: getattr(base, name) for name in base.model_fields_set}
        return type(self)(**{**values, **{name: getattr(self, name) for name in self.model_fields_set}})

    def filled_from(self, *, base_url: str | None = None, anthropic_version: str | None = None) -> ClientSettings:
        """Where this says nothing of the endpoint and version, a credentials block's."""
        updates = {}
        if self.base_url is None and base_url:
            updates["base_url"] = base_url
        if self.anthropic_version is None and anthropic_version:
            updates["anthropic_version"] = anthropic_version
        return self.with_options(**updates) if updates else self


def account_wide_fields() -> tuple[str, ...]:
    """The ClientSettings fields marked ACCOUNT_WIDE, in their order of declaration."""
    return tuple(
        name
        for name, info in ClientSettings.model_fields.items()
        if any(isinstance(item, AccountWide) for item in info.metadata)
    )


class RunOptions(BaseModel):
    """How a dataset run is organised: shards and their retries, the mode, where shards run. The flow
    `generate_dataset` takes each of them as a parameter of the same name and default."""

    model_config = ConfigDict(extra="forbid")

    # Declarations alike in shape only: each field its own type, bounds and help (no logic to share).
    shard_size: int = Field(default=5_000, ge=1, description="Lines per shard task.")
    max_parallel_shards: int = Field(
        default=4, ge=1, description="Shards running at once (they share one client and its limits)."
    )
    shard_retries: int = Field(
        default=3, ge=0, description="Retries of a shard that ended with retryable failures (each resumes)."
    )
    shard_retry_delay_s: float = Field(
        default=10.0, ge=0, description="Base of the exponential backoff between shard retries, in seconds."
    )
    mode: Literal["realtime", "batch", "auto"] = Field(
        default="realtime",
        description="realtime: the Messages API at the rate limits; batch: the Message Batches API at half the "
        "price; auto: batches until the latest moment real time can still finish by --deadline, then real time "
        "for what they have not answered.",
    )
    deadline: Annotated[str | None, Flag(metavar="WHEN")] = Field(
        default=None,
        description="Auto mode: when the dataset must be complete: an ISO 8601 time with its zone "
        "(2026-12-03T06:00:00+00:00) or a duration from the start (90m, 6h).",
    )
    deadline_margin: float = Field(
        default=0.25,
        ge=0,
        description="Auto mode: real time's estimated duration (replies at max_tokens, at the limits in force) is "
        "planned at x (1 + this).",
    )
    deadline_slack_s: float = Field(
        default=120.0,
        ge=0,
        description="Auto mode: seconds kept in hand besides, for the last replies, canceling the batches and "
        "writing the dataset.",
    )
    batch_retry: Literal["none", "batch", "realtime"] = Field(
        default="none",
        description="Batch mode: send expired or server-failed requests again in a follow-up batch or in real time.",
    )
    batch_poll_interval_s: float = Field(
        default=30.0, gt=0, description="Batch mode: the longest wait between two polls of a batch, in seconds."
    )
    work_pool: str | None = Field(
        default=None,
        description="Run each shard as a flow run on this Prefect work pool (any worker of the pool, on any "
        "machine, takes shards).",
    )
    shard_heartbeat_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="With a work pool: a running shard whose heartbeat stops this long is taken as lost with its "
        "worker and run again (it resumes).",
    )
    part_rows: int = Field(
        default=500,
        ge=1,
        description="With the output on object storage: a shard's results are uploaded as a new part every this "
        "many records (or part_seconds, whichever comes first); a container lost mid-shard loses at most that.",
    )
    part_seconds: float = Field(
        default=10.0, gt=0, description="With the output on object storage: the longest time between two parts."
    )
    storage_block: str | None = Field(
        default=None,
        description="A Prefect block by name (prefect-aws's S3Bucket) whose credentials reach URL inputs and "
        "outputs (default: the environment's, or --storage-options).",
    )
    fail_on_errors: bool = Field(
        default=False,
        description="End the flow run Failed when rows failed (default: Completed, its message saying how many).",
    )


# -- the command line, generated from the declarations ----------------------------------------------------


def flag_of(name: str, info: FieldInfo) -> Flag:
    for item in info.metadata:
        if isinstance(item, Flag):
            return item
    return Flag()


def _flag_name(name: str, flag: Flag) -> str:
    if flag.name:
        return flag.name
    stem = name[: -len("_s")] if name.endswith("_s") else name
    return "--" + stem.replace("_", "-")


def _value_type(annotation: Any) -> Any:
    """int, float, str or bool from an annotation such as `float | None`."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _value_type(get_args(annotation)[0])
    if origin is Union or (origin is not None and type(None) in get_args(annotation)):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return _value_type(kinds[0]) if len(kinds) == 1 else str
    if origin is Literal:
        return str
    return annotation if annotation in (int, float, str, bool) else str


def _typed(kind: Any, name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None

    convert.__name__ = name
    return convert


def _parsed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (OSError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def add_arguments(parser: argparse.ArgumentParser | Any, model: type[BaseModel], *, skip: tuple[str, ...] = ()) -> None:
    """A flag per field of `model`, with its help and default. Flags not given stay out of the namespace
    (see `explicit_options`): what the user did not type never overrides a block."""
    for name, info in model.model_fields.items():
        flag = flag_of(name, info)
        if flag.hidden or name in skip:
            continue
        option = _flag_name(name, flag)
        text = (info.description or "").rstrip(".")
        if flag.env:
            text += f" (env {flag.env})"
        kind = _value_type(info.annotation)
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if kind is bool:
            action = "store_false" if flag.negate else "store_true"
            parser.add_argument(option, action=action, help=text + ".", **common)
            continue
        if info.default is not None and not text.endswith(")"):
            text += f" (default {info.default})"
        choices = flag.choices
        if choices is None and get_origin(info.annotation) is Literal:
            choices = tuple(get_args(info.annotation))
        convert = _parsed(flag.parse) if flag.parse else _typed(kind, kind.__name__)
        if choices is not None:
            convert = str.lower if kind is str else convert
        metavar = flag.metavar or (None if choices else option.removeprefix("--").replace("-", "_").upper())
        parser.add_argument(option, type=convert, choices=choices, metavar=metavar, help=text + ".", **common)


def explicit_options(namespace: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` the command line set: only the flags the user typed."""
    given = vars(namespace)
    return {name: given[name] for name in model.model_fields if name in given}
