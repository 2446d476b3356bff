"""Prompt caching: written on first use, read once the writing response has started, TTL refreshed on hits."""

from __future__ import annotations

import concurrent.futures

import httpx

from conftest import HEADERS

LONG = "This shared context is long enough to be cached by the model. " * 250  # ~3,500 tokens


def cached_body(question: str, ttl: str | None = None, text: str = LONG, model: str = "claude-sonnet-4-6") -> dict:
    control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {
        "model": model,
        "max_tokens": 10,
        "system": [{"type": "text", "text": text, "cache_control": control}],
        "messages": [{"role": "user", "content": question}],
    }


def usage(emu, body) -> dict:
    response = httpx.post(f"{emu.base_url}/v1/messages", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_first_use_writes_then_reads(emulator):
    first = usage(emulator, cached_body("a"))
    assert first["cache_creation_input_tokens"] > 2048 and first["cache_read_input_tokens"] == 0
    assert first["cache_creation"]["ephemeral_5m_input_tokens"] == first["cache_creation_input_tokens"]
    second = usage(emulator, cached_body("b"))
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    # input_tokens counts only what follows the breakpoint.
    assert second["input_tokens"] < 20


def test_one_hour_ttl_is_reported_apart(emulator):
    first = usage(emulator, cached_body("a", ttl="1h"))
    assert first["cache_creation"]["ephemeral_1h_input_tokens"] == first["cache_creation_input_tokens"] > 0


def test_parallel_requests_fired_together_all_miss(start_emulator):
    emu = start_emulator(latency_ms=300)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda i: usage(emu, cached_body(f"q{i}")), range(5)))
    assert all(r["cache_creation_input_tokens"] > 0 and r["cache_read_input_tokens"] == 0 for r in results)
    assert usage(emu, cached_body("later"))["cache_read_input_tokens"] > 0


def test_entry_expires_after_ttl_and_hits_refresh_it(emulator):
    usage(emulator, cached_body("a"))
    emulator.advance(240)
    assert usage(emulator, cached_body("b"))["cache_read_input_tokens"] > 0  # hit at 4 min refreshes
    emulator.advance(240)
    assert usage(emulator, cached_body("c"))["cache_read_input_tokens"] > 0  # 4 min after the refresh
    emulator.advance(301)
    expired = usage(emulator, cached_body("d"))
    assert expired["cache_read_input_tokens"] == 0 and expired["cache_creation_input_tokens"] > 0


def test_one_hour_entries_outlive_five_minutes(emulator):
    usage(emulator, cached_body("a", ttl="1h"))
    emulator.advance(1800)
    assert usage(emulator, cached_body("b", ttl="1h"))["cache_read_input_tokens"] > 0


def test_prefix_below_the_minimum_is_silently_not_cached(emulator):
    short = "Too short to cache. " * 20
    for question in ("a", "b"):
        result = usage(emulator, cached_body(question, text=short))
        assert result["cache_creation_input_tokens"] == 0 and result["cache_read_input_tokens"] == 0
    # Haiku 4.5 needs 4,096 tokens: the ~3,500-token prefix that Sonnet 4.6 caches is not enough.
    result = usage(emulator, cached_body("a", model="claude-haiku-4-5"))
    assert result["cache_creation_input_tokens"] == 0


def test_a_change_in_the_prefix_misses(emulator):
    usage(emulator, cached_body("a"))
    changed = usage(emulator, cached_body("a", text=LONG + " changed"))
    assert changed["cache_read_input_tokens"] == 0 and changed["cache_creation_input_tokens"] > 0


def test_prewarm_with_max_tokens_zero(emulator):
    warm = {**cached_body("ignored"), "max_tokens": 0}
    written = usage(emulator, warm)
    assert written["cache_creation_input_tokens"] > 0 and written["output_tokens"] == 0
    assert usage(emulator, cached_body("real question"))["cache_read_input_tokens"] > 0


def test_longest_cached_breakpoint_is_read_and_the_rest_written(emulator):
    tools = [
        {
            "name": "lookup",
            "description": "Look things up. " * 800,
            "input_schema": {"type": "object"},
            "cache_control": {"type": "ephemeral"},
        }
    ]
    body = {**cached_body("q"), "tools": tools}
    usage(emulator, {**cached_body("q"), "tools": tools[:1]} | {"system": "plain system"})
    both = usage(emulator, body)
    assert both["cache_read_input_tokens"] > 0  # the tools prefix was cached by the first request
    assert both["cache_creation_input_tokens"] > 0  # the system block after it is written now
