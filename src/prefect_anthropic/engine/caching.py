"""Prompt-cache warm-up: one write per shared prefix, then everyone reads.

Anthropic makes a cache entry readable only once the response that writes it has started, so parallel
requests fired together all miss and all pay the write. With warm-up on, the first request of each
distinct cached prefix (everything up to the last `cache_control` breakpoint, in the API's order: tools,
system, messages) triggers one pre-warm request (`max_tokens: 0`: it writes the cache and produces
nothing), and the requests sharing that prefix wait for it. A prefix that may have expired (5 minute or 1
hour TTL since its last use) is warmed again. Requests without a breakpoint are never delayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..api.schema import output_format_of

__all__ = ["AutoCache", "CachedPrefix", "PrefixWarmer", "cached_prefix"]

logger = logging.getLogger(__name__)

MAX_BREAKPOINTS = 4
_TTL_S = {"5m": 300.0, "1h": 3600.0}
#: Re-warm a little before the TTL runs out: the clocks of client and server are not the same clock.
_TTL_MARGIN = 0.9


@dataclass(frozen=True)
class CachedPrefix:
    key: str
    ttl_s: float
    breakpoints: int
    #: The prefix's blocks, for estimating its length.
    blocks: tuple[Any, ...]


def _blocks_in_prefix_order(body: dict[str, Any]) -> list[Any]:
    blocks: list[Any] = list(body.get("tools") or ())
    system = body.get("system")
    if isinstance(system, list):
        blocks += system
    elif isinstance(system, str):
        blocks.append({"type": "text", "text": system})
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            blocks += [{"role": message.get("role"), **b} if isinstance(b, dict) else b for b in content]
        else:
            blocks.append({"role": message.get("role"), "type": "text", "text": content})
    return blocks


def cached_prefix(body: dict[str, Any]) -> CachedPrefix | None:
    """The prefix a request would cache, or None when it has no cache_control breakpoint.

    A top-level `cache_control` (automatic caching) is the breakpoint the API places on the last cacheable
    block; it counts among the 4. The output format is part of the prefix: changing it invalidates the cache.
    """
    blocks = _blocks_in_prefix_order(body)
    marked = [i for i, b in enumerate(blocks) if isinstance(b, dict) and b.get("cache_control")]
    automatic = body.get("cache_control")
    if automatic and blocks:
        if not marked or marked[-1] != len(blocks) - 1:
            marked.append(len(blocks) - 1)
        if not (isinstance(blocks[-1], dict) and blocks[-1].get("cache_control")):
            blocks[-1] = {**blocks[-1], "cache_control": automatic} if isinstance(blocks[-1], dict) else blocks[-1]
    if not marked:
        return None
    last = marked[-1]
    control = blocks[last].get("cache_control") if isinstance(blocks[last], dict) else None
    ttl = _TTL_S.get(control.get("ttl", "5m") if isinstance(control, dict) else "5m", 300.0)
    digest = hashlib.blake2b(str(body.get("model")).encode(), digest_size=16)
    fmt = output_format_of(body)
    if fmt is not None:
        digest.update(orjson.dumps(fmt, option=orjson.OPT_SORT_KEYS))
    digest.update(orjson.dumps(blocks[: last + 1], option=orjson.OPT_SORT_KEYS))
    return CachedPrefix(digest.hexdigest(), ttl, len(marked), tuple(blocks[: last + 1]))


@dataclass
class _Entry:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    warmed_at: float = 0.0
    last_used: float = 0.0
    ttl_s: float = 300.0
    cacheable: bool = True
    reads_seen: int = 0
    responses_seen: int = 0
    warned_no_reads: bool = False

    def fresh(self, now: float) -> bool:
        return self.ready.is_set() and now < self.last_used + self.ttl_s * _TTL_MARGIN


class PrefixWarmer:
    """Tracks the cached prefixes of one client and warms each once per TTL."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.warnings: list[str] = []
        self.prewarm_requests = 0

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning(message)

    async def before_send(
        self,
        prefix: CachedPrefix,
        prewarm: Callable[[], Awaitable[None]],
        estimated_prefix_tokens: int,
        min_tokens: int | None,
        model: str = "",
    ) -> None:
        """Wait until `prefix` is warm; the first caller warms it with `prewarm()` (an awaitable factory)."""
        if prefix.breakpoints > MAX_BREAKPOINTS:
            self.warn(
                f"A request has {prefix.breakpoints} cache_control breakpoints; the API accepts at most "
                f"{MAX_BREAKPOINTS} and rejects the request."
            )
            return
        entry = self._entries.get(prefix.key)
        now = time.monotonic()
        if entry is None:
            entry = self._entries[prefix.key] = _Entry(ttl_s=prefix.ttl_s)
            if min_tokens is None:
                self.warn(
                    f"The minimum cacheable length of {model or 'this model'} is not known (not published): a "
                    "prefix shorter than it is silently not cached, and this run cannot warn about it. Add "
                    "min_cacheable_tokens with --models-file once known."
                )
            elif estimated_prefix_tokens < min_tokens:
                entry.cacheable = False
                entry.ready.set()
                self.warn(
                    f"A cached prefix of about {estimated_prefix_tokens:,} tokens is shorter than the model's "
                    f"minimum cacheable length ({min_tokens:,}): it will silently not be cached."
                )
                return
        if not entry.cacheable:
            return
        if entry.fresh(now):
            entry.last_used = now
            return
        if entry.ready.is_set() or entry.warmed_at == 0.0:
            # First use, or the entry may have expired: this caller warms it; the others wait.
            entry.ready.clear()
            entry.warmed_at = now
            self.prewarm_requests += 1
            try:
                await prewarm()
            finally:
                entry.last_used = time.monotonic()
                entry.ready.set()
            return
        await entry.ready.wait()
        entry.last_used = time.monotonic()

    def observe(self, prefix: CachedPrefix, cache_read_tokens: int) -> None:
        """After a response: warn once if a warmed prefix is never read from the cache."""
        entry = self._entries.get(prefix.key)
        if entry is None or not entry.cacheable:
            return
        entry.responses_seen += 1
        entry.reads_seen += cache_read_tokens > 0
        if entry.responses_seen >= 3 and entry.reads_seen == 0 and not entry.warned_no_reads:
            entry.warned_no_reads = True
            self.warn(
                "Caching is on but cache reads stay at zero after warm-up: the cached prefix probably differs "
                "between requests (a timestamp or id before the breakpoint?) or is below the minimum length."
            )


class AutoCache:
    """Adds a cache breakpoint to a system prompt that several requests share, when it is long enough to
    be cached (`--auto-cache`). Requests that already carry a breakpoint are left as they are."""

    def __init__(self, max_tracked: int = 100_000) -> None:
        self._seen: dict[str, int] = {}
        self._max_tracked = max_tracked

    def apply(
        self, body: dict[str, Any], system_tokens: Callable[[list[Any]], int], min_tokens: int | None
    ) -> dict[str, Any]:
        system = body.get("system")
        if not system or cached_prefix(body) is not None:
            return body
        blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
        if not all(isinstance(b, dict) for b in blocks):
            return body
        key = hashlib.blake2b(orjson.dumps([body.get("model"), blocks]), digest_size=16).hexdigest()
        count = self._seen.get(key, 0) + 1
        if len(self._seen) < self._max_tracked or key in self._seen:
            self._seen[key] = count
        # Shared means seen before; a prompt below the model's minimum would silently not be cached anyway.
        if count < 2 or system_tokens(blocks) < (min_tokens or 0):
            return body
        blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
        return {**body, "system": blocks}
