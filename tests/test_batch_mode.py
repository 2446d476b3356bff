"""Batch mode: the same flow and outputs through the Message Batches API, at half the price (issue 7)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pandas as pd
import pytest

from conftest import HEADERS, message_body, write_requests
from prefect_anthropic import ClientSettings
from prefect_anthropic.dataset.batch_mode import cancel_batches
from prefect_anthropic.dataset.setup import RunSetup
from prefect_anthropic.engine import RequestItem
from prefect_anthropic.engine.batches import plan_batches
from prefect_anthropic.orchestration.flows import generate_dataset

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-batch")


async def run_batch(emu, requests, out, **options):
    settings = ClientSettings(base_url=emu.base_url, max_concurrency=10)
    options.setdefault("shard_size", 10)
    return await generate_dataset(
        str(requests), str(out), settings=settings, mode="batch", batch_poll_interval_s=0.2, **options
    )


def batch_ids(emu) -> list[str]:
    headers = {**HEADERS, "x-api-key": "sk-ant-batch"}  # batches are listed per key
    response = httpx.get(f"{emu.base_url}/v1/messages/batches", params={"limit": 1000}, headers=headers)
    return [batch["id"] for batch in response.json()["data"]]


def test_batches_respect_the_count_and_size_limits():
    items = [RequestItem(line=i, custom_id=f"my id {i}!", body=message_body(f"q{i}")) for i in range(1, 11)]
    by_count = list(plan_batches(items, max_requests=4))
    assert [len(b) for b in by_count] == [4, 4, 2]
    assert [r["custom_id"] for r in by_count[0]] == ["line-1", "line-2", "line-3", "line-4"]  # valid, unique
    by_size = list(plan_batches(items, max_bytes=600))
    assert len(by_size) > 3 and sum(len(b) for b in by_size) == 10


async def test_a_multi_batch_run_end_to_end_at_half_price(start_emulator, tmp_path):
    emu = start_emulator(batch_delay_s=0.3)
    requests = write_requests(tmp_path / "requests.jsonl", 30)
    summary = await run_batch(emu, requests, tmp_path / "out")
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["line"]) == list(range(1, 31)) and (frame["status"] == "succeeded").all()
    assert frame.loc[0, "text"] == "echo: Question 0: what is 0 times 8?" and json.loads(frame.loc[0, "metadata"]) == {
        "row_id": 0
    }
    stats = emu.stats()
    assert len(batch_ids(emu)) == 3 and stats["billed_batch_requests"] == 30 and stats["requests_total"] == 0
    assert summary["cost_usd"] == pytest.approx(stats["cost_usd"], rel=1e-4)

    realtime = start_emulator()
    settings = ClientSettings(base_url=realtime.base_url)
    full = await generate_dataset(str(requests), str(tmp_path / "rt"), settings=settings)
    assert summary["cost_usd"] == pytest.approx(full["cost_usd"] / 2, rel=1e-3)


async def test_a_restart_mid_poll_does_not_submit_again(start_emulator, tmp_path):
    emu = start_emulator(batch_delay_s=3)
    requests = write_requests(tmp_path / "requests.jsonl", 20)
    # "Crash" while polling: stopped once both batches are submitted (each takes 3 s to end), whatever the
    # machine's speed (a fixed 1.5 s timeout fell before the submissions on a busy machine).
    first = asyncio.create_task(run_batch(emu, requests, tmp_path / "out"))
    for _ in range(1200):
        if len(batch_ids(emu)) == 2 or first.done():
            break
        await asyncio.sleep(0.05)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    submitted = batch_ids(emu)
    assert len(submitted) == 2
    summary = await run_batch(emu, requests, tmp_path / "out")
    assert summary["succeeded"] == 20
    assert sorted(batch_ids(emu)) == sorted(submitted)  # polled the same batches, submitted none
    stats = emu.stats()
    assert stats["billed_batch_requests"] == 20 and stats["duplicate_billed_requests"] == 0


async def test_mixed_results_are_rows_of_the_same_schema(start_emulator, tmp_path):
    emu = start_emulator(batch_delay_s=0.2, batch_expire_rate=0.3, seed=4)
    requests = write_requests(
        tmp_path / "requests.jsonl", 20, extra=[json.dumps(message_body("hot", temperature=3)), "{not json"]
    )
    summary = await run_batch(emu, requests, tmp_path / "out", shard_size=50)
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("line")
    kinds = frame["error_type"].fillna("ok").value_counts().to_dict()
    assert kinds["ok"] > 5 and kinds["batch_expired"] > 2
    assert frame.loc[21, "error_type"] == "invalid_request_error" and "temperature" in frame.loc[21, "error_message"]
    assert frame.loc[22, "error_type"] == "invalid_request"
    assert summary["failed"] == len(frame) - kinds["ok"]


async def test_failed_rows_retried_in_a_follow_up_batch_or_in_real_time(start_emulator, tmp_path):
    requests = write_requests(tmp_path / "requests.jsonl", 30)
    emu = start_emulator(batch_delay_s=0.2, batch_expire_rate=0.3, seed=8)
    summary = await run_batch(emu, requests, tmp_path / "realtime", shard_size=50, batch_retry="realtime")
    stats = emu.stats()
    assert summary["succeeded"] == 30
    assert 0 < stats["billed_batch_requests"] < 30 and stats["billed_requests"] == 30  # the rest in real time

    emu = start_emulator(batch_delay_s=0.2, batch_expire_rate=0.2, seed=9)
    summary = await run_batch(emu, requests, tmp_path / "batch", shard_size=50, batch_retry="batch")
    assert len(batch_ids(emu)) > 1  # follow-up batches for the expired requests
    assert emu.stats()["billed_batch_requests"] == summary["succeeded"] >= 28


async def test_cancel_ends_the_run_with_canceled_rows(start_emulator, tmp_path):
    emu = start_emulator(batch_delay_s=60)
    requests = write_requests(tmp_path / "requests.jsonl", 10)
    run = asyncio.create_task(run_batch(emu, requests, tmp_path / "out"))

    def recorded() -> bool:  # the batch is submitted and its id recorded
        states = [json.loads(p.read_text()) for p in (tmp_path / "out").glob(".shards-*/*.batches.json")]
        return any(round_["batches"] for state in states for round_ in state["rounds"])

    while not recorded():
        await asyncio.sleep(0.05)
    canceled = await cancel_batches(str(tmp_path / "out"), RunSetup.resolve(ClientSettings(base_url=emu.base_url)))
    assert len(canceled) == 1
    summary = await asyncio.wait_for(run, timeout=30)
    assert summary["failed"] == 10 and summary["failed_by_error_type"] == {"batch_canceled": 10}
    assert emu.stats()["billed_requests"] == 0
