"""Prompt caching that really hits, tier presets, and estimates that learn (issue 5)."""

from __future__ import annotations

import json

import pytest

from conftest import MODEL
from prefect_anthropic import ClientSettings
from prefect_anthropic.api.tiers import limits_for_tier
from prefect_anthropic.dataset.estimate import estimate_file
from prefect_anthropic.engine import AnthropicClient, RateLimits, RequestItem, run_requests
from prefect_anthropic.orchestration.flows import generate_dataset


def shared_prompt(k: int, words: int = 350) -> str:
    return f"Reference document {k}. " + " ".join(
        f"Section {k}-{i} explains one more detail." for i in range(words // 6)
    )


def cached_body(k: int, question: str, *, words: int = 2400, marks: int = 1, model: str = MODEL) -> dict:
    blocks = [{"type": "text", "text": shared_prompt(k, words)}]
    blocks += [{"type": "text", "text": f"part {j}"} for j in range(marks - 1)]
    for block in blocks[-marks:]:
        block["cache_control"] = {"type": "ephemeral"}
    return {"model": model, "max_tokens": 20, "system": blocks, "messages": [{"role": "user", "content": question}]}


def write_cached_requests(path, prefixes: int, per_prefix: int):
    with open(path, "w") as handle:
        for i in range(prefixes * per_prefix):
            handle.write(json.dumps(cached_body(i % prefixes, f"Question {i}")) + "\n")
    return path


@pytest.mark.usefixtures("prefect_server")
async def test_warm_up_writes_each_prefix_once_and_every_row_reads(start_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-cache")
    requests = write_cached_requests(tmp_path / "requests.jsonl", prefixes=10, per_prefix=10)
    results = {}
    for use_caching in (True, False):
        # Replies of 1 s: the 50 requests of a burst are all sent before the first write can be read, however
        # busy the machine (with 100 ms, a loaded machine sent them far enough apart that some read).
        emu = start_emulator(latency_ms=1000)
        # A fixed window: without warm-up, 50 requests go out together (the adaptive window would start
        # with 8 and so write less, but a burst is the case warm-up is for).
        settings = ClientSettings(
            base_url=emu.base_url, max_concurrency=50, use_caching=use_caching, adaptive_concurrency=False
        )
        out = tmp_path / f"out-{use_caching}"
        summary = await generate_dataset(str(requests), str(out), settings=settings, shard_size=100)
        import pandas as pd

        results[use_caching] = (summary, pd.read_parquet(out / "results.parquet"), emu.stats())

    summary, frame, ledger = results[True]
    assert summary["succeeded"] == 100 and summary["cache_prewarm_requests"] == 10
    assert (frame["cache_read_input_tokens"] > 2048).all() and (frame["cache_creation_input_tokens"] == 0).all()
    assert (
        ledger["cache_creation_input_tokens"]
        == frame["cache_read_input_tokens"].groupby(frame["line"] % 10).first().sum()
    )  # exactly one write per prefix, all by the pre-warm requests
    assert summary["cache_hit_rate"] > 0.9
    assert summary["cost_usd"] < summary["cost_usd_without_caching"] and summary["saved_by_caching_usd"] > 0
    assert summary["cost_usd"] == pytest.approx(ledger["cost_usd"], rel=1e-5)  # pre-warm requests are counted

    cold_summary, cold_frame, _ = results[False]
    # Without warm-up, requests fired together all miss and all pay the write.
    assert (cold_frame["cache_creation_input_tokens"] > 0).sum() > 30
    assert cold_summary["cost_usd"] > summary["cost_usd"]


def items_for(prefix: int, count: int, start: int = 1, **options):
    return [
        RequestItem(line=i, custom_id=f"r{i}", body=cached_body(prefix, f"Q{i}", **options))
        for i in range(start, start + count)
    ]


async def test_an_expired_prefix_is_warmed_again(emulator):
    async with AnthropicClient("k", base_url=emulator.base_url, use_caching=True, max_concurrency=10) as client:
        first = []
        await run_requests(client, items_for(1, 8), on_record=first.append)
        assert client.stats.prewarm_requests == 1
        emulator.advance(400)  # past the 5 minute TTL on the server...
        for entry in client.warmer._entries.values():  # ...and on the client's clock
            entry.last_used -= 400
        second = []
        await run_requests(client, items_for(1, 8, start=9), on_record=second.append)
    assert client.stats.prewarm_requests == 2
    assert all(r.cache_read_input_tokens > 0 and r.cache_creation_input_tokens == 0 for r in first + second)


async def test_warnings_short_prefix_too_many_breakpoints_and_no_reads(emulator):
    async with AnthropicClient("k", base_url=emulator.base_url, use_caching=True) as client:
        await run_requests(client, items_for(2, 3, words=60))  # ~100 tokens: far below 1,024
        assert client.stats.prewarm_requests == 0
        assert any("shorter than the model's minimum cacheable length" in w for w in client.warnings)

        records = []
        await run_requests(client, items_for(3, 2, start=10, marks=5), on_record=records.append)
        assert any("5 cache_control breakpoints" in w for w in client.warnings)
        assert all(r.error_type == "invalid_request_error" for r in records)

        # Long in cl100k tokens (so it is warmed) but short in the server's count: it never caches.
        odd = " ".join(["aaaaaa"] * 900)
        body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "q"}],
                "system": [{"type": "text", "text": odd, "cache_control": {"type": "ephemeral"}}]}  # fmt: skip
        await run_requests(client, [RequestItem(line=20 + i, custom_id=str(i), body=body) for i in range(4)])
        assert any("cache reads stay at zero" in w for w in client.warnings)


