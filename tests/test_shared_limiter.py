"""One account's limits shared through a real Redis by several processes (issue 14)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_requests
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, RateLimits, RequestItem, run_requests
from prefect_anthropic.engine.shared_limiter import SharedLimiter, account_digest
from prefect_anthropic.settings import ClientSettings
from prefect_anthropic.testing import free_port, redis_server

RPM = 1200  # 20 a second, enforced by the emulator over 1-second buckets


def items(n: int, start: int = 0) -> list[RequestItem]:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 32}
    return [
        RequestItem(line=i, custom_id=f"r{i}", body={**body, "messages": [{"role": "user", "content": f"Item {i}"}]})
        for i in range(start, start + n)
    ]


def fresh_account() -> str:
    return f"sk-ant-test-{os.urandom(6).hex()}"


async def test_three_processes_with_the_full_limit_share_it_without_429s(redis_url):
    key = fresh_account()
    with emulator_process(requests_per_minute=RPM, burst_seconds=1, latency_ms=100, seed=5) as emu:

        async def one(start: int):
            # Each client is configured with the account's whole limit, as three separate runs would be.
            async with AnthropicClient(
                key, base_url=emu.base_url, limits=RateLimits(RPM), max_concurrency=50, limiter_url=redis_url
            ) as client:
                await client.check_limiter()
                progress = await run_requests(client, items(100, start))
                return progress, client.shared_limiter.summary()

        started = time.monotonic()
        results = await asyncio.gather(*(one(100 * k) for k in range(3)))
        elapsed = time.monotonic() - started
        stats = emu.stats()
    assert all(p.succeeded == 100 for p, _ in results)
    assert stats["responses_by_status"].get("429", 0) <= 0.005 * 300
    bound = 300 / (RPM / 60) + 0.1
    assert bound / elapsed >= 0.85, (bound, elapsed)
    for _, summary in results:
        assert summary["round_trips_per_request"] <= 1.5  # one script call per request, flushes aside
        assert summary["account"] == account_digest(key) and key not in json.dumps(summary)


async def test_the_servers_limits_and_a_429_pause_reach_every_process(redis_url):
    key = fresh_account()
    first = SharedLimiter(redis_url, key)
    second = SharedLimiter(redis_url, key)
    try:
        a = first.for_class("sonnet", RateLimits(6000), adopt_server_limits=False)
        b = second.for_class("sonnet", RateLimits(6000), adopt_server_limits=False)
        await b.acquire(1, 1)
        a.observe_headers({"anthropic-ratelimit-requests-limit": "600", "anthropic-ratelimit-requests-remaining": "9"})
        a.pause(1.0)
        await a.flush()
        started = time.monotonic()
        await b.acquire(1, 1)  # held by the pause the other process was told of
        assert time.monotonic() - started >= 0.9
        assert b.limits.requests_per_minute == 600  # lowered to the server's limit, seen by another process
        assert b.paused_until > 0
    finally:
        await first.aclose()
        await second.aclose()


HOLDER = """
import asyncio, sys
from prefect_anthropic.engine.limiter import RateLimits
from prefect_anthropic.engine.shared_limiter import SharedLimiter

async def main():
    shared = SharedLimiter(sys.argv[1], sys.argv[2], max_in_flight=3, lease_ttl_s=1.0)
    limiter = shared.for_class("sonnet", RateLimits(), adopt_server_limits=False)
    for _ in range(3):
        await limiter.acquire(1, 1)
    print("holding", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_process_frees_its_shared_slots(redis_url, tmp_path):
    key = fresh_account()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url, key], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        shared = SharedLimiter(redis_url, key, max_in_flight=3, lease_ttl_s=1.0)
        limiter = shared.for_class("sonnet", RateLimits(), adopt_server_limits=False)
        with pytest.raises(asyncio.TimeoutError):  # all 3 slots are the live holder's
            await asyncio.wait_for(limiter.acquire(1, 1), 1.5)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        started = time.monotonic()
        for _ in range(3):
            await asyncio.wait_for(limiter.acquire(1, 1), 5)
        assert time.monotonic() - started < 3  # the dead holder's leases expired after their 1 s
        await shared.aclose()
    finally:
        holder.kill()


