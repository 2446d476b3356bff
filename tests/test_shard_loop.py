"""The shard loop without Prefect (issue 27): `run_dataset` runs batch and auto mode as the flow does, in a
process that never imports Prefect; the retry policy is one declaration, applied by each executor."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from conftest import write_requests
from prefect_anthropic.dataset.executor import RetryPolicy, in_process
from prefect_anthropic.dataset.inputs import Shard
from prefect_anthropic.engine import RunStopped

KEY = "sk-ant-shard-loop"

_RUN = """
import asyncio, json, sys
from prefect_anthropic import ClientSettings, RunOptions, run_dataset

requests, output, base_url, options, key = sys.argv[1:6]
settings = ClientSettings(base_url=base_url, requests_per_minute=600)
summary = asyncio.run(run_dataset(requests, output, settings, key, RunOptions(**json.loads(options))))
loaded = sorted(name for name in sys.modules if name == "prefect" or name.startswith("prefect."))
print(json.dumps({"summary": summary, "prefect_modules": loaded}))
"""


def run_without_prefect(requests, output, base_url: str, **options) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _RUN, str(requests), str(output), base_url, json.dumps(options), KEY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["prefect_modules"] == []  # the whole run, batches included, without Prefect
    return result["summary"]


def test_batch_mode_runs_without_prefect_at_half_price(start_emulator, tmp_path):
    emu = start_emulator(batch_delay_s=0.2, requests_per_minute=600)
    requests = write_requests(tmp_path / "requests.jsonl", 20)
    summary = run_without_prefect(
        requests, tmp_path / "out", emu.base_url, mode="batch", shard_size=10, batch_poll_interval_s=0.2
    )
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["line"]) == list(range(1, 21)) and (frame["status"] == "succeeded").all()
    assert (frame["mode"] == "batch").all() and summary["succeeded_by_mode"] == {"batch": 20}
    stats = emu.stats()
    assert stats["billed_requests"] == 20 and stats["billed_batch_requests"] == 20
    assert stats["duplicate_billed_requests"] == 0
    assert frame["cost_usd"].sum() == pytest.approx(stats["cost_usd"], abs=1e-6)
    # Run again: every shard is done, nothing is submitted or paid again.
    again = run_without_prefect(
        requests, tmp_path / "out", emu.base_url, mode="batch", shard_size=10, batch_poll_interval_s=0.2
    )
    assert again["succeeded"] == 20 and emu.stats()["billed_requests"] == 20


def test_auto_mode_runs_without_prefect_and_gives_way_to_real_time(start_emulator, tmp_path):
    # Batches that answer one request every 3 s cannot finish by a 20 s deadline: the loop cancels them at the
    # cut-over and sends what they did not answer in real time; every row once, nothing paid twice.
    emu = start_emulator(batch_delay_s=30, batch_cancel_s=1.0, requests_per_minute=600, latency_ms=50)
    requests = write_requests(tmp_path / "requests.jsonl", 60)
    deadline = (datetime.now(timezone.utc) + timedelta(seconds=20)).isoformat()
    summary = run_without_prefect(
        requests, tmp_path / "out", emu.base_url, mode="auto", deadline=deadline, deadline_slack_s=5,
        shard_size=10, batch_poll_interval_s=0.5,
    )  # fmt: skip
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(frame) == 60 and frame["line"].is_unique and (frame["status"] == "succeeded").all()
    by_mode = frame["mode"].value_counts().to_dict()
    assert by_mode.get("realtime", 0) > 0 and summary["cutover_at"] is not None
    stats = emu.stats()
    assert stats["billed_requests"] == 60 and stats["billed_batch_requests"] == by_mode.get("batch", 0)
    assert stats["duplicate_billed_requests"] == 0


def test_the_in_process_executor_retries_by_the_policy_and_stops_at_once_when_told():
    shard = Shard(index=0, start=0, end=0, first_line=1, line_count=1, digest="d")
    calls: list[str] = []

    async def flaky() -> str:
        calls.append("try")
        if len(calls) < 3:
            raise OSError("a storage fault")
        return "done"

    policy = RetryPolicy(retries=2, delay_s=0.0)
    assert asyncio.run(in_process("run-shard", shard, flaky, policy)) == "done" and len(calls) == 3

    async def stopped() -> str:
        calls.append("stop")
        raise RunStopped("asked to stop")

    with pytest.raises(RunStopped):
        asyncio.run(in_process("run-shard", shard, stopped, policy))
    assert calls.count("stop") == 1  # a stop is never retried
    assert RetryPolicy(retries=3, delay_s=10.0).delays() == [10.0, 20.0, 40.0]
