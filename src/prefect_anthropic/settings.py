"""Client settings without secrets: what a flow run may carry as a parameter and show in the UI.

The API key is never part of them. It comes from the credentials block (by name) or from the
ANTHROPIC_API_KEY environment variable, and is resolved where the client is built.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, Field, field_validator

from .corrections import load_token_corrections
from .engine import AnthropicClient, InputTokenEstimator, RetryPolicy
from .engine.client import DEFAULT_ANTHROPIC_VERSION, DEFAULT_BASE_URL
from .models import use_models_file
from .request_rules import API_VERSIONS
from .schema import OutputSchema
from .tiers import TierLimits, limits_for_tier

__all__ = ["ClientSettings", "MissingAPIKeyError", "api_key_from_env", "shared_client"]

API_KEY_ENV = "ANTHROPIC_API_KEY"
LIMITER_URL_ENV = "PREFECT_ANTHROPIC_LIMITER_URL"
LIMITER_PASSWORD_ENV = "PREFECT_ANTHROPIC_REDIS_PASSWORD"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"


class MissingAPIKeyError(RuntimeError):
    pass


class ClientSettings(BaseModel):
    """How to reach the API and how fast to go. Every field has a safe default."""

    base_url: str = Field(default=DEFAULT_BASE_URL, description="API base URL (the emulator's, or a gateway's).")
    anthropic_version: str = Field(
        default=DEFAULT_ANTHROPIC_VERSION,
        description=f"API version (anthropic-version header): {' or '.join(API_VERSIONS)}.",
    )
    tier: str | None = Field(default=None, description="Usage tier preset: 1-4, start, build, scale or auto.")
    requests_per_minute: float | None = Field(default=None, gt=0, description="Requests per minute.")
    input_tokens_per_minute: float | None = Field(default=None, gt=0, description="Input tokens per minute.")
    output_tokens_per_minute: float | None = Field(default=None, gt=0, description="Output tokens per minute.")
    limit_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of the account's limits this run may use (e.g. 0.25 for one of four machines).",
    )
    max_concurrency: int = Field(default=50, ge=1, description="Most requests in flight at once.")
    max_attempts: int = Field(default=5, ge=1, description="Attempts per request, the first included.")
    timeout_s: float = Field(default=600.0, gt=0, description="Timeout of one HTTP request, in seconds.")
    include_request: bool = Field(default=False, description="Keep each request body in the results.")
    use_caching: bool = Field(
        default=False, description="Warm each shared cached prefix once before sending the requests that share it."
    )
    auto_cache: bool = Field(
        default=False, description="Add a cache breakpoint to a long system prompt that several requests share."
    )
    drop_unsupported_params: bool = Field(
        default=False,
        description="Send lines without the sampling parameters their model or the API version rejects "
        "(otherwise such lines are error rows, never sent).",
    )
    models_file: str | None = Field(
        default=None, description="A TOML file adding or overriding entries of the model table (prices, limits)."
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON schema every reply must match (structured outputs; a Pydantic model class is "
        "accepted and converted). Its fields become the typed `parsed` column.",
    )
    max_cost_usd: float | None = Field(
        default=None,
        gt=0,
        description="Hard spending limit in dollars for the output directory's dataset: a request whose worst "
        "case would cross it is not sent.",
    )
    adaptive_concurrency: bool = Field(
        default=True,
        description="Adapt the requests in flight per limit class to overload (529, 503, resets): shrink "
        "multiplicatively, grow additively up to max_concurrency.",
    )
    give_up_after_s: float = Field(
        default=300.0,
        gt=0,
        description="Stop the run (resumable) when nothing of a limit class succeeded for this many seconds "
        "while requests kept failing with retryable errors.",
    )
    validation_retries: int = Field(
        default=2, ge=0, description="Times a reply that does not match the schema is asked for again."
    )
    limiter_url: str | None = Field(
        default=None,
        description="redis://HOST:PORT/DB: share the account's limits with every process and machine that uses "
        f"the same Redis (its password from {LIMITER_PASSWORD_ENV}, never in this URL).",
    )
    limiter_block: str | None = Field(
        default=None,
        description="Instead of limiter_url: the name of a prefect-redis RedisDatabase block (host, port, db, "
        "username, password, ssl), read by each process where it runs.",
    )
    shared_max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="With limiter_url: most requests in flight across every process on the account (leases "
        "that expire when a process dies).",
    )

    @field_validator("limiter_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"limiter_url must be redis://HOST:PORT/DB (or rediss://, unix://), got {url!r}")
        if parts.password:
            raise ValueError(f"put the Redis password in {LIMITER_PASSWORD_ENV}, not in limiter_url")
        return url

    @field_validator("output_schema", mode="before")
    @classmethod
    def _schema_from_model(cls, schema: Any) -> Any:
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            return schema.model_json_schema()
        return schema

    @field_validator("output_schema")
    @classmethod
    def _schema_the_api_takes(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            OutputSchema(schema)  # raises SchemaError naming the keyword the API cannot take
        return schema

    @field_validator("anthropic_version")
    @classmethod
    def _known_version(cls, version: str) -> str:
        if version not in API_VERSIONS:
            raise ValueError(f"unknown API version {version!r}; choose one of {', '.join(API_VERSIONS)}")
        return version

    @field_validator("tier")
    @classmethod
    def _known_tier(cls, tier: str | None) -> str | None:
        if tier is not None:
            limits_for_tier(tier)  # raises on an unknown name
        return tier

    def limits(self) -> TierLimits:
        """The limits of each limit class under these settings."""
        return limits_for_tier(
            self.tier,
            requests_per_minute=self.requests_per_minute,
            input_tokens_per_minute=self.input_tokens_per_minute,
            output_tokens_per_minute=self.output_tokens_per_minute,
            share=self.limit_share,
        )

    def build_client(self, api_key: str) -> AnthropicClient:
        if not api_key:
            raise MissingAPIKeyError(
                f"No Anthropic API key: set {API_KEY_ENV}, pass --api-key, or name an AnthropicCredentials block."
            )
        if self.models_file:
            use_models_file(self.models_file)
        limits = self.limits()
        return AnthropicClient(
            api_key,
            base_url=self.base_url,
            anthropic_version=self.anthropic_version,
            limits=limits,
            adopt_server_limits=limits.adopts_server_limits,
            server_limit_share=self.limit_share,
            max_concurrency=self.max_concurrency,
            retry=RetryPolicy(max_attempts=self.max_attempts),
            timeout=self.timeout_s,
            include_request=self.include_request,
            warm_cache=self.use_caching,
            auto_cache=self.auto_cache,
            drop_unsupported_params=self.drop_unsupported_params,
            output_schema=OutputSchema(self.output_schema) if self.output_schema is not None else None,
            validation_retries=self.validation_retries,
            max_cost_usd=self.max_cost_usd,
            adaptive_concurrency=self.adaptive_concurrency,
            give_up_after_s=self.give_up_after_s,
            input_estimator=InputTokenEstimator(initial_ratios=load_token_corrections()),
            limiter_url=with_redis_password(self.limiter_url),
            limiter_block=self.limiter_block,
            shared_max_concurrency=self.shared_max_concurrency,
        )


def with_redis_password(url: str | None) -> str | None:
    """The Redis URL with the password from the environment (it never travels in settings)."""
    password = os.environ.get(LIMITER_PASSWORD_ENV)
    if url is None or not password:
        return url
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username or ''}:{quote(password, safe='')}@{parts.netloc}").geturl()


def api_key_from_env() -> str:
    return os.environ.get(API_KEY_ENV, "")


_CLIENTS: dict[tuple[str, str, int], AnthropicClient] = {}


def shared_client(settings: ClientSettings, api_key: str) -> AnthropicClient:
    """One client per settings, key and event loop in this process.

    Every shard task of a flow run awaits on the flow's loop, so they all get the same client: one set of
    limiters and one concurrency cap hold for all of them together, as the account's limits do.
    """
    loop_id = id(asyncio.get_running_loop())
    key_digest = hashlib.sha256(api_key.encode()).hexdigest()
    cache_key = (settings.model_dump_json(), key_digest, loop_id)
    client = _CLIENTS.get(cache_key)
    if client is None:
        client = _CLIENTS[cache_key] = settings.build_client(api_key)
    return client


async def close_shared_clients() -> None:
    """Close the clients of the running loop (at the end of a flow run)."""
    loop_id = id(asyncio.get_running_loop())
    for cache_key in [k for k in _CLIENTS if k[2] == loop_id]:
        await _CLIENTS.pop(cache_key).aclose()
