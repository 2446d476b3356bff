"""Durable writes (issue 25, finding 2 and items 3 and 7): the budget is in the journal a rerun reads before a
request is sent, on any store; storage faults never cost a paid request; a shared budget keeps what it owes
Redis through a Redis outage. Against real servers on loopback: the emulator, moto's S3 server, redis-server,
and a TCP relay the tests cut and restore to make a store unreachable."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import MODEL
from prefect_anthropic import ClientSettings, RunOptions
from prefect_anthropic.api.models import lookup_model
from prefect_anthropic.dataset.shard_loop import run_dataset
from prefect_anthropic.engine.budget import journaled_spending, worst_case_cost
from prefect_anthropic.engine.shared_budget import SharedBudget, start_shared_budget
from prefect_anthropic.engine.shared_limiter import SharedLimiter, SharedLimiterUnavailable
from prefect_anthropic.storage import STORAGE_OPTIONS_ENV, Storage
from prefect_anthropic.testing import tcp_relay

KEY = "sk-ant-fake-durable-writes"


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def digits_requests(path: Path, n: int, max_tokens: int = 300) -> tuple[Path, float]:
    """Requests whose real cost is close to their worst case (the emulator counts every digit as a token and
    echoes the text up to max_tokens); the file and the worst case of its dearest line."""
    worst = 0.0
    with open(path, "w") as handle:
        for i in range(n):
            text = f"{i:04d}" + "0123456789" * 40
            body = {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
            worst = max(worst, worst_case_cost(lookup_model(MODEL) or MODEL, body) or 0.0)
            handle.write(json.dumps(body) + "\n")
    return path, worst


_RUN = """
import asyncio, sys
from prefect_anthropic import ClientSettings, RunOptions
from prefect_anthropic.dataset.shard_loop import run_dataset
requests, out, base_url, limit = sys.argv[1:5]
settings = ClientSettings(base_url=base_url, max_cost_usd=float(limit), max_concurrency=50)
asyncio.run(run_dataset(requests, out, settings, "sk-ant-fake-durable-writes", RunOptions()))
"""


def test_a_run_killed_on_s3_with_requests_in_flight_never_lets_the_rerun_overspend(start_emulator, bucket, tmp_path):
    """Finding 2: the reservations of a run killed with requests in flight are in the bucket before the requests
    are sent, so the rerun counts them and the emulator never bills more than the budget."""
    emu = start_emulator(ttft_ms=4_000, seed=3)
    requests, worst = digits_requests(tmp_path / "requests.jsonl", 30)
    in_flight = 10
    limit = worst * (in_flight + 0.5)  # room for 10 worst cases: the 11th waits for one of them to settle
    out = f"{bucket}/datasets/budget"
    env = {
        **os.environ,
        STORAGE_OPTIONS_ENV: json.dumps({"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}),
        "PYTHONUNBUFFERED": "1",
        "PREFECT_ANTHROPIC_LEASE_TTL_S": "6",  # the killed run's lease is not waited out for 30 s
    }
    command = [sys.executable, "-c", _RUN, str(requests), out, emu.base_url, repr(limit)]
    log = tmp_path / "killed.log"
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        wait_until(
            lambda: emu.stats()["requests_total"] >= in_flight or killed.poll() is not None,
            what="the first run's requests",
        )
        assert killed.poll() is None, log.read_text()[-3000:]
        assert emu.stats()["billed_requests"] == 0  # all of them are in flight
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert "Traceback" not in rerun.stderr or "Budget" in rerun.stderr, rerun.stderr[-3000:]
    wait_until(lambda: sum(emu.api._in_flight.values()) == 0, what="the killed run's replies")  # all billed now
    stats = emu.stats()
    assert stats["billed_requests"] >= in_flight
    assert stats["cost_usd"] <= limit + 1e-9, (stats, limit)
    assert (journaled_spending(f"{out}/.spending", Storage.from_environment()) or 0.0) >= stats["cost_usd"] - 1e-9


def _expect_every_row_once(storage: Storage, out: str, n: int) -> None:
    lines = [json.loads(raw) for raw in storage.read_text(f"{out}/results.jsonl").splitlines() if raw.strip()]
    assert len(lines) == n and len({row["line"] for row in lines}) == n
    assert all(row["status"] == "succeeded" for row in lines), [r for r in lines if r["status"] != "succeeded"][:3]


async def test_the_bucket_unreachable_mid_run_loses_no_paid_request(
    start_emulator, bucket, tmp_path, monkeypatch, caplog
):
    """Item 7: the store goes away for a few seconds while requests are in flight, results parts are due and
    journal writes are due; the run waits for it, then finishes: every row once, nothing paid twice."""
    caplog.set_level(logging.WARNING, logger="prefect_anthropic")
    n = 40
    emu = start_emulator(latency_ms=60, seed=4)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "".join(
            json.dumps({"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": f"q {i}"}]}) + "\n"
            for i in range(n)
        )
    )
    moto_port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with tcp_relay(moto_port) as relay:
        options = {
            "client_kwargs": {"endpoint_url": f"http://{relay.netloc}"},
            "config_kwargs": {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}},
        }
        monkeypatch.setenv(STORAGE_OPTIONS_ENV, json.dumps(options))
        out = f"{bucket}/datasets/outage"
        settings = ClientSettings(base_url=emu.base_url, max_cost_usd=5.0, max_concurrency=4)
        run_options = RunOptions(shard_size=20, part_rows=3, part_seconds=0.2)
        run = asyncio.create_task(run_dataset(str(requests), out, settings, KEY, run_options))
        while emu.stats()["billed_requests"] < 8:
            assert not run.done(), run.exception() if run.done() else None
            await asyncio.sleep(0.02)
        relay.cut()
        billed_at_cut = emu.stats()["billed_requests"]
        await asyncio.sleep(3.0)  # the store is unreachable for this long; nothing new may be sent meanwhile
        assert emu.stats()["billed_requests"] <= billed_at_cut + 2 * settings.max_concurrency
        relay.restore()
        await asyncio.wait_for(run, 120)
    monkeypatch.delenv(STORAGE_OPTIONS_ENV)
    # The outage was met on both paths: results parts retried, reservations waiting for the journal.
    assert "Could not upload results" in caplog.text and "Could not write the spending journal" in caplog.text
    stats = emu.stats()
    assert stats["billed_requests"] == n and stats["duplicate_billed_requests"] == 0, stats
    storage = Storage.from_environment()
    _expect_every_row_once(storage, out, n)
    journaled = journaled_spending(f"{out}/.spending", storage) or 0.0
    assert journaled == pytest.approx(stats["cost_usd"], rel=1e-6, abs=1e-9)


async def test_a_shared_budget_keeps_its_settlements_through_a_redis_outage(redis_url):
    """Suspected case: a Redis call that fails must not drop the settlements it was carrying."""
    import redis.asyncio as aioredis

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    budget_id = uuid.uuid4().hex
    with tcp_relay(port) as relay:
        shared = SharedLimiter(f"redis://{relay.netloc}/0", KEY)
        await start_shared_budget(shared, budget_id, 1.0, 0.0)
        budget = SharedBudget(shared, budget_id, 1.0, owns_connection=True)
        first = await budget.areserve(0.1)
        second = await budget.areserve(0.1)
        assert first is not None and second is not None
        relay.cut()
        budget.settle(0.1, 0.05, first)  # owed to Redis: carried by the next call, which fails
        with pytest.raises(SharedLimiterUnavailable):
            await budget.areserve(0.1)
        relay.restore()
        budget.settle(0.1, 0.02, second)
        await budget.aclose()
    async with aioredis.from_url(redis_url) as direct:
        raw = await direct.hgetall(f"prefect-anthropic:budget:{budget_id}")
    state = {name.decode(): value.decode() for name, value in raw.items()}
    assert float(state["spent"]) == pytest.approx(0.07), state
    assert not any(name.startswith("r:") and float(value) > 1e-9 for name, value in state.items()), state


async def test_reservations_made_together_share_one_journal_write():
    """Group commit: every reservation waiting while a part is written goes in the next one, so a burst of
    requests costs a PUT or two, not one each; the journal reads back whole."""
    from prefect_anthropic.engine.budget import SpendingJournal

    storage, location = Storage(), f"memory://journals-{uuid.uuid4().hex}"
    journal = SpendingJournal(storage=storage, remote_dir=location)
    await asyncio.gather(*(journal.asent(entry, 0.01) for entry in range(200)))
    assert 1 <= journal.parts <= 2
    assert journaled_spending(location, storage) == pytest.approx(2.0)  # unsettled: counted at the worst case
    for entry in range(100):
        journal.settle(entry, 0.001)  # settlements ride on a later part, at the latest at close
    await journal.aclose()
    assert journaled_spending(location, storage) == pytest.approx(100 * 0.01 + 100 * 0.001)
