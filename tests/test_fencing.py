"""A run acts only while it can prove it holds its output (issue 25, finding 1 and the template finding 3).

A run on s3:// paused past its lease (SIGSTOP: what a VM suspend, a long GC or a stalled network does) lets a
second run take the output over; when it resumes it must send nothing more and exit 2. The lease's life is
shortened for these tests (PREFECT_ANTHROPIC_LEASE_TTL_S) so that a pause of seconds outlives it; every run on
one output agrees on it, as it must.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from conftest import write_requests
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.storage import Storage

KEY = "sk-ant-fake-fencing"
TTL_S = "3"


def env(**extra: str) -> dict[str, str]:
    """A CLI subprocess's environment: this session's Prefect test server, the short lease."""
    from prefect.settings import PREFECT_API_URL

    return {
        **{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "ANTHROPIC_API_KEY": KEY,
        "PYTHONUNBUFFERED": "1",
        "PREFECT_ANTHROPIC_LEASE_TTL_S": TTL_S,
        **extra,
    }


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the run ended first:\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)


def lease_holder(storage: Storage, out: str) -> dict | None:
    try:
        return json.loads(storage.read_text(f"{out}/.prefect-anthropic.lease"))
    except (OSError, ValueError):
        return None


def test_a_run_paused_past_its_s3_lease_stops_when_it_resumes_and_pays_nothing_twice(prefect_server, bucket, tmp_path):
    out = f"{bucket}/datasets/paused"
    requests = write_requests(tmp_path / "requests.jsonl", 100)
    storage = Storage.from_environment()
    # Five requests a second, each answered after 2 s: about ten in flight at any moment.
    with emulator_process(requests_per_minute=300, burst_seconds=1, ttft_ms=2_000, seed=3) as emu:
        command = [
            sys.executable, "-m", "prefect_anthropic.cli", "run", str(requests), "--output-dir", out,
            "--base-url", emu.base_url, "--no-progress", "--requests-per-minute", "300", "--shard-size", "50",
        ]  # fmt: skip
        first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
        first = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=first_log.open("wb"))
        second = None
        try:
            wait_for(lambda: emu.stats()["billed_requests"] >= 15, 120, "the first run sending", first, first_log)
            first.send_signal(signal.SIGSTOP)
            paused_at = emu.stats()["billed_requests"]
            time.sleep(float(TTL_S) + 3)  # past the lease's life: another run may take the output over
            second = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=second_log.open("wb"))
            wait_for(
                lambda: (lease_holder(storage, out) or {}).get("pid") == second.pid,
                120, "the second run taking the lease over", second, second_log,
            )  # fmt: skip
            first.send_signal(signal.SIGCONT)
            assert first.wait(timeout=120) == 2, first_log.read_text()[-3000:]
            assert second.wait(timeout=300) == 0, second_log.read_text()[-3000:]
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                    process.wait(timeout=30)
        stats = emu.stats()
    error = first_log.read_text()
    assert "lost its hold" in error and "Traceback" not in error, error[-3000:]
    # Paid twice: at most what the first run had in flight when it was paused (about ten; never the ~85 lines
    # it had left, which it would have sent beside the second run).
    assert stats["duplicate_billed_requests"] <= 20, (stats, paused_at)
    frame = pd.read_parquet(f"{out}/results.parquet")
    assert list(frame["line"]) == list(range(1, 101)) and (frame["status"] == "succeeded").all()


def test_two_runs_racing_for_a_stale_lease_one_wins_the_other_is_told_in_use(bucket, monkeypatch):
    from prefect_anthropic.dataset import run_lock
    from prefect_anthropic.dataset.run_lock import OutputDirectoryLocked, hold_output_location

    storage = Storage.from_environment()
    out = f"{bucket}/datasets/race"
    monkeypatch.setattr(run_lock, "LEASE_TTL_S", 0.5)
    with hold_output_location(out, storage) as dead:
        dead.close()  # stops renewing, as a killed run would (the lease object stays)
        time.sleep(1.0)
        outcomes: list[object] = []
        barrier = threading.Barrier(4)

        def contender() -> None:
            barrier.wait()
            try:
                with hold_output_location(out, Storage.from_environment()) as hold:
                    outcomes.append(hold)
                    time.sleep(1.0)
            except OutputDirectoryLocked as error:
                outcomes.append(error)

        threads = [threading.Thread(target=contender) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    winners = [o for o in outcomes if not isinstance(o, Exception)]
    losers = [o for o in outcomes if isinstance(o, OutputDirectoryLocked)]
    assert len(winners) == 1 and len(losers) == 3, outcomes
    assert all("nothing was sent" in str(error) for error in losers)


def test_a_hold_whose_lease_was_taken_over_refuses_every_write_and_request(bucket, monkeypatch):
    import asyncio

    from prefect_anthropic.dataset import run_lock
    from prefect_anthropic.dataset.leases import lease_object
    from prefect_anthropic.dataset.run_lock import OutputTakenOver, hold_output_location

    storage = Storage.from_environment()
    out = f"{bucket}/datasets/taken"
    monkeypatch.setattr(run_lock, "SAFE_FOR_S", 0.0)  # every check proves the hold again
    with hold_output_location(out, storage) as hold:
        hold.check()  # held: the renewal succeeds
        lease = lease_object(storage, f"{out}/.prefect-anthropic.lease")
        assert lease is not None
        state = lease.read()
        assert state is not None
        lease.replace(b'{"run_id": "another run"}', state.token)  # another run took it over
        with pytest.raises(OutputTakenOver, match="lost its hold"):
            hold.check()
        with pytest.raises(OutputTakenOver):
            asyncio.run(hold.ensure())
        storage.fence = hold.check
        with pytest.raises(OutputTakenOver):
            storage.write_text(f"{out}/results.jsonl", "clobbered")
        storage.write_bytes(f"{out}/.shards-5/shard-00000/part-1.jsonl", b"{}\n", immutable=True)  # never clobbers
    assert not storage.exists(f"{out}/results.jsonl")
    assert lease_holder(storage, out) == {"run_id": "another run"}  # a lost lease is not released


def test_a_second_run_with_a_template_leaves_the_first_runs_dataset_whole(prefect_server, tmp_path):
    table = tmp_path / "products.csv"
    table.write_text("sku,name\n" + "".join(f"sku-{i},product {i}\n" for i in range(60)))
    out = tmp_path / "out"
    with emulator_process(requests_per_minute=600, burst_seconds=1, ttft_ms=1_000, seed=4) as emu:

        def command(template: str) -> list[str]:
            return [
                sys.executable, "-m", "prefect_anthropic.cli", "run", str(table), "--output-dir", str(out),
                "--template", template, "--model", "claude-sonnet-4-6", "--max-tokens", "20",
                "--base-url", emu.base_url, "--no-progress", "--shard-size", "20",
            ]  # fmt: skip

        log = tmp_path / "first.log"
        first = subprocess.Popen(command("Describe {{ name }}."), env=env(), stderr=log.open("wb"))
        try:
            wait_for(lambda: emu.stats()["billed_requests"] >= 5, 120, "the first run sending", first, log)
            second = subprocess.run(command("Name {{ sku }}."), env=env(), capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and "in use" in second.stderr, second.stderr[-3000:]
            assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(timeout=30)
        stats = emu.stats()
    frame = pd.read_parquet(out / "results.parquet")
    assert list(frame["sku"]) == [f"sku-{i}" for i in range(60)] and (frame["status"] == "succeeded").all()
    assert all(text.startswith("echo: Describe") for text in frame["text"]), list(frame["text"])[:3]
    assert stats["billed_requests"] == 60  # the second run sent nothing
    rendered = sorted(path.name for path in out.glob("requests.from-table.*"))
    assert len(rendered) == 1, rendered  # the refused run removed its render


def test_an_input_table_among_the_outputs_files_is_refused(prefect_server, tmp_path, capsys):
    from prefect_anthropic.cli import main

    out = tmp_path / "out"
    out.mkdir()
    pd.DataFrame({"sku": ["a", "b"], "name": ["x", "y"]}).to_parquet(out / "results.parquet")
    code = main([
        "run", str(out / "results.parquet"), "--output-dir", str(out), "--template", "Describe {{ name }}.",
        "--model", "claude-sonnet-4-6", "--max-tokens", "20", "--api-key", KEY, "--no-progress",
        "--base-url", "http://127.0.0.1:9",
    ])  # fmt: skip
    assert code == 2
    assert "would be overwritten" in capsys.readouterr().err
    assert len(pd.read_parquet(out / "results.parquet")) == 2


def test_a_redis_lock_taken_over_is_a_lost_hold_not_a_warning(redis_url, tmp_path, monkeypatch):
    import hashlib

    import redis

    from prefect_anthropic.dataset import run_lock
    from prefect_anthropic.dataset.run_lock import OutputTakenOver, hold_output_location
    from prefect_anthropic.engine.shared_limiter import KEY_PREFIX

    monkeypatch.setattr(run_lock, "SAFE_FOR_S", 0.0)  # every check proves the hold again
    out = tmp_path / "out"
    with hold_output_location(str(out), None, redis_url) as hold:
        hold.check()
        name = f"{KEY_PREFIX}:directory-lock:{hashlib.sha256(str(out.absolute()).encode()).hexdigest()[:32]}"
        client = redis.Redis.from_url(redis_url)
        assert client.get(name) == hold.run_id.encode()  # the lock's token is the run id
        client.set(name, b"another run", ex=30)  # it expired, and another machine's run took it
        with pytest.raises(OutputTakenOver, match="no longer its own"):
            hold.check()
        client.close()


def test_a_store_without_conditional_writes_is_refused_unless_redis_holds_it(redis_url):
    from prefect_anthropic.dataset.run_lock import OutputDirectoryLocked, hold_output_location

    refused = pytest.raises(OutputDirectoryLocked, match=r"hf:// cannot write conditionally.*--limiter-url")
    with refused, hold_output_location("hf://datasets/someone/out", Storage()):
        pass
    with hold_output_location("hf://datasets/someone/out", Storage(), redis_url) as hold:  # the Redis lock holds it
        hold.check()


def test_a_renewal_gives_the_lease_a_new_version_so_a_stale_takeover_is_refused(bucket):
    """Review finding: the holder's body was the same at every renewal, so S3's ETag (the content's MD5) stayed
    the same, and a run taking over on the version it read before the renewal was not refused."""
    from prefect_anthropic.dataset.leases import LeaseConflict, lease_object
    from prefect_anthropic.dataset.run_lock import hold_output_location

    storage = Storage.from_environment()
    out = f"{bucket}/datasets/aba"
    with hold_output_location(out, storage) as hold:
        lease = lease_object(storage, f"{out}/.prefect-anthropic.lease")
        assert lease is not None
        before = lease.read()  # what a run about to take over has read
        assert before is not None
        assert hold._renew(0)  # the holder renews meanwhile (it was paused, and resumed)
        with pytest.raises(LeaseConflict):
            lease.replace(b'{"run_id": "late taker"}', before.token)
        hold.check()


def test_a_redis_lock_lost_with_a_restarted_redis_is_taken_again_not_a_lost_hold(redis_url, tmp_path, monkeypatch):
    import hashlib

    import redis

    from prefect_anthropic.dataset import run_lock
    from prefect_anthropic.dataset.run_lock import hold_output_location
    from prefect_anthropic.engine.shared_limiter import KEY_PREFIX

    monkeypatch.setattr(run_lock, "SAFE_FOR_S", 0.0)
    out = tmp_path / "out"
    with hold_output_location(str(out), None, redis_url) as hold:
        name = f"{KEY_PREFIX}:directory-lock:{hashlib.sha256(str(out.absolute()).encode()).hexdigest()[:32]}"
        client = redis.Redis.from_url(redis_url)
        client.delete(name)  # Redis restarted without its data
        hold.check()  # still this run's: nobody else holds it, so it is taken again
        assert client.get(name) == hold.run_id.encode()
        client.close()


async def test_requests_in_flight_are_saved_when_the_input_cannot_be_read_on(start_emulator, tmp_path):
    """Review finding: an input that raised mid-shard (a store outage, a file gone) skipped the drain, and the
    requests in flight, already paid for, were never saved."""
    from conftest import message_body
    from prefect_anthropic import ClientSettings
    from prefect_anthropic.engine import AnthropicClient, ResultsWriter, read_records, run_requests
    from prefect_anthropic.engine.records import RequestItem

    emu = start_emulator(latency_ms=500)

    async def items():
        for line in range(1, 6):
            yield RequestItem(line=line, custom_id=f"r{line}", body=message_body(f"question {line}"))
        await asyncio.sleep(0.1)  # all five are on their way
        raise OSError("the store holding the request file cannot be reached")

    path = tmp_path / "shard.jsonl"
    async with AnthropicClient(KEY, ClientSettings(base_url=emu.base_url)) as client:
        with ResultsWriter(path) as writer, pytest.raises(OSError, match="cannot be reached"):
            await run_requests(client, items(), writer=writer)
    assert sorted(record["line"] for record in read_records(path)) == [1, 2, 3, 4, 5]
    assert emu.stats()["billed_requests"] == 5
