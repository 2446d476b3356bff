"""A local emulator of the Anthropic API: validation, errors, rate limits, prompt caching, batches,
fault injection and a ledger of what was billed. Every test and benchmark of the project talks to it."""

from .app import create_app
from .config import EmulatorConfig
from .server import RunningEmulator, emulator_in_thread, emulator_process, serve

__all__ = ["EmulatorConfig", "RunningEmulator", "create_app", "emulator_in_thread", "emulator_process", "serve"]
