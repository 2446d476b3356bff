"""prefect-anthropic: Anthropic Messages API requests in, a dataset out, at the account's rate limits."""

from .blocks import AnthropicClientConfig, AnthropicCredentials
from .settings import ClientSettings

__version__ = "0.1.0"

__all__ = ["AnthropicClientConfig", "AnthropicCredentials", "ClientSettings", "generate_dataset"]


def __getattr__(name: str):
    # The flow imports Prefect's engine: load it only when asked for.
    if name == "generate_dataset":
        from .flows import generate_dataset

        return generate_dataset
    raise AttributeError(name)
