"""The engine end to end, over real HTTP against the emulator."""

from __future__ import annotations

import time

import pytest

from conftest import MODEL
from prefect_anthropic.engine import (
    AnthropicClient,
    AuthenticationError,
    BillingError,
    PermissionDeniedError,
    RateLimits,
    RequestItem,
    ResultsWriter,
    RetryPolicy,
    SpendLimitReachedError,
    read_records,
    run_requests,
    succeeded_lines,
)


def items(n, start=1, text="What is {i} times 8?", max_tokens=50, model=MODEL):
    return [
        RequestItem(
            line=i,
            custom_id=f"row-{i}",
            body={
                "model": model,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": text.format(i=i)}],
            },
            metadata={"row": i},
        )
        for i in range(start, start + n)
    ]


def client_for(emu, **options) -> AnthropicClient:
    options.setdefault("retry", RetryPolicy(max_attempts=5, initial_delay_s=0.05, max_delay_s=0.2))
    return AnthropicClient("test-key", base_url=emu.base_url, seed=1, **options)


async def run(emu, work, **options):
    records = []
    async with client_for(emu, **options) as client:
        progress = await run_requests(client, work, on_record=records.append)
    return progress, sorted(records, key=lambda r: r.line), client


async def test_every_request_lands_on_its_own_row(emulator):
    progress, records, _ = await run(emulator, items(200), max_concurrency=20)
    assert progress.succeeded == 200 and progress.failed == 0
    assert [r.line for r in records] == list(range(1, 201))
    for record in records:
        assert record.text == f"echo: What is {record.line} times 8?"
        assert record.custom_id == f"row-{record.line}" and record.metadata == {"row": record.line}
        assert record.input_tokens > 0 and record.cost_usd > 0 and record.attempts == 1
        assert record.model == "claude-sonnet-4-6" and record.stop_reason == "end_turn"
    stats = emulator.stats()
    assert stats["billed_requests"] == 200 and stats["duplicate_billed_requests"] == 0
    assert progress.cost_usd == pytest.approx(stats["cost_usd"], rel=1e-4)


async def test_invalid_items_and_client_errors_become_error_rows_without_retry(emulator):
    work = items(3)
    work.append(RequestItem(line=4, custom_id="row-4", body={}, invalid="line 4: invalid JSON"))
    work.append(RequestItem(line=5, custom_id="row-5", body={**work[0].body, "model": "claude-nope"}))
    work.append(RequestItem(line=6, custom_id="row-6", body={**work[0].body, "temperature": 3}))
    progress, records, _ = await run(emulator, work)
    by_line = {r.line: r for r in records}
    assert by_line[4].status == "errored" and by_line[4].error_type == "invalid_request" and by_line[4].attempts == 0
    assert by_line[5].error_type == "not_found_error" and by_line[5].http_status == 404 and by_line[5].attempts == 1
    assert by_line[6].error_type == "invalid_request_error" and by_line[6].attempts == 1
    assert progress.succeeded == 3 and progress.errors_by_type["not_found_error"] == 1
    assert emulator.stats()["requests_total"] == 5  # the invalid line was never sent


async def test_transient_faults_are_retried_until_success(start_emulator):
    emu = start_emulator(seed=4, error_rate_429=0.1, error_rate_529=0.1, error_rate_500=0.1, fault_retry_after_s=0)
    progress, records, client = await run(emu, items(150), retry=RetryPolicy(10, 0.01, 0.05), max_concurrency=10)
    assert progress.succeeded == 150
    assert any(r.attempts > 1 for r in records)
    assert client.stats.retries > 0 and client.stats.rate_limited > 0
    assert emu.stats()["billed_requests"] == 150  # errors were not billed, success once each


async def test_faults_outlasting_max_attempts_end_as_error_rows(start_emulator):
    emu = start_emulator(error_rate_529=1.0)
    progress, records, _ = await run(emu, items(5), retry=RetryPolicy(3, 0.01, 0.02))
    assert progress.failed == 5
    assert all(r.error_type == "overloaded_error" and r.attempts == 3 and len(r.errors) == 3 for r in records)


