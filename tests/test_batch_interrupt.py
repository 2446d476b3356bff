"""A batch round of several batches interrupted between two creates (issue 25, item 9): the lines of the batches
never created must be sent by the next round or run, and the shard not marked done until every line has its
answer. Real emulator batches; the interruption is a create that fails (or hangs until the run is stopped)
before its request leaves, as a lost connection or a killed process does between two creates."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading

import httpx
import pandas as pd
import pytest

from conftest import HEADERS, message_body, write_requests
from prefect_anthropic import ClientSettings
from prefect_anthropic.dataset import batch_mode
from prefect_anthropic.dataset.setup import RunSetup
from prefect_anthropic.engine.batches import BatchAPI, plan_batches
from prefect_anthropic.orchestration.flows import generate_dataset, spent_in

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-batch-interrupt")


@pytest.fixture
def interrupt_second_create(monkeypatch):
    """Batches of 4 requests (3 per shard of 10), and the second create of the test interrupted as `how` says:
    "fail" raises a connection error once; "hang" never returns (the run is then stopped from outside)."""
    monkeypatch.setattr(batch_mode, "plan_batches", functools.partial(plan_batches, max_requests=4))
    real_create = BatchAPI.create
    calls: dict = {"n": 0, "how": "fail", "hung": threading.Event()}

    async def create(self: BatchAPI, requests: list) -> dict:
        calls["n"] += 1
        if calls["n"] == 2:
            if calls["how"] == "hang":
                calls["hung"].set()
                await asyncio.Event().wait()
            raise httpx.ConnectError("interrupted between two creates")
        return await real_create(self, requests)

    monkeypatch.setattr(BatchAPI, "create", create)
    return calls


def batches(emu) -> list[dict]:
    headers = {**HEADERS, "x-api-key": "sk-ant-batch-interrupt"}  # batches are listed per key
    response = httpx.get(f"{emu.base_url}/v1/messages/batches", params={"limit": 1000}, headers=headers)
    return response.json()["data"]


def batch_ids(emu) -> list[str]:
    return [batch["id"] for batch in batches(emu)]


async def all_ended(emu, within_s: float = 60.0) -> bool:
    """Every batch at the emulator has ended (the other dataset's runs on after ours was collected)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while any(batch["processing_status"] != "ended" for batch in batches(emu)):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def run_batch(emu, requests, out, **settings_fields):
    settings = ClientSettings(base_url=emu.base_url, max_concurrency=10, **settings_fields)
    return await generate_dataset(
        str(requests), str(out), settings=settings, mode="batch", batch_poll_interval_s=0.2, shard_size=10
    )


async def test_a_create_that_fails_between_two_creates_leaves_no_line_unsent(
    start_emulator, tmp_path, interrupt_second_create
):
    emu = start_emulator(batch_delay_s=0.2)
    requests = write_requests(tmp_path / "requests.jsonl", 10)
    summary = await run_batch(emu, requests, tmp_path / "out", max_cost_usd=1.0)
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["status"]) == ["succeeded"] * 10, frame[["line", "status", "error_type"]]
    assert summary["succeeded"] == 10
    stats = emu.stats()
    assert stats["billed_batch_requests"] == 10 and stats["duplicate_billed_requests"] == 0
    # The reservations of the batch never created were given back: the journal holds what was paid.
    assert spent_in(str(tmp_path / "out")) == pytest.approx(stats["cost_usd"], abs=1e-6)


async def test_a_run_stopped_between_two_creates_is_completed_by_the_next_run(
    start_emulator, tmp_path, interrupt_second_create
):
    emu = start_emulator(batch_delay_s=0.2)
    requests = write_requests(tmp_path / "requests.jsonl", 10)
    interrupt_second_create["how"] = "hang"
    first = asyncio.create_task(run_batch(emu, requests, tmp_path / "out"))
    for _ in range(1200):  # up to 60 s on a loaded machine; a moment when it is not
        if interrupt_second_create["hung"].is_set() or first.done():
            break
        await asyncio.sleep(0.05)
    assert interrupt_second_create["hung"].is_set(), "the run never reached its second create"
    first.cancel()  # stopped mid-round, between two creates
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert len(batch_ids(emu)) == 1
    assert not list((tmp_path / "out").rglob("*.done.json"))  # nothing marked done
    summary = await run_batch(emu, requests, tmp_path / "out")
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["status"]) == ["succeeded"] * 10, frame[["line", "status", "error_type"]]
    assert summary["succeeded"] == 10
    stats = emu.stats()
    assert stats["billed_batch_requests"] == 10 and stats["duplicate_billed_requests"] == 0
    assert len(batch_ids(emu)) == 3  # the first one, polled again, and one of 4 and one of 2 for the rest


async def test_a_batch_created_as_the_run_loses_its_output_is_never_paid_twice(start_emulator, tmp_path, monkeypatch):
    """Review of issue 25, item 6: the run's hold on its output is lost while a create is on the wire, so the
    fenced write that records the new batch's id raises. The rerun then relied on finding the batch by its time
    and size, and with another batch of that size created at the same time (another run of the key), it could
    not tell them apart and paid for the shard again. Each created batch's id is now recorded in an object of
    its own, written whatever the fence says (it overwrites nothing)."""
    from prefect_anthropic.dataset.run_lock import OutputTakenOver

    emu = start_emulator(batch_delay_s=0.2)
    requests = write_requests(tmp_path / "requests.jsonl", 10)
    real_create = BatchAPI.create
    created: list[str] = []
    runs = []
    real_submit = batch_mode.submit_batches

    async def submit(run, shard, retry_lines=None):
        runs.append(run)
        return await real_submit(run, shard, retry_lines)

    monkeypatch.setattr(batch_mode, "submit_batches", submit)

    def lost() -> None:
        raise OutputTakenOver(0, "output_lost", "the output was taken over (test)")

    async def create(self: BatchAPI, batch_requests: list) -> dict:
        batch = await real_create(self, batch_requests)
        created.append(batch["id"])
        if len(created) == 1:
            # Another run of the key creates a batch of the same size at the same moment...
            alike = [{**r, "params": message_body(f"another dataset {i}")} for i, r in enumerate(batch_requests)]
            await real_create(self, alike)
            for run in runs:  # ...and this run's hold is lost while its create was on the wire.
                run.store.storage.fence = lost
        return batch

    monkeypatch.setattr(BatchAPI, "create", create)
    with pytest.raises(Exception):  # noqa: B017 - stopped: how it surfaces through Prefect is not the point
        await run_batch(emu, requests, tmp_path / "out")
    assert len(created) == 1 and len(batch_ids(emu)) == 2
    summary = await run_batch(emu, requests, tmp_path / "out")
    assert summary["succeeded"] == 10
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["status"]) == ["succeeded"] * 10
    assert await all_ended(emu)
    stats = emu.stats()
    assert stats["duplicate_billed_requests"] == 0 and stats["billed_batch_requests"] == 20  # 10 ours, 10 alike
    assert len(created) == 1  # the rerun polled the batch it found recorded
    # The state file forgot it, but every reader sees it: cancel-batches too.
    setup = RunSetup.resolve(ClientSettings(base_url=emu.base_url))
    canceled = await batch_mode.cancel_batches(str(tmp_path / "out"), setup)
    assert canceled == []  # it ended; what matters is that listing it did not fail
