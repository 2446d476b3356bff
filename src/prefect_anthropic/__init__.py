"""prefect-anthropic: Anthropic Messages API requests in, a dataset out, at the account's rate limits."""

from .blocks import AnthropicClientConfig, AnthropicCredentials
from .settings import ClientSettings, RunOptions

__version__ = "0.1.0"

__all__ = [
    "AnthropicClientConfig",
    "AnthropicCredentials",
    "ClientSettings",
    "RunOptions",
    "generate_dataset",
    "generate_dataset_from_table",
]


def __getattr__(name: str):
    # The flows import Prefect's engine: load them only when asked for.
    if name in ("generate_dataset", "generate_dataset_from_table"):
        from . import flows

        return getattr(flows, name)
    raise AttributeError(name)
