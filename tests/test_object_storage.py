"""Datasets where work pools live (issue 20): inputs and outputs on object storage, against a real S3 API on
loopback (moto's server, spoken to over HTTP by s3fs), and the same behaviour on file:// and memory://."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_requests
from prefect_anthropic import ClientSettings, RunOptions
from prefect_anthropic.cli import main
from prefect_anthropic.dataset.shard_loop import run_dataset
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.storage import Storage, StorageError

KEY = "sk-ant-fake-object-storage"


def s3fs_filesystem():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def write_table(url: str, rows: int) -> None:
    table = pa.table({"sku": [f"sku-{i}" for i in range(rows)], "name": [f"product {i}" for i in range(rows)]})
    with s3fs_filesystem().open(url, "wb") as handle:
        pq.write_table(table, handle)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect_anthropic.cli", *args]


def env() -> dict[str, str]:
    import os

    return {**os.environ, "ANTHROPIC_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}


def test_a_table_on_s3_through_a_template_to_s3_killed_then_resumed(bucket, tmp_path):
    table, out = f"{bucket}/in/products.parquet", f"{bucket}/datasets/products"
    write_table(table, 2_000)
    with emulator_process(requests_per_minute=12_000, burst_seconds=1, latency_ms=100, seed=2) as emu:
        command = cli(
            "run", table, "--output-dir", out, "--base-url", emu.base_url, "--no-progress",
            "--template", "Describe {{ name }} in one sentence.", "--model", "claude-haiku-4-5",
            "--max-tokens", "30", "--id-column", "sku", "--max-concurrency", "50", "--shard-size", "1000",
        )  # fmt: skip
        process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while emu.stats()["billed_requests"] < 1_200 and time.monotonic() < deadline:  # two parts uploaded
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # the container is lost: its disk with it
        process.wait(timeout=30)
        billed_before = emu.stats()["billed_requests"]
        assert 0 < billed_before < 2_000, process.stderr.read().decode()[-3000:] if process.stderr else ""
        result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        stats = emu.stats()
    # Every row exactly once, straight from the bucket, with pandas and with pyarrow's own S3 filesystem.
    frame = pd.read_parquet(f"{out}/results.parquet")
    assert len(frame) == 2_000 and frame["sku"].is_unique and (frame["status"] == "succeeded").all()
    assert list(frame["sku"]) == [f"sku-{i}" for i in range(2_000)]
    endpoint = s3fs_filesystem().client_kwargs.get("endpoint_url") or __import__("os").environ["AWS_ENDPOINT_URL"]
    s3 = pa.fs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1")
    assert pq.read_table(f"{out}/results.parquet".removeprefix("s3://"), filesystem=s3).num_rows == 2_000
    # Paid again: at most the requests in flight at the kill and, for each of the two shards that were running,
    # the records of its last part not yet uploaded.
    assert stats["duplicate_billed_requests"] <= 50 + 2 * RunOptions().part_rows, stats
    assert stats["billed_requests"] - stats["duplicate_billed_requests"] == 2_000


def test_a_second_run_on_the_same_s3_output_exits_2_naming_the_holder(bucket, tmp_path, capsys, monkeypatch):
    from prefect_anthropic.dataset import run_lock

    # A lease longer than the second run can take to start on a busy machine while the first is paused.
    monkeypatch.setattr(run_lock, "LEASE_TTL_S", 300.0)
    monkeypatch.setenv("PREFECT_ANTHROPIC_LEASE_TTL_S", "300")
    out = f"{bucket}/datasets/locked"
    requests = write_requests(tmp_path / "requests.jsonl", 400)
    with emulator_process(latency_ms=100, requests_per_minute=1_200, burst_seconds=1, seed=1) as emu:
        command = cli("run", str(requests), "--output-dir", out, "--base-url", emu.base_url, "--no-progress")
        log = tmp_path / "first.log"
        first = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        try:
            storage = Storage.from_environment()
            deadline = time.monotonic() + 60
            while not storage.exists(f"{out}/.prefect-anthropic.lease"):
                running = time.monotonic() < deadline and first.poll() is None
                assert running, f"the first run never took the lease:\n{log.read_text()[-3000:]}"
                time.sleep(0.1)
            # Paused while the second run starts, however long that takes on a busy machine (well within the lease).
            first.send_signal(signal.SIGSTOP)
            second = ["run", str(requests), "--output-dir", out, "--base-url", emu.base_url, "--no-progress"]
            assert main([*second, "--api-key", KEY]) == 2
            error = capsys.readouterr().err
            assert "in use by another run" in error and f"pid {first.pid}" in error
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        assert emu.stats()["duplicate_billed_requests"] == 0  # the second run sent nothing


async def test_memory_and_file_urls_behave_as_paths(start_emulator, tmp_path):
    emu = start_emulator(latency_ms=2)
    settings = ClientSettings(base_url=emu.base_url)
    requests = write_requests(tmp_path / "requests.jsonl", 30)
    for out in ("memory://datasets/a", f"file://{tmp_path}/b"):
        summary = await run_dataset(str(requests), out, settings, KEY, RunOptions(shard_size=7))
        assert summary["succeeded"] == 30
        storage = Storage()
        with storage.open(f"{out}/results.parquet") as handle:
            frame = pq.read_table(handle).to_pandas()
        assert list(frame["line"]) == list(range(1, 31)) and (frame["status"] == "succeeded").all()
        assert json.loads(storage.read_text(f"{out}/summary.json"))["requests"] == 30
        again = await run_dataset(str(requests), out, settings, KEY, RunOptions(shard_size=7))
        assert again["requests_sent_this_run"] == 0  # resumed from its shard files: nothing sent twice
    assert emu.stats()["billed_requests"] == 60 and emu.stats()["duplicate_billed_requests"] == 30


def test_a_url_whose_filesystem_is_not_installed_names_the_extra(tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", 3)
    code = main(["run", str(requests), "--output-dir", "nosuchfs://bucket/out", "--api-key", KEY, "--no-progress"])
    assert code == 2
    assert "no filesystem for nosuchfs://" in capsys.readouterr().err
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # the usual case here: gs:// is an extra
        with pytest.raises(StorageError, match=r"pip install 'prefect-anthropic\[gcs\]'"):
            Storage().filesystem("gs://bucket/x")


async def test_outputs_on_s3_are_written_whole_or_not_at_all(bucket):
    storage = Storage.from_environment()
    target = f"{bucket}/whole/results.jsonl"
    with pytest.raises(RuntimeError), storage.atomic_writer(target) as handle:
        handle.write(b"half of it")
        raise RuntimeError("the run dies mid-write")
    assert not storage.exists(target)  # abandoned, never committed
    await asyncio.to_thread(storage.write_text, target, "all of it")
    assert storage.read_text(target) == "all of it"


def test_the_dataset_is_a_prefect_asset_with_its_figures(prefect_server, start_emulator, bucket, tmp_path, monkeypatch):
    """The merge materializes the dataset: key its URL, upstream the input's, metadata with its figures; the
    materialization event is in the server's event feed."""
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    emu = start_emulator(latency_ms=2)
    requests = f"{bucket}/in/requests.jsonl"
    local = write_requests(tmp_path / "requests.jsonl", 20, extra=["{broken"])
    Storage.from_environment().write_bytes(requests, local.read_bytes())
    out = f"{bucket}/datasets/assets"
    argv = ["run", requests, "--output-dir", out, "--base-url", emu.base_url, "--no-progress"]
    assert main(argv) == 1

    async def materializations():
        async with get_client() as client:
            response = await client._client.post(
                "/events/filter",
                json={"filter": {"event": {"name": ["prefect.asset.materialization.succeeded"]}}, "limit": 50},
            )
            return [event for event in response.json()["events"] if event["resource"]["prefect.resource.id"] == out]

    deadline = time.monotonic() + 20
    events = asyncio.run(materializations())
    while not events and time.monotonic() < deadline:
        time.sleep(0.5)
        events = asyncio.run(materializations())
    assert len(events) == 1
    event = events[0]
    related = {resource["prefect.resource.id"]: resource for resource in event["related"]}
    assert requests in related  # upstream: the input's URL
    assert event["payload"]["rows"] == 21 and event["payload"]["succeeded"] == 20 and event["payload"]["failed"] == 1
    assert event["payload"]["models"] == {"claude-sonnet-4-6": 20}
    assert event["payload"]["cost_usd"] == pytest.approx(emu.stats()["cost_usd"], abs=1e-6)
