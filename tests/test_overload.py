"""Under overload (issue 15): the concurrency window adapts to what the server takes, and a run gives up
cleanly, resumable, when nothing gets through."""

from __future__ import annotations

import asyncio
import json
import time

import pandas as pd
import pytest

from conftest import write_requests
from prefect_anthropic.cli import main
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, RequestItem, run_requests
from prefect_anthropic.engine.adaptive import AdaptiveWindow, CircuitBreaker
from prefect_anthropic.progress import RunProgress

MODEL = "claude-sonnet-5-5"


def items(n: int) -> list[RequestItem]:
    body = {"model": MODEL, "max_tokens": 20}
    return [
        RequestItem(line=i, custom_id=str(i), body={**body, "messages": [{"role": "user", "content": f"q {i}"}]})
        for i in range(1, n + 1)
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_window_starts_small_doubles_shrinks_once_per_round_trip_and_never_below_one():
    clock = Clock()
    window = AdaptiveWindow(100, clock=clock)
    assert window.size == 8
    for _ in range(8):
        window.on_success(0.2)
    assert window.size == 16  # slow start: +1 per reply, doubling each round trip
    window.in_flight = 16  # the answer said: 16 in flight is more than the server takes
    window.on_overload()
    window.in_flight = 15
    window.on_overload()  # the same burst: no second decrease
    assert window.size == 13 and not window.slow_start  # 15 at once, then a tenth less
    clock.now += 1.0
    window.in_flight = 13
    window.on_overload()
    assert window.size == 10  # 12, less a tenth
    for _ in range(11):
        window.on_success(0.2)
    assert window.size == 11  # additive increase: about one per round trip
    window.in_flight = 1
    for _ in range(40):
        clock.now += 1.0
        window.on_overload()
    assert window.size == 1 and window.minimum_seen == 1.0
    fixed = AdaptiveWindow(50, adaptive=False)
    fixed.on_overload()
    assert fixed.size == 50


def test_the_breaker_trips_only_after_the_whole_period_without_a_success():
    clock = Clock()
    breaker = CircuitBreaker(60, clock=clock)
    assert not breaker.on_failure("529 overloaded_error")
    clock.now = 59
    breaker.on_success()
    clock.now = 100
    assert not breaker.on_failure("503 api_error")
    clock.now = 161
    assert breaker.on_failure("529 overloaded_error") and "529 overloaded_error x1" in breaker.describe()


def test_the_bar_says_what_it_waits_for():
    progress = RunProgress(total_requests=10, waiting=lambda: "waiting: 529 overloaded_error, retry in 4 s")
    assert "waiting: 529 overloaded_error, retry in 4 s" in progress.headline()
    assert "ETA" in RunProgress(total_requests=10).headline()


async def test_against_a_server_that_takes_20_the_window_settles_near_20(caplog):
    latency = 0.2
    records = []
    # The emulator in its own process: the throughput measured is the client's, not a shared interpreter's.
    with emulator_process(capacity=20, latency_ms=latency * 1000, seed=3) as emu:
        async with AnthropicClient("k", base_url=emu.base_url, max_concurrency=100) as client:
            await run_requests(client, items(600), on_record=records.append)
        stats = emu.stats()
    assert len(records) == 600 and all(r.succeeded for r in records)
    responses = sum(stats["responses_by_status"].values())
    assert stats["responses_by_status"].get("529", 0) <= 0.10 * responses
    attempts = sorted(r.attempts for r in records)
    assert attempts[int(0.95 * len(attempts)) - 1] <= 2  # 95% of rows needed at most 2 attempts
    assert stats["max_in_flight"] <= 20
    throughput = 600 / (stats["last_request_at"] - stats["first_request_at"])
    # What 20 in flight allow, less the window's slow start and a busy CI machine (bench/adaptive_concurrency.py
    # measures the steady figure: 0.89).
    assert throughput >= 0.80 * 20 / latency, throughput
    assert client.concurrency()["concurrency_min"] < 100
    assert "Overloaded: requests in flight for sonnet-5-5 lowered to" in caplog.text  # the log says so


async def test_a_fixed_window_keeps_sending_into_the_overload(start_emulator):
    emu = start_emulator(capacity=20, latency_ms=100, seed=3)
    async with AnthropicClient("k", base_url=emu.base_url, max_concurrency=100, adaptive_concurrency=False) as client:
        await run_requests(client, items(200))
    assert emu.stats()["responses_by_status"].get("529", 0) > 0.2 * 200  # what the adaptive window avoids


async def test_the_client_reports_what_it_waits_on(start_emulator):
    emu = start_emulator(error_rate_529=1.0)
    async with AnthropicClient("k", base_url=emu.base_url, max_concurrency=4, give_up_after_s=3) as client:
        task = asyncio.create_task(run_requests(client, items(8)))
        seen = set()
        deadline = time.monotonic() + 20
        while not task.done() and time.monotonic() < deadline:
            if client.waiting:
                seen.add(client.waiting.split(",")[0])
            await asyncio.sleep(0.05)
        with pytest.raises(Exception, match="no request to the sonnet-5-5 models succeeded for 3 s"):
            await task
    assert "waiting: 529 overloaded_error" in seen


def test_nothing_gets_through_the_run_gives_up_then_resumes_on_a_healthy_server(
    prefect_server, start_emulator, tmp_path, capsys
):
    down = start_emulator(error_rate_529=1.0)
    requests = write_requests(tmp_path / "requests.jsonl", 40)
    out = tmp_path / "out"
    base = ["run", str(requests), "--output-dir", str(out), "--api-key", "sk-ant-fake-overload", "--no-progress"]
    started = time.monotonic()
    assert main([*base, "--base-url", down.base_url, "--give-up-after", "10"]) == 2
    assert time.monotonic() - started < 60  # shard retries do not restart the breaker
    error = capsys.readouterr().err
    assert "succeeded for 10 s" in error and "529 overloaded_error" in error and "Run the same command later" in error
    assert down.stats()["billed_requests"] == 0

    healthy = start_emulator()
    assert main([*base, "--base-url", healthy.base_url]) == 0
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 40 and (frame["status"] == "succeeded").all()
    stats = healthy.stats()
    assert stats["billed_requests"] == 40 and stats["duplicate_billed_requests"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["concurrency_final"] >= 1 and summary["concurrency_min"] >= 1
