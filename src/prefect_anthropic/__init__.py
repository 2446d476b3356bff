"""prefect-anthropic: Anthropic Messages API requests in, a dataset out, at the account's rate limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
    from .dataset.shard_loop import run_dataset
    from .orchestration.blocks import AnthropicClientConfig, AnthropicCredentials
    from .orchestration.flows import generate_dataset, generate_dataset_from_table
    from .settings import ClientSettings, RunOptions

__version__ = "0.1.0"

__all__ = [
    "AnthropicClientConfig",
    "AnthropicCredentials",
    "ClientSettings",
    "RunOptions",
    "generate_dataset",
    "generate_dataset_from_table",
    "run_dataset",
]

# Where each public name lives. Loaded on first use: the blocks import Prefect and the flows its engine
# (1.5 s and more), which `prefect-anthropic --help`, `estimate` and a run without a Prefect server never need.
_EXPORTS = {
    "AnthropicClientConfig": "orchestration.blocks",
    "AnthropicCredentials": "orchestration.blocks",
    "ClientSettings": "settings",
    "RunOptions": "settings",
    "generate_dataset": "orchestration.flows",
    "generate_dataset_from_table": "orchestration.flows",
    "run_dataset": "dataset.shard_loop",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
