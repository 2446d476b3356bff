"""Prefect blocks: credentials, and the client configuration that builds the rate-limited client."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from .engine import AnthropicClient
from .engine.client import DEFAULT_ANTHROPIC_VERSION, DEFAULT_BASE_URL
from .settings import ClientSettings, api_key_from_env, shared_client

__all__ = ["AnthropicClientConfig", "AnthropicCredentials"]

_LOGO = HttpUrl("https://upload.wikimedia.org/wikipedia/commons/7/78/Anthropic_logo.svg")
_DOCS = HttpUrl("https://github.com/prefect-anthropic/prefect-anthropic#configuration")


class AnthropicCredentials(Block):
    """Credentials for the Anthropic API: the key, the base URL and the API version.

    Example:
        Load saved credentials:
        ```python
        from prefect_anthropic import AnthropicCredentials

        credentials = AnthropicCredentials.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Anthropic Credentials"
    _logo_url = _LOGO
    _documentation_url = _DOCS

    api_key: SecretStr = Field(default=..., description="The Anthropic API key.")
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="API base URL: Anthropic's, or an emulator's or gateway's.",
    )
    anthropic_version: str = Field(default=DEFAULT_ANTHROPIC_VERSION, description="The anthropic-version header.")


class AnthropicClientConfig(Block):
    """Rate limits and concurrency for Anthropic requests; builds the rate-limited client.

    Limits come from a usage tier preset (1-4, start, build, scale, or auto to adopt the server's) or
    explicitly; explicit limits win. Every task of a process that gets its client from the same
    configuration shares one set of limiters, so shards running side by side stay within the limits.

    Example:
        Load a saved configuration and build its client:
        ```python
        from prefect_anthropic import AnthropicClientConfig

        config = AnthropicClientConfig.load("BLOCK_NAME")
        client = config.get_client()
        ```
    """

    _block_type_name = "Anthropic Client Config"
    _logo_url = _LOGO
    _documentation_url = _DOCS

    credentials: AnthropicCredentials = Field(default=..., description="Credentials to send requests with.")
    tier: str | None = Field(default=None, description="Usage tier preset: 1, 2, 3, 4, start, build, scale or auto.")
    requests_per_minute: float | None = Field(default=None, description="Requests per minute (overrides the tier).")
    input_tokens_per_minute: float | None = Field(
        default=None, description="Input tokens per minute (overrides the tier)."
    )
    output_tokens_per_minute: float | None = Field(
        default=None, description="Output tokens per minute (overrides the tier)."
    )
    max_concurrency: int = Field(default=50, description="Most requests in flight at once.")
    max_attempts: int = Field(default=5, description="Attempts per request, the first included.")
    timeout_s: float = Field(default=600.0, description="Timeout of one HTTP request, in seconds.")
    anthropic_version: str | None = Field(
        default=None, description="API version, overriding the credentials' (2023-06-01 or 2026-10-21)."
    )
    drop_unsupported_params: bool = Field(
        default=False, description="Send lines without the sampling parameters their model or API version rejects."
    )
    models_file: str | None = Field(
        default=None, description="A TOML file adding or overriding model table entries, readable by the workers."
    )
    limiter_url: str | None = Field(
        default=None,
        description="redis://HOST:PORT/DB: one set of limits for every process and machine on the account "
        "(Redis password from PREFECT_ANTHROPIC_REDIS_PASSWORD).",
    )
    limiter_block: str | None = Field(
        default=None, description="Instead of limiter_url: a prefect-redis RedisDatabase block by name."
    )
    shared_max_concurrency: int | None = Field(
        default=None, description="With limiter_url: most requests in flight across every process."
    )

    def settings(self) -> ClientSettings:
        """The configuration without the key: safe to pass as a parameter or log."""
        return ClientSettings(
            base_url=self.credentials.base_url,
            anthropic_version=self.anthropic_version or self.credentials.anthropic_version,
            drop_unsupported_params=self.drop_unsupported_params,
            models_file=self.models_file,
            tier=self.tier,
            requests_per_minute=self.requests_per_minute,
            input_tokens_per_minute=self.input_tokens_per_minute,
            output_tokens_per_minute=self.output_tokens_per_minute,
            max_concurrency=self.max_concurrency,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
            limiter_url=self.limiter_url,
            limiter_block=self.limiter_block,
            shared_max_concurrency=self.shared_max_concurrency,
        )

    def get_client(self) -> AnthropicClient:
        """The shared rate-limited client for this configuration (call it inside the running event loop)."""
        return shared_client(self.settings(), self.credentials.api_key.get_secret_value())


async def resolve_api_key(client_block: str | None = None, credentials_block: str | None = None) -> str:
    """The API key, from a saved client config or credentials block by name, else ANTHROPIC_API_KEY.

    Only names travel as parameters; the key itself is read here, where the client is built.
    """
    if client_block:
        config: AnthropicClientConfig = await AnthropicClientConfig.aload(client_block)
        return config.credentials.api_key.get_secret_value()
    if credentials_block:
        credentials: AnthropicCredentials = await AnthropicCredentials.aload(credentials_block)
        return credentials.api_key.get_secret_value()
    return api_key_from_env()
