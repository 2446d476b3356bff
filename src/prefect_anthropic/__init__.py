"""prefect-anthropic: Anthropic Messages API requests in, a dataset out, at the account's rate limits."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blocks import AnthropicClientConfig, AnthropicCredentials
    from .flows import generate_dataset, generate_dataset_from_table
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

# Where each public name lives. Loaded on first use: the blocks import Prefect and the flows its engine
# (1.5 s and more), which `prefect-anthropic --help`, `estimate` and a run without a Prefect server never need.
_EXPORTS = {
    "AnthropicClientConfig": "blocks",
    "AnthropicCredentials": "blocks",
    "ClientSettings": "settings",
    "RunOptions": "settings",
    "generate_dataset": "flows",
    "generate_dataset_from_table": "flows",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
