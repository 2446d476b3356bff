"""A local emulator of the Anthropic API: validation, errors, rate limits, prompt caching, batches,
fault injection and a ledger of what was billed. Every test and benchmark of the project talks to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .config import EmulatorConfig

if TYPE_CHECKING:
    from .app import create_app
    from .server import RunningEmulator, emulator_in_thread, emulator_process, serve

__all__ = ["EmulatorConfig", "RunningEmulator", "create_app", "emulator_in_thread", "emulator_process", "serve"]

# The server's modules (Starlette, the engine's limiter, httpx) load on first use: the command line builds its
# `emulator` flags from EmulatorConfig at every start, `--help` included, and needs nothing else from here.
_EXPORTS = {
    "create_app": "app",
    "RunningEmulator": "server",
    "emulator_in_thread": "server",
    "emulator_process": "server",
    "serve": "server",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
