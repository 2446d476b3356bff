"""Shards fanned out to a Prefect work pool: a real Prefect server, two real process workers, the emulator
enforcing the account's limit and a real Redis sharing it (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_requests
from prefect_anthropic.orchestration.flows import generate_dataset
from prefect_anthropic.settings import ClientSettings

pytestmark = pytest.mark.usefixtures("prefect_server")
KEY = "sk-ant-fake-pool"


def worker_env() -> dict:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {
        **env,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_ANTHROPIC_STATE_DIR": os.environ.get("PREFECT_ANTHROPIC_STATE_DIR", ""),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "ANTHROPIC_API_KEY": KEY,  # workers hold the key: it never travels as a parameter
    }


@contextlib.contextmanager
def process_workers(pool: str, names: list[str], directories: list[Path] | None = None):
    """Process workers, each started in its own directory when given (a container's empty disk)."""
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"]
    log = open(os.environ.get("WORKER_LOG", os.devnull), "ab")  # noqa: SIM115
    quiet = {"stdout": log, "stderr": log}
    places = directories or [None] * len(names)
    workers = [
        subprocess.Popen([*command, "--name", name], env=worker_env(), cwd=place, **quiet)
        for name, place in zip(names, places, strict=True)
    ]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


async def wait_for_pool(pool: str, timeout: float = 60) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            with contextlib.suppress(Exception):
                await client.read_work_pool(pool)
                return
            assert time.monotonic() < deadline, f"work pool {pool} never appeared"
            time.sleep(0.5)


async def test_a_run_through_a_work_pool_with_two_workers_and_a_budget(
    start_emulator, redis_url, tmp_path, monkeypatch
):
    from prefect_anthropic.orchestration.flows import spent_in

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    emu = start_emulator(seed=14, latency_ms=500, requests_per_minute=600, burst_seconds=1)
    requests = write_requests(tmp_path / "requests.jsonl", 40)
    pool = f"anthropic-test-{uuid.uuid4().hex[:6]}"
    options = {"shard_size": 10, "max_parallel_shards": 4, "work_pool": pool}
    with process_workers(pool, ["worker-a", "worker-b"]):
        await wait_for_pool(pool)
        settings = ClientSettings(base_url=emu.base_url, limiter_url=redis_url, requests_per_minute=600)
        summary = await generate_dataset(str(requests), str(tmp_path / "out"), settings=settings, **options)
        assert set(summary["shards_by_worker"]) == {"worker-a", "worker-b"}, summary["shards_by_worker"]
        assert sum(summary["shards_by_worker"].values()) == 4
        frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
        assert len(frame) == 40 and frame["line"].is_unique and (frame["status"] == "succeeded").all()
        ledger = emu.stats()
        assert ledger["duplicate_billed_requests"] == 0 and ledger["responses_by_status"].get("429", 0) == 0
        assert spent_in(str(tmp_path / "out")) == pytest.approx(ledger["cost_usd"], abs=1e-6)  # billed once each
        assert KEY not in json.dumps(summary) and KEY not in (tmp_path / "out" / "results.jsonl").read_text()

        # A budget, on the same pool: 4 shards on two workers spend one budget kept in Redis, never more.
        out, paid_before = tmp_path / "budgeted", ledger["cost_usd"]
        for budget in (0.01, 1.0):
            settings = ClientSettings(base_url=emu.base_url, limiter_url=redis_url, max_cost_usd=budget)
            summary = await generate_dataset(str(requests), str(out), settings=settings, **options)
            if budget == 0.01:
                assert summary["stopped_by_budget"] is True
                assert 0 < emu.stats()["cost_usd"] - paid_before <= 0.01
                assert (pd.read_parquet(out / "results.parquet")["error_type"] == "budget_exhausted").sum() > 0
    # The same command with a higher budget resumes and finishes; nothing is paid twice.
    assert summary["stopped_by_budget"] is False
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 40 and frame["line"].is_unique and (frame["status"] == "succeeded").all()
    ledger = emu.stats()
    assert spent_in(str(out)) == pytest.approx(ledger["cost_usd"] - paid_before, abs=1e-6)


async def test_a_worker_that_does_not_see_the_output_directory_refuses_the_shard(start_emulator, tmp_path):
    from prefect_anthropic.orchestration.fanout import (
        OutputDirectoryNotShared,
        check_shared_location,
        mark_shared_location,
    )
    from prefect_anthropic.storage import Storage

    storage = Storage()
    location_id = mark_shared_location(storage, str(tmp_path))
    check_shared_location(storage, str(tmp_path), location_id)
    with pytest.raises(OutputDirectoryNotShared, match="storage every worker reaches"):
        check_shared_location(storage, str(tmp_path / "elsewhere"), location_id)


async def test_a_budget_with_a_work_pool_needs_the_shared_limiter(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    requests = write_requests(tmp_path / "requests.jsonl", 2)
    with pytest.raises(ValueError, match="needs --limiter-url"):
        await generate_dataset(
            str(requests), str(tmp_path / "out"), settings=ClientSettings(max_cost_usd=1.0), work_pool="any"
        )


def kill_worker_and_its_flow_runs(name: str) -> int:
    """What losing a machine does to a worker: it and the flow runs it started die at once (Linux /proc)."""
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                env = handle.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().split(b"\0")
        except OSError:
            continue
        ours = f"PREFECT__WORKER_NAME={name}".encode() in env  # the flow runs it started
        ours |= b"worker" in cmdline and name.encode() in cmdline  # the worker itself
        if ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
    return killed


async def test_a_work_pool_that_shares_nothing_but_the_bucket_and_redis(
    bucket, start_emulator, redis_url, tmp_path, monkeypatch
):
    """Two workers, each in its own empty directory, s3:// input and output: both run shards, and a worker
    killed mid-shard (once it has finished one) loses at most its last unuploaded part: the other resumes the
    shard from the bucket."""
    from prefect_anthropic.storage import Storage

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    storage = Storage.from_environment()
    emu = start_emulator(seed=20, latency_ms=1000)
    requests, out = f"{bucket}/in/requests.jsonl", f"{bucket}/datasets/pooled"
    storage.write_bytes(requests, write_requests(tmp_path / "requests.jsonl", 40).read_bytes())
    homes = [tmp_path / "worker-a-disk", tmp_path / "worker-b-disk"]
    for home in homes:
        home.mkdir()
    pool = f"anthropic-test-{uuid.uuid4().hex[:6]}"
    settings = ClientSettings(base_url=emu.base_url, limiter_url=redis_url, max_concurrency=2)
    options = {"shard_size": 10, "max_parallel_shards": 4, "part_rows": 2, "shard_heartbeat_timeout_s": 6}
    with process_workers(pool, ["worker-a", "worker-b"], homes):
        await wait_for_pool(pool)
        run = asyncio.create_task(generate_dataset(requests, out, settings=settings, work_pool=pool, **options))
        killed_shard, victim, deadline = None, None, time.monotonic() + 150
        while killed_shard is None and time.monotonic() < deadline and not run.done():
            await asyncio.sleep(0.3)
            finished = {
                name: json.loads(storage.read_text(name))["worker"]
                for name in storage.list(out, ".shards-*/shard-*.worker.json")
            }
            for beat in storage.list(out, ".shards-*/shard-*.heartbeat"):
                shard = beat.rsplit("/", 1)[1].split(".")[0]
                try:
                    worker = storage.read_text(beat).split(" ", 1)[0]
                except OSError:  # rewritten while read (s3fs FileExpired): read it at the next look
                    continue
                done_by_it = [name for name, by in finished.items() if by == worker]
                if any(name.endswith(f"/{shard}.worker.json") for name in finished) or not done_by_it:
                    continue  # a worker is lost once it has finished a shard, during its next one
                if storage.list(beat.rsplit("/", 1)[0], f"{shard}/part-*"):
                    killed_shard, victim = shard, worker
                    assert kill_worker_and_its_flow_runs(worker) >= 2
                    break
        assert killed_shard is not None, "no worker ran a second shard"
        summary = await asyncio.wait_for(run, 240)
    frame = pd.read_parquet(f"{out}/results.parquet")
    assert len(frame) == 40 and frame["line"].is_unique and (frame["status"] == "succeeded").all()
    assert set(summary["shards_by_worker"]) == {"worker-a", "worker-b"}, summary["shards_by_worker"]
    worker_file = storage.list(out, f".shards-*/{killed_shard}.worker.json")
    survivor = "worker-b" if victim == "worker-a" else "worker-a"
    assert json.loads(storage.read_text(worker_file[0]))["worker"] == survivor  # resumed on the other worker
    # Paid twice at most: the requests in flight at the loss (2) and the shard's last part not uploaded (2 rows).
    assert emu.stats()["duplicate_billed_requests"] <= 2 + options["part_rows"]
