"""Resume by request, not by layout (issue 25, finding 5): a rerun with another `--shard-size` finds every answer
already paid for, whatever layout it was written under, on a local directory and on a bucket (moto's S3 server),
and sends nothing twice; the dataset holds every row once. The emulator's billing is the proof."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pyarrow.parquet as pq
import pytest

from conftest import message_body, write_requests
from prefect_anthropic import ClientSettings, RunOptions
from prefect_anthropic.dataset.shard_loop import run_dataset
from prefect_anthropic.storage import Storage

KEY = "sk-ant-fake-resume-layout"
LINES = 30


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    """Where the dataset goes: a local directory, or a fresh bucket on moto's S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('bucket')}/datasets/layouts"


def read_rows(out: str) -> list[dict]:
    with Storage.from_environment().open(f"{out}/results.parquet") as handle:
        return pq.read_table(handle).to_pylist()


def assert_every_row_once(out: str, lines: int = LINES) -> list[dict]:
    rows = read_rows(out)
    assert [row["line"] for row in rows] == list(range(1, lines + 1))
    assert all(row["status"] == "succeeded" for row in rows), [r for r in rows if r["status"] != "succeeded"][:3]
    assert [json.loads(row["metadata"])["row_id"] for row in rows] == list(range(lines))
    return rows


def run(requests, out: str, settings: ClientSettings, shard_size: int, **settings_changes) -> dict:
    options = RunOptions(shard_size=shard_size, shard_retry_delay_s=0.1)
    return asyncio.run(run_dataset(str(requests), out, settings.model_copy(update=settings_changes), KEY, options))


def test_another_shard_size_sends_nothing_already_paid(start_emulator, tmp_path, output):
    """The finding: 30 lines with shards of 10, then of 7: the second run used to pay all 30 again."""
    emu = start_emulator(latency_ms=2, seed=1)
    settings = ClientSettings(base_url=emu.base_url)
    requests = write_requests(tmp_path / "requests.jsonl", LINES)
    assert run(requests, output, settings, 10)["succeeded"] == LINES
    assert emu.stats()["billed_requests"] == LINES
    summary = run(requests, output, settings, 7)
    stats = emu.stats()
    assert stats["billed_requests"] == LINES and stats["duplicate_billed_requests"] == 0, stats
    assert summary["succeeded"] == LINES and summary["requests_sent_this_run"] == 0
    assert_every_row_once(output)
    # A third layout, and the first again: still nothing sent.
    run(requests, output, settings, 4)
    run(requests, output, settings, 10)
    assert emu.stats()["billed_requests"] == LINES
    assert_every_row_once(output)


def test_two_layouts_partly_done_then_a_third(start_emulator, tmp_path, output):
    """A run of shards of 5 stopped by its budget, a run of shards of 7 stopped by a higher one, then shards of 4
    with no budget: each request paid once; the budget's unsent rows (not final) are sent, never the answers."""
    emu = start_emulator(latency_ms=2, seed=2)
    settings = ClientSettings(base_url=emu.base_url, max_concurrency=2)
    requests = write_requests(tmp_path / "requests.jsonl", LINES)
    first = run(requests, output, settings, 5, max_cost_usd=0.003)
    assert first["stopped_by_budget"] and 0 < first["succeeded"] < LINES, first
    second = run(requests, output, settings, 7, max_cost_usd=0.006)
    assert second["succeeded"] > first["succeeded"], (first, second)
    assert emu.stats()["duplicate_billed_requests"] == 0
    billed_partly = emu.stats()["billed_requests"]
    assert billed_partly == second["succeeded"] < LINES, (billed_partly, second)
    third = run(requests, output, settings, 4)
    stats = emu.stats()
    assert stats["billed_requests"] == LINES and stats["duplicate_billed_requests"] == 0, stats
    assert third["requests_sent_this_run"] == LINES - billed_partly
    assert_every_row_once(output)


def test_an_edited_line_is_sent_once_under_every_layout(start_emulator, tmp_path, output):
    """Matched by line and request digest: an edited line is sent again (once), and its new answer is found by
    the other layouts; its old answer is never taken for the new request."""
    emu = start_emulator(latency_ms=2, seed=3)
    settings = ClientSettings(base_url=emu.base_url)
    requests = write_requests(tmp_path / "requests.jsonl", LINES)
    run(requests, output, settings, 10)
    run(requests, output, settings, 7)
    lines = requests.read_text().splitlines()
    lines[4] = json.dumps(message_body("Question 4, edited: what is 4 times 9?", metadata={"row_id": 4}))
    requests.write_text("\n".join(lines) + "\n")
    run(requests, output, settings, 10)
    assert emu.stats()["billed_requests"] == LINES + 1
    for size in (7, 4, 10):
        run(requests, output, settings, size)
    stats = emu.stats()
    assert stats["billed_requests"] == LINES + 1 and stats["duplicate_billed_requests"] == 0, stats
    assert_every_row_once(output)  # line 5's row is the edited request's: merged by line and digest


async def test_batch_mode_finds_answers_and_batches_of_another_layout(
    start_emulator, tmp_path, prefect_server, monkeypatch
):
    """Batch mode: batches created under shards of 10 and not collected yet are paid for, so a run with shards of
    7 refuses to submit those lines again (naming the size that collects them); once collected, shards of 7 find
    every answer and submit nothing."""
    from prefect_anthropic.dataset.batch_mode import BatchesOfAnotherLayout
    from prefect_anthropic.orchestration.flows import generate_dataset

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    emu = start_emulator(batch_delay_s=600, seed=4)  # the batches end when the test moves the emulator's clock
    settings = ClientSettings(base_url=emu.base_url)
    requests = write_requests(tmp_path / "requests.jsonl", LINES)
    out = tmp_path / "out"

    def batch_run(shard_size: int):
        return generate_dataset(
            str(requests), str(out), settings=settings, mode="batch", shard_size=shard_size, batch_poll_interval_s=0.2
        )

    def batches_recorded() -> int:
        states = [json.loads(path.read_text()) for path in out.glob(".shards-10/*.batches.json")]
        return sum(len(round_["batches"]) for state in states for round_ in state["rounds"])

    first = asyncio.create_task(batch_run(10))
    while batches_recorded() < 3:
        assert not first.done(), first.exception()
        await asyncio.sleep(0.05)
    first.cancel()  # the run is lost while its three batches run at Anthropic
    with contextlib.suppress(asyncio.CancelledError):
        await first
    with pytest.raises(BatchesOfAnotherLayout, match="--shard-size 10"):
        await asyncio.wait_for(batch_run(7), timeout=60)  # before the fix: it submitted again, and waited
    assert emu.stats()["billed_batch_requests"] == 0 and len(listed_batches(emu)) == 3  # none submitted again
    emu.advance(1_200)
    assert (await batch_run(10))["succeeded"] == LINES  # collects the three batches, submits none
    summary = await batch_run(7)
    assert summary["succeeded"] == LINES
    stats = emu.stats()
    assert len(listed_batches(emu)) == 3 and stats["billed_batch_requests"] == LINES, stats
    assert stats["duplicate_billed_requests"] == 0 and stats["requests_total"] == 0
    assert_every_row_once(str(out))


def listed_batches(emu) -> list[str]:
    import httpx

    from conftest import HEADERS

    response = httpx.get(
        f"{emu.base_url}/v1/messages/batches", params={"limit": 1000}, headers={**HEADERS, "x-api-key": KEY}
    )
    return [batch["id"] for batch in response.json()["data"]]
