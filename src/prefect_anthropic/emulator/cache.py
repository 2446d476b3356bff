"""The emulator's prompt cache: entries written at cache_control breakpoints, readable once the writing
response has started, expiring after their TTL unless a hit refreshes them."""

from __future__ import annotations

from dataclasses import dataclass

from .prompt import TTL_SECONDS, ParsedRequest


@dataclass
class CacheEntry:
    ready_at: float
    expires_at: float
    ttl: str


@dataclass(frozen=True)
class CacheOutcome:
    read_tokens: int
    creation_tokens: int
    creation_1h_tokens: int


class PromptCache:
    def __init__(self, unknown_min_cacheable_tokens: int = 1024) -> None:
        self._entries: dict[tuple[str, bytes], CacheEntry] = {}
        self.unknown_min_cacheable_tokens = unknown_min_cacheable_tokens

    def _live_hit(self, scope: str, request: ParsedRequest, now: float) -> int:
        """Index of the last breakpoint whose prefix is cached and readable now, or -1."""
        for index in range(len(request.breakpoints) - 1, -1, -1):
            entry = self._entries.get((scope, request.breakpoints[index].prefix_hash))
            if entry is not None and entry.ready_at <= now < entry.expires_at:
                return index
        return -1

    def peek_read_tokens(self, scope: str, request: ParsedRequest, now: float) -> int:
        hit = self._live_hit(scope, request, now) if request.breakpoints else -1
        return request.breakpoints[hit].prefix_tokens if hit >= 0 else 0

    def lookup_and_write(self, scope: str, request: ParsedRequest, now: float, ready_at: float) -> CacheOutcome:
        """Read the longest live cached prefix, write the breakpoints after it; entries become readable
        at `ready_at`, the moment this request's response starts."""
        breakpoints = request.breakpoints
        if not breakpoints:
            return CacheOutcome(0, 0, 0)
        minimum = request.model.min_cacheable_tokens
        if minimum is None:
            minimum = self.unknown_min_cacheable_tokens
        hit = self._live_hit(scope, request, now)
        if hit >= 0:
            entry = self._entries[(scope, breakpoints[hit].prefix_hash)]
            entry.expires_at = now + TTL_SECONDS[entry.ttl]
        read = breakpoints[hit].prefix_tokens if hit >= 0 else 0
        written = written_1h = 0
        covered = read
        for bp in breakpoints[hit + 1 :]:
            if bp.prefix_tokens < minimum:
                continue  # too short to be cached: silently not cached
            segment = bp.prefix_tokens - covered
            written += segment
            if bp.ttl == "1h":
                written_1h += segment
            covered = bp.prefix_tokens
            key = (scope, bp.prefix_hash)
            existing = self._entries.get(key)
            if existing is None or existing.expires_at <= now:
                self._entries[key] = CacheEntry(ready_at, ready_at + TTL_SECONDS[bp.ttl], bp.ttl)
            else:
                existing.ready_at = min(existing.ready_at, ready_at)
        if len(self._entries) > 200_000:
            self._entries = {k: e for k, e in self._entries.items() if e.expires_at > now}
        return CacheOutcome(read, written, written_1h)

    def clear(self) -> None:
        self._entries.clear()