async def test_auto_cache_marks_a_shared_long_system_prompt(emulator):
    prompt = shared_prompt(7, 2400)
    work = [
        RequestItem(line=i, custom_id=str(i), body={"model": MODEL, "max_tokens": 10, "system": prompt,
                                                    "messages": [{"role": "user", "content": f"q{i}"}]})
        for i in range(1, 13)
    ]  # fmt: skip
    records = []
    async with AnthropicClient("k", base_url=emulator.base_url, auto_cache=True, max_concurrency=4) as client:
        await run_requests(client, work, on_record=records.append)
    records.sort(key=lambda r: r.line)
    # The first request is not yet known to be shared: sent as it is. From the second on, a breakpoint is
    # added, one pre-warm writes the cache, and every later request reads it.
    assert records[0].cache_read_input_tokens == 0 and records[0].cache_creation_input_tokens == 0
    assert all(r.cache_read_input_tokens > 2048 for r in records[1:])
    assert client.stats.prewarm_requests == 1


def test_tier_presets_and_overrides():
    assert limits_for_tier("1")("sonnet-4") == RateLimits(50, 30_000, 8_000)
    assert limits_for_tier("tier 4")("haiku-4-5") == RateLimits(4_000, 4_000_000, 800_000)
    assert limits_for_tier("build")("opus-4") == RateLimits(5_000, 5_000_000, 1_000_000)
    assert limits_for_tier("2", requests_per_minute=10)("sonnet-4") == RateLimits(10, 450_000, 90_000)
    assert limits_for_tier(None)("sonnet-4") == RateLimits()
    assert limits_for_tier(None, output_tokens_per_minute=5)("sonnet-4") == RateLimits(None, None, 5)
    assert limits_for_tier("3", share=0.25)("sonnet-4") == RateLimits(500, 200_000, 40_000)
    with pytest.raises(ValueError, match="unknown tier"):
        limits_for_tier("platinum")


async def test_tier_auto_adopts_the_servers_limits(start_emulator):
    emu = start_emulator(requests_per_minute=3000, input_tokens_per_minute=900_000)
    client = AnthropicClient("k", ClientSettings(base_url=emu.base_url, tier="auto"))
    async with client:
        await run_requests(client, items_for(4, 3, words=30))
        limits = client.limits_in_force()["sonnet-4"]
    assert limits.requests_per_minute == 3000 and limits.input_tokens_per_minute == 900_000
    assert limits.output_tokens_per_minute == 8_000  # not reported by this server: Tier 1's stays

    # One of two machines on the same account takes half of what the server reports.
    half = AnthropicClient("k", ClientSettings(base_url=emu.base_url, tier="auto", limit_share=0.5))
    async with half:
        await run_requests(half, items_for(4, 2, words=30))
    assert half.limits_in_force()["sonnet-4"].requests_per_minute == 1500


@pytest.mark.usefixtures("prefect_server")
async def test_estimate_uses_the_correction_a_previous_run_learned(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_ANTHROPIC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-k")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "".join(
            json.dumps(
                {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": shared_prompt(i, 120)}]}
            )
            + "\n"
            for i in range(60)
        )
    )
    before = estimate_file(requests)
    assert before["token_corrections_used"] == {}
    summary = await generate_dataset(
        str(requests), str(tmp_path / "out"), settings=ClientSettings(base_url=emulator.base_url)
    )
    after = estimate_file(requests)
    assert MODEL in after["token_corrections_used"]
    real = summary["real_input_tokens"]
    assert abs(after["input_tokens"] - real) / real < 0.05
    assert abs(after["input_tokens"] - real) < abs(before["input_tokens"] - real)
