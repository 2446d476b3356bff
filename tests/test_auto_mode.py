"""Half price by a deadline (issue 22): batches until the latest moment real time can still finish, then
real time for what they have not answered; nothing paid twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pandas as pd
import pytest

from conftest import HEADERS, write_requests
from prefect_anthropic import ClientSettings
from prefect_anthropic.cli import main
from prefect_anthropic.dataset.auto_mode import CutOver, DeadlineInfeasible, parse_deadline
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.orchestration.flows import generate_dataset

KEY = "sk-ant-auto"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def batches_of(base_url: str) -> list[dict]:
    headers = {**HEADERS, "x-api-key": KEY}
    return httpx.get(f"{base_url}/v1/messages/batches", params={"limit": 1000}, headers=headers).json()["data"]


def test_deadlines_as_times_with_zones_or_durations():
    now = datetime(2026, 12, 2, 22, 0, tzinfo=timezone.utc)
    assert parse_deadline("90m", now) == now + timedelta(minutes=90)
    assert parse_deadline("1h30m", now) == now + timedelta(minutes=90)
    assert parse_deadline("6h", now) == now + timedelta(hours=6)
    assert parse_deadline("2026-12-03T06:00:00Z", now) == datetime(2026, 12, 3, 6, tzinfo=timezone.utc)
    assert parse_deadline("2026-12-03T07:00:00+01:00", now) == datetime(2026, 12, 3, 6, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="no time zone"):
        parse_deadline("2026-12-03T06:00:00", now)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_deadline("tomorrow", now)


def test_the_cutover_is_the_latest_moment_real_time_still_finishes():
    estimate = {"requests": 1_000, "duration_s_if_replies_hit_max_tokens": 600.0}
    plan = CutOver.plan("2h", estimate, margin=0.25, slack_s=120, now=0.0)
    assert plan.remaining == {0: 1_000}
    assert plan.cutover_time() == pytest.approx(7_200 - (600 * 1.25 + 120))
    plan.remaining = {0: 100}  # most answered by batches: real time needs less, the cut-over moves later
    assert plan.cutover_time() == pytest.approx(7_200 - (60 * 1.25 + 120))
    assert not plan.due(now=7_000) and plan.due(now=7_010) and plan.cut_at == 7_010
    with pytest.raises(DeadlineInfeasible, match="earliest feasible deadline is 1970-01-01T00:14:30"):
        CutOver.plan("10m", estimate, margin=0.25, slack_s=120, now=0.0)
    # A resumed run: only what has no answer yet counts.
    assert CutOver.plan("10m", estimate, margin=0.25, slack_s=120, remaining={3: 500}, now=0.0).left == 500


@pytest.mark.usefixtures("prefect_server")
async def test_batches_that_finish_before_the_cutover_cost_half_of_real_time(start_emulator, tmp_path):
    emu = start_emulator(batch_delay_s=0.5, requests_per_minute=600)
    requests = write_requests(tmp_path / "requests.jsonl", 30)
    settings = ClientSettings(base_url=emu.base_url, requests_per_minute=600)
    await generate_dataset(str(requests), str(tmp_path / "realtime"), settings=settings, shard_size=10)
    realtime_cost = emu.stats()["cost_usd"]
    summary = await generate_dataset(
        str(requests), str(tmp_path / "auto"), settings=settings, shard_size=10, mode="auto", deadline="10m",
        batch_poll_interval_s=0.2,
    )  # fmt: skip
    frame = pd.read_parquet(tmp_path / "auto" / "results.parquet")
    assert len(frame) == 30 and (frame["status"] == "succeeded").all() and (frame["mode"] == "batch").all()
    assert emu.stats()["cost_usd"] - realtime_cost == pytest.approx(0.5 * realtime_cost, rel=1e-6)
    assert summary["succeeded_by_mode"] == {"batch": 30} and summary["cutover_at"] is None


@pytest.mark.usefixtures("prefect_server")
async def test_slow_batches_give_way_to_real_time_by_the_deadline_nothing_paid_twice(start_emulator, tmp_path):
    # Batches of 10 finish one request every 3 s; real time needs 6 s (60 requests at 600/min), so with 5 s in
    # hand the cut-over comes about 7.5 s before a 20 s deadline: a few rows from batches, the rest real time.
    # (One request every 6 s left a single row per batch in the window when start-up was quick, none when a busy
    # machine took 2 s more to start: every request then went real time.)
    emu = start_emulator(batch_delay_s=30, batch_cancel_s=1.0, requests_per_minute=600, latency_ms=50)
    requests = write_requests(tmp_path / "requests.jsonl", 60)
    settings = ClientSettings(base_url=emu.base_url, requests_per_minute=600)
    deadline = (datetime.now(timezone.utc) + timedelta(seconds=20)).isoformat()
    summary = await generate_dataset(
        str(requests), str(tmp_path / "out"), settings=settings, shard_size=10, mode="auto", deadline=deadline,
        deadline_slack_s=5, batch_poll_interval_s=0.5,
    )  # fmt: skip
    assert datetime.now(timezone.utc) <= datetime.fromisoformat(deadline)
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(frame) == 60 and frame["line"].is_unique and (frame["status"] == "succeeded").all()
    by_mode = frame["mode"].value_counts().to_dict()
    assert by_mode.get("batch", 0) >= 6 and by_mode.get("realtime", 0) >= 30, by_mode
    stats = emu.stats()
    # Billed once each, at the price of the path each took (batch rows at half price).
    assert stats["billed_requests"] == 60 and stats["billed_batch_requests"] == by_mode["batch"]
    assert stats["duplicate_billed_requests"] == 0
    assert frame["cost_usd"].sum() == pytest.approx(stats["cost_usd"], abs=1e-6)
    batch_row, realtime_row = frame[frame["mode"] == "batch"].iloc[0], frame[frame["mode"] == "realtime"].iloc[0]
    assert batch_row["cost_usd"] == pytest.approx(realtime_row["cost_usd"] / 2, rel=0.2)
    assert summary["cutover_at"] is not None and all(
        b["processing_status"] == "ended" for b in batches_of(emu.base_url)
    )


def test_an_impossible_deadline_is_refused_at_once_naming_the_earliest(start_emulator, tmp_path, capsys):
    emu = start_emulator()
    requests = write_requests(tmp_path / "requests.jsonl", 600)
    started = time.monotonic()
    code = main([
        "run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emu.base_url, "--no-progress",
        "--mode", "auto", "--deadline", "2m", "--requests-per-minute", "60",
    ])  # fmt: skip
    assert code == 2 and time.monotonic() - started < 60
    error = capsys.readouterr().err
    assert "cannot be met even in real time" in error and "earliest feasible deadline is" in error
    assert emu.stats()["billed_requests"] == 0 and batches_of(emu.base_url) == []


@pytest.mark.slow
def test_sigkill_in_either_phase_then_the_same_command_completes_paying_nothing_twice(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    requests = write_requests(tmp_path / "requests.jsonl", 120)
    with emulator_process(batch_delay_s=120, requests_per_minute=300, latency_ms=200, seed=3) as emu:
        # An absolute deadline the three runs share: each run's start-up (a busy machine, Prefect) comes out of
        # it, so the runs use the session's Prefect server (no temporary server to start) and it leaves room.
        deadline = (datetime.now(timezone.utc) + timedelta(seconds=100)).isoformat()
        command = [
            sys.executable, "-m", "prefect_anthropic.cli", "run", str(requests), "--output-dir", str(tmp_path / "out"),
            "--base-url", emu.base_url, "--no-progress", "--mode", "auto", "--deadline", deadline,
            "--deadline-slack", "10", "--requests-per-minute", "300", "--shard-size", "40",
            "--batch-poll-interval", "1",
        ]  # fmt: skip
        env = {**__import__("os").environ, "ANTHROPIC_API_KEY": KEY, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
        for phase_reached in (
            lambda: len(batches_of(emu.base_url)) == 3,  # batch phase: every shard's batch submitted
            lambda: emu.stats()["requests_total"] >= 20,  # real-time phase under way
        ):
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            give_up = time.monotonic() + 120
            while not phase_reached() and time.monotonic() < give_up and process.poll() is None:
                time.sleep(0.1)
            assert process.poll() is None, "the run ended before the phase was reached"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        stats = emu.stats()
        assert len(batches_of(emu.base_url)) == 3  # never submitted again
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(frame) == 120 and frame["line"].is_unique and (frame["status"] == "succeeded").all()
    # Nothing paid in a batch and again in real time, no batch submitted twice; only a request in flight in
    # real time at the SIGKILL (sent, its reply lost with the process: the API has no idempotency key) can be.
    assert stats["duplicate_billed_requests"] <= 2
    assert stats["billed_requests"] - stats["duplicate_billed_requests"] == 120  # batch ones included
