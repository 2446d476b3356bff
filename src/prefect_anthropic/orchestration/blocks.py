"""Prefect blocks: credentials, and the client configuration that builds the rate-limited client."""

from __future__ import annotations

from abc import ABC
from typing import Any
from urllib.parse import quote

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, model_validator

from ..engine import AnthropicClient
from ..settings import DEFAULT_ANTHROPIC_VERSION, DEFAULT_BASE_URL, ClientSettings, MissingAPIKeyError, api_key_from_env

__all__ = [
    "AnthropicClientConfig",
    "AnthropicCredentials",
    "block_storage_options",
    "redis_url_from_block",
    "resolve_settings",
]


class _AnthropicBlock(Block, ABC):
    """What this package's blocks show alike in the UI: the logo and the documentation. An interface class
    (ABC): Prefect registers the blocks below, never this one."""

    _logo_url = HttpUrl("https://upload.wikimedia.org/wikipedia/commons/7/78/Anthropic_logo.svg")
    _documentation_url = HttpUrl("https://github.com/prefect-anthropic/prefect-anthropic#configuration")


class AnthropicCredentials(_AnthropicBlock):
    """Credentials for the Anthropic API: the key, the base URL and the API version.

    Example:
        Load saved credentials:
        ```python
        from prefect_anthropic import AnthropicCredentials

        credentials = AnthropicCredentials.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Anthropic Credentials"

    api_key: SecretStr = Field(default=..., description="The Anthropic API key.")
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="API base URL: Anthropic's, or an emulator's or gateway's.",
    )
    anthropic_version: str = Field(default=DEFAULT_ANTHROPIC_VERSION, description="The anthropic-version header.")


class AnthropicClientConfig(_AnthropicBlock):
    """Credentials and every client setting (`ClientSettings`: tier or explicit limits, concurrency,
    attempts, caching, budget, shared limiter...); builds the rate-limited client.

    Settings given to a run explicitly are laid over the block's; the block's credentials give the base
    URL and API version unless its settings name them.

    Example:
        Load a saved configuration and open its client:
        ```python
        from prefect_anthropic import AnthropicClientConfig

        config = AnthropicClientConfig.load("BLOCK_NAME")
        async with config.get_client() as client:
            ...
        ```
    """

    # Declared as AnthropicCredentials is (docstring, type name, fields): the shape of a block, no shared logic.
    _block_type_name = "Anthropic Client Config"

    credentials: AnthropicCredentials = Field(default=..., description="Credentials to send requests with.")
    settings: ClientSettings = Field(
        default_factory=ClientSettings,
        description="How requests are sent: limits, concurrency, attempts, caching, budget (no secrets).",
    )

    @model_validator(mode="before")
    @classmethod
    def _settings_given_flat(cls, data: Any) -> Any:
        """`AnthropicClientConfig(credentials=..., tier="2")` and blocks saved before settings were one field:
        the settings' fields given beside `credentials` go into `settings`."""
        if not isinstance(data, dict):
            return data
        flat = {name: data[name] for name in ClientSettings.model_fields if name in data}
        if not flat:
            return data
        rest = {key: value for key, value in data.items() if key not in flat}
        nested = rest.get("settings")
        if isinstance(nested, ClientSettings):
            rest["settings"] = nested.with_options(**flat)
        else:
            rest["settings"] = {**(nested or {}), **flat}
        return rest

    def client_settings(self, explicit: ClientSettings | None = None) -> ClientSettings:
        """The block's settings with `explicit`'s set fields over them; the credentials fill in the endpoint."""
        settings = explicit.merged_over(self.settings) if explicit is not None else self.settings
        return settings.filled_from(
            base_url=self.credentials.base_url, anthropic_version=self.credentials.anthropic_version
        )

    def get_client(self, **options: Any) -> AnthropicClient:
        """A new rate-limited client for this configuration, `options` over the block's settings (open it with
        `async with`; clients of one account in a process share its limiters and connections)."""
        settings = self.client_settings(ClientSettings(**options)) if options else self.client_settings()
        return AnthropicClient(self.credentials.api_key.get_secret_value(), settings)


async def resolve_settings(
    explicit: ClientSettings | None = None,
    client_block: str | None = None,
    credentials_block: str | None = None,
) -> tuple[ClientSettings, str]:
    """The settings a run uses and its API key: a client block's settings with the explicit ones over them
    (or the explicit ones alone), the endpoint from the credentials; the key from the client block, the
    credentials block, or ANTHROPIC_API_KEY. Only block names travel as parameters; the key is read here."""
    settings = explicit if explicit is not None else ClientSettings()
    if client_block:
        config: AnthropicClientConfig = await AnthropicClientConfig.aload(client_block)
        return config.client_settings(explicit), config.credentials.api_key.get_secret_value()
    if credentials_block:
        credentials: AnthropicCredentials = await AnthropicCredentials.aload(credentials_block)
        settings = settings.filled_from(base_url=credentials.base_url, anthropic_version=credentials.anthropic_version)
        return settings, credentials.api_key.get_secret_value()
    return settings, api_key_from_env()


def require_key(api_key: str) -> str:
    if not api_key:
        raise MissingAPIKeyError(
            "No Anthropic API key: set ANTHROPIC_API_KEY, pass --api-key, or name an AnthropicCredentials block."
        )
    return api_key


async def redis_url_from_block(name: str) -> str:
    """The URL (password included: never log it) of a prefect-redis `RedisDatabase` block, read from the
    Prefect API as a block document: prefect-redis itself need not be installed."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        document = await client.read_block_document_by_name(
            name, block_type_slug="redis-database", include_secrets=True
        )
    data = document.data

    def plain(value: Any) -> str:
        return str(value.get_secret_value() if hasattr(value, "get_secret_value") else value or "")

    username, password = plain(data.get("username")), plain(data.get("password"))
    auth = f"{quote(username, safe='')}:{quote(password, safe='')}@" if username or password else ""
    scheme = "rediss" if data.get("ssl") else "redis"
    return f"{scheme}://{auth}{data.get('host') or 'localhost'}:{data.get('port') or 6379}/{data.get('db') or 0}"


async def block_storage_options(name: str) -> dict[str, Any]:
    """Storage options from a Prefect block by name: prefect-aws's S3Bucket (its AwsCredentials and client
    parameters), read as a block document so that prefect-aws need not be installed here."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        document = await client.read_block_document_by_name(name, block_type_slug="s3-bucket", include_secrets=True)
    data = document.data

    def plain(value: Any) -> Any:
        return value.get_secret_value() if hasattr(value, "get_secret_value") else value

    credentials = data.get("credentials") or {}
    if hasattr(credentials, "data"):
        credentials = credentials.data
    options: dict[str, Any] = {}
    names = (("key", "aws_access_key_id"), ("secret", "aws_secret_access_key"), ("token", "aws_session_token"))
    for ours, theirs in names:
        if credentials.get(theirs):
            options[ours] = plain(credentials[theirs])
    client_kwargs: dict[str, Any] = {}
    if credentials.get("region_name"):
        client_kwargs["region_name"] = credentials["region_name"]
    parameters = credentials.get("aws_client_parameters") or {}
    if parameters.get("endpoint_url"):
        client_kwargs["endpoint_url"] = parameters["endpoint_url"]
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options