def cli_env(**extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    state = os.environ.get("PREFECT_ANTHROPIC_STATE_DIR", "")
    return {**env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_ANTHROPIC_STATE_DIR": state, **extra}


def run_command(requests: Path, out: Path, base_url: str, limiter_url: str) -> list[str]:
    return [sys.executable, "-m", "prefect_anthropic.cli", "run", str(requests), "--output-dir", str(out),
            "--base-url", base_url, "--api-key", "sk-ant-fake-redis", "--no-progress",
            "--requests-per-minute", str(RPM), "--limiter-url", limiter_url]  # fmt: skip


@pytest.mark.usefixtures("prefect_server")
def test_redis_unreachable_at_start_stops_before_sending(start_emulator, tmp_path):
    emu = start_emulator(seed=2)
    requests = write_requests(tmp_path / "requests.jsonl", 5)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        run_command(requests, tmp_path / "out", emu.base_url, closed), env=cli_env(), capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "shared rate limiter at redis://127.0.0.1" in done.stderr and "cannot be reached" in done.stderr
    assert emu.stats()["requests_total"] == 0


@pytest.mark.usefixtures("prefect_server")
def test_redis_lost_mid_run_stops_admitting_then_the_run_resumes(start_emulator, tmp_path):
    emu = start_emulator(seed=3, latency_ms=50, requests_per_minute=RPM, burst_seconds=1)
    requests = write_requests(tmp_path / "requests.jsonl", 200)  # 10 s at the limit
    out = tmp_path / "out"
    with redis_server() as url:
        run = subprocess.Popen(
            run_command(requests, out, emu.base_url, url), env=cli_env(), stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while emu.stats()["requests_total"] < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
    # Redis is gone: nothing more is admitted, what is in flight finishes, the run exits resumable.
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2, stderr
    assert "cannot be reached" in stderr and "run the same command again to resume" in stderr
    sent_before = emu.stats()["requests_total"]
    assert sent_before < 200
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # Redis back (a new one on the same port): the same command resumes and sends only what is missing.
    with redis_server(port=port) as again:
        done = subprocess.run(run_command(requests, out, emu.base_url, again), env=cli_env(), capture_output=True,
                              text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 200 and (frame["status"] == "succeeded").all()
    assert frame["line"].is_unique
    assert emu.stats()["duplicate_billed_requests"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shared_limiter"]["round_trips_per_request"] <= 1.5
    assert "sk-ant-fake-redis" not in (out / "summary.json").read_text()


def test_the_output_directory_lock_holds_across_machines_through_redis(redis_url, tmp_path):
    from prefect_anthropic.dataset.run_lock import OutputDirectoryLocked, _hold_in_redis, hold_output_directory

    # What a run on another machine (no shared OS lock) meets: the Redis lock names the holder.
    with (
        hold_output_directory(tmp_path, redis_url),
        pytest.raises(OutputDirectoryLocked, match=r"a run on another machine .*host "),
        _hold_in_redis(tmp_path, redis_url),
    ):
        pass
    with _hold_in_redis(tmp_path, redis_url):  # released at the end of the first run
        pass


async def test_a_shared_budget_is_one_budget_for_every_process(redis_url):
    from prefect_anthropic.engine.shared_budget import SharedBudget, start_shared_budget

    key = fresh_account()
    first, second = SharedLimiter(redis_url, key), SharedLimiter(redis_url, key)
    try:
        await start_shared_budget(first, "run-1", 1.0, 0.25)  # $0.25 paid by earlier runs of the dataset
        a, b = SharedBudget(first, "run-1", 1.0), SharedBudget(second, "run-1", 1.0)
        entry = await a.areserve(0.5)
        assert entry is not None
        # 0.25 spent + 0.5 held by the other process: 0.5 more waits until that settles.
        waiting = asyncio.create_task(b.areserve(0.5))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        a.settle(0.5, 0.1, entry)  # the request cost less than its worst case
        assert await asyncio.wait_for(waiting, 5) is not None
        assert b.spent_usd == pytest.approx(0.35) and b.reserved_usd == pytest.approx(0.5)
        assert await b.areserve(0.7) is None and b.exhausted  # 0.35 + 0.7 > 1, whatever settles
        await a.aclose()
        await b.aclose()
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_dead_process_holds_count_as_spent_never_as_given_back(redis_url):
    from prefect_anthropic.engine.shared_budget import SharedBudget, start_shared_budget

    key = fresh_account()
    dying, living = SharedLimiter(redis_url, key), SharedLimiter(redis_url, key)
    try:
        await start_shared_budget(living, "run-2", 1.0, 0.0)
        doomed = SharedBudget(dying, "run-2", 1.0, lease_ttl_s=0.5)
        assert await doomed.areserve(0.4) is not None  # sent, maybe billed; then the process is killed
        doomed._closing = True  # its keeper stops renewing, as a killed process's would
        await asyncio.sleep(1.0)
        survivor = SharedBudget(living, "run-2", 1.0)
        assert await survivor.areserve(0.5) is not None
        assert survivor.spent_usd == pytest.approx(0.4)  # the dead hold became spending
        assert await survivor.areserve(0.7) is None and survivor.exhausted  # 0.4 + 0.7 > 1
        await survivor.aclose()
    finally:
        await dying.aclose()
        await living.aclose()


@pytest.mark.usefixtures("prefect_server")
async def test_a_redis_database_block_by_name_instead_of_a_url(redis_url):
    """The edge reads the block (its password stays in it) into the URL the engine is given."""
    from prefect.exceptions import ObjectNotFound
    from prefect_redis import RedisDatabase

    from prefect_anthropic.orchestration.edge import resolve_run

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    await RedisDatabase(host="127.0.0.1", port=port, db=0).save("shared-limits-test", overwrite=True)
    setup = await resolve_run(ClientSettings(limiter_block="shared-limits-test"), api_key=fresh_account())
    assert setup.limiter_url == f"redis://127.0.0.1:{port}/0"
    shared = SharedLimiter(setup.limiter_url, fresh_account())
    try:
        await shared.check()
        limiter = shared.for_class("sonnet", RateLimits(600), adopt_server_limits=False)
        await limiter.acquire(1, 1)
        assert shared.url == f"redis://127.0.0.1:{port}/0" and shared.stats.admissions == 1
    finally:
        await shared.aclose()
    with pytest.raises(ObjectNotFound):
        await resolve_run(ClientSettings(limiter_block="no-such-block"), api_key=fresh_account())