async def test_dropped_and_stalled_responses_are_retried(start_emulator):
    emu = start_emulator(seed=9, drop_rate=0.2, stall_rate=0.1, stall_s=3)
    progress, _, client = await run(emu, items(60), retry=RetryPolicy(8, 0.01, 0.05), timeout_s=0.5, max_concurrency=10)
    assert progress.succeeded == 60
    assert client.stats.connection_errors > 0


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"api_key": "the-only-key"}, AuthenticationError),
        ({"billing_error": True}, BillingError),
        ({"permission_error": True}, PermissionDeniedError),
    ],
)
async def test_fatal_errors_stop_the_run_at_once(start_emulator, options, error):
    emu = start_emulator(latency_ms=20, **options)
    async with client_for(emu, max_concurrency=8) as client:
        with pytest.raises(error) as caught:
            await run_requests(client, items(1000))
    assert emu.stats()["requests_total"] <= 8 + 1  # at most what was in flight
    assert caught.value.hint in str(caught.value)


async def test_spend_cap_stops_the_run(start_emulator):
    emu = start_emulator(spend_limit_usd=0.001)
    async with client_for(emu, max_concurrency=4) as client:
        with pytest.raises(SpendLimitReachedError):
            await run_requests(client, items(1000))
    assert emu.stats()["requests_total"] < 100


async def test_resume_skips_what_succeeded_and_bills_nothing_twice(emulator, tmp_path):
    results = tmp_path / "results.jsonl"
    work = items(100)
    async with client_for(emulator) as client:
        with ResultsWriter(results) as writer:
            await run_requests(client, work[:60], writer=writer)
    # Simulate a crash mid-write: a torn last line.
    with open(results, "ab") as handle:
        handle.write(b'{"line": 61, "status": "succ')
    done = succeeded_lines(results)
    assert len(done) == 60
    async with client_for(emulator) as client:
        with ResultsWriter(results) as writer:
            progress = await run_requests(client, work, writer=writer, already_succeeded=done)
    assert progress.skipped == 60 and progress.succeeded == 40
    lines = sorted(r["line"] for r in read_records(results))
    assert lines == list(range(1, 101))
    stats = emulator.stats()
    assert stats["billed_requests"] == 100 and stats["duplicate_billed_requests"] == 0


async def test_requests_are_paced_at_the_limit_without_429s(start_emulator):
    emu = start_emulator(requests_per_minute=1200, burst_seconds=1)  # 20/s, server burst 1 s
    started = time.monotonic()
    progress, _, client = await run(emu, items(60), limits=RateLimits(requests_per_minute=1200), max_concurrency=20)
    elapsed = time.monotonic() - started
    assert progress.succeeded == 60 and client.stats.rate_limited == 0
    assert 2.4 <= elapsed <= 4.0  # (60 - 1) / 20 per second = 2.95 s


async def test_configured_limits_above_the_servers_are_lowered_by_its_headers(start_emulator):
    emu = start_emulator(requests_per_minute=600, burst_seconds=2)  # 10/s
    started = time.monotonic()
    progress, _, client = await run(emu, items(40), limits=RateLimits(requests_per_minute=1200), max_concurrency=20)
    elapsed = time.monotonic() - started
    assert progress.succeeded == 40
    assert client.limits_in_force()["sonnet-4"].requests_per_minute == 600
    assert client.stats.rate_limited <= 2  # no storm
    assert elapsed >= 3.0


async def test_output_is_paced_by_real_output_not_max_tokens(start_emulator):
    emu = start_emulator(output_tokens_per_minute=6000, burst_seconds=2)  # 100 output tokens/s
    work = items(50, text="one two three four five six seven eight", max_tokens=8000)  # ~12 tokens real output
    started = time.monotonic()
    progress, records, client = await run(emu, work, limits=RateLimits(output_tokens_per_minute=6000))
    elapsed = time.monotonic() - started
    total_output = sum(r.output_tokens for r in records)
    assert progress.succeeded == 50 and client.stats.rate_limited <= 1
    # Reserving max_tokens (8,000) for each would take 50 x 80 s; real output (~600 tokens) takes ~6 s.
    assert elapsed < 2 * total_output / 100 + 2


async def test_estimates_converge_on_the_servers_counts(emulator):
    text = "Summarise the following customer review in one sentence: the product arrived late, number {i}, but works."
    _, records, _client = await run(emulator, items(120, text=text), max_concurrency=1)
    later = records[50:]
    errors = [abs(r.estimated_input_tokens - r.input_tokens) / r.input_tokens for r in later]
    assert sum(errors) / len(errors) <= 0.05


async def test_progress_is_reported(emulator):
    snapshots = []
    async with client_for(emulator) as client:
        final = await run_requests(client, items(30), on_progress=snapshots.append, progress_interval_s=0.01)
    assert snapshots and snapshots[-1].done == 30 == final.done
    assert final.requests_per_minute > 0 and final.output_tokens > 0
