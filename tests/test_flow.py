"""The Prefect flow end to end: real Prefect (test server), real HTTP to the emulator, real files."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import message_body, write_requests
from prefect_anthropic import AnthropicClientConfig, AnthropicCredentials, ClientSettings
from prefect_anthropic.engine import AuthenticationError
from prefect_anthropic.orchestration.flows import generate_dataset

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-flow-key")


async def run_flow(emu, requests, output_dir, **options):
    settings = options.pop("settings", None) or ClientSettings(base_url=emu.base_url, max_concurrency=10)
    return await generate_dataset(str(requests), str(output_dir), settings=settings, **options)


async def test_dataset_is_complete_ordered_and_typed(emulator, tmp_path):
    batch_style = json.dumps({"custom_id": "from-batch", "params": message_body("batch style line")})
    bad = [
        "{not json",
        "[1, 2, 3]",
        json.dumps({"max_tokens": 10, "messages": [{"role": "user", "content": "no model"}]}),
        json.dumps(message_body("bad role") | {"messages": [{"role": "robot", "content": "x"}]}),
        "",
        batch_style,
    ]
    requests = write_requests(tmp_path / "requests.jsonl", 30, extra=bad)
    summary = await run_flow(emulator, requests, tmp_path / "out", shard_size=7)

    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["line"]) == [*range(1, 35), 36]  # line 35 is blank: not a request
    ok = frame[frame["status"] == "succeeded"]
    assert len(ok) == 31 and summary["succeeded"] == 31 and summary["failed"] == 4
    for row in ok.itertuples():
        if row.custom_id == "from-batch":
            assert row.text == "echo: batch style line" and row.line == 36
        else:
            assert row.text == f"echo: Question {row.line - 1}: what is {row.line - 1} times 8?"
            assert json.loads(row.metadata) == {"row_id": row.line - 1}
    errors = frame[frame["status"] == "errored"].set_index("line")
    assert "invalid JSON" in errors.loc[31, "error_message"] and "line 31" in errors.loc[31, "error_message"]
    assert "expected a JSON object" in errors.loc[32, "error_message"]
    assert "missing required field model" in errors.loc[33, "error_message"]
    assert "role" in errors.loc[34, "error_message"]

    schema = pq.read_schema(tmp_path / "out" / "results.parquet")
    assert str(schema.field("input_tokens").type) == "int64" and str(schema.field("cost_usd").type) == "double"
    rows = duckdb.sql(f"select count(*), sum(cost_usd) from '{tmp_path / 'out' / 'results.parquet'}'").fetchall()[0]
    assert rows[0] == 35 and rows[1] == pytest.approx(summary["cost_usd"])
    jsonl = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in jsonl] == list(frame["line"]) and jsonl[0]["metadata"] == {"row_id": 0}
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["requests"] == 35 and on_disk["failed_by_error_type"]["invalid_request"] == 4
    assert emulator.stats()["billed_requests"] == 31


async def test_concurrent_shards_share_one_limiter(start_emulator, tmp_path, monkeypatch):
    from prefect_anthropic.engine.limiter import RateLimiter

    admitted: list[tuple[int, float]] = []  # (which limiter, when, on its own clock)
    acquire = RateLimiter.acquire

    async def recording(self, *costs):
        reservation = await acquire(self, *costs)
        admitted.append((id(self), self._clock()))
        return reservation

    monkeypatch.setattr(RateLimiter, "acquire", recording)
    emu = start_emulator()  # the server does not limit: only the shared client limiter does
    requests = write_requests(tmp_path / "requests.jsonl", 60)
    settings = ClientSettings(base_url=emu.base_url, requests_per_minute=600, max_concurrency=20)
    await run_flow(emu, requests, tmp_path / "out", settings=settings, shard_size=15, max_parallel_shards=4)
    assert emu.stats()["billed_requests"] == 60
    assert len(admitted) == 60 and len({limiter for limiter, _ in admitted}) == 1  # four shards, one limiter
    # 10 requests/s in all, after a burst of half a second's worth (5): the k-th admission needs k + 1 tokens,
    # of which at most 5 were in the bucket at the first. (Arrival times at an in-process emulator would also
    # measure how the machine's load bunches them: the limiter's own clock is what it promises on.)
    first = admitted[0][1]
    for k, (_, when) in enumerate(admitted):
        assert when - first >= (k - 4) / 10 - 1e-6, (k, when - first)


async def test_orchestrator_retries_resume_a_failed_shard(start_emulator, tmp_path):
    emu = start_emulator(seed=3, error_rate_529=0.3)
    requests = write_requests(tmp_path / "requests.jsonl", 40)
    settings = ClientSettings(base_url=emu.base_url, max_attempts=1, max_concurrency=10)
    summary = await run_flow(
        emu, requests, tmp_path / "out", settings=settings, shard_size=20, shard_retries=8, shard_retry_delay_s=0
    )
    stats = emu.stats()
    assert summary["succeeded"] == 40
    assert stats["responses_by_status"]["529"] > 0  # shards failed and were retried by Prefect
    assert stats["billed_requests"] == 40 and stats["duplicate_billed_requests"] == 0


async def test_a_rerun_on_the_same_input_sends_nothing(emulator, tmp_path):
    requests = write_requests(tmp_path / "requests.jsonl", 25)
    first = await run_flow(emulator, requests, tmp_path / "out", shard_size=10)
    before = emulator.stats()["requests_total"]
    second = await run_flow(emulator, requests, tmp_path / "out", shard_size=10)
    assert emulator.stats()["requests_total"] == before
    assert second["succeeded"] == first["succeeded"] == 25 and second["requests_sent_this_run"] == 0


async def test_wrong_key_stops_the_flow_with_a_clear_error(start_emulator, tmp_path):
    emu = start_emulator(api_key="the-real-key", latency_ms=10)
    requests = write_requests(tmp_path / "requests.jsonl", 500)
    with pytest.raises(AuthenticationError, match="Check the API key"):
        await run_flow(emu, requests, tmp_path / "out", shard_size=100)
    assert emu.stats()["requests_total"] <= 10 + 1


async def test_saved_blocks_drive_the_run_and_the_key_is_no_parameter(emulator, tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    secret = "sk-ant-block-secret-0123456789"
    credentials = AnthropicCredentials(api_key=secret, base_url=emulator.base_url)
    await credentials.save("flow-test-credentials", overwrite=True)
    await AnthropicClientConfig(credentials=credentials, tier="4", max_concurrency=8).save(
        "flow-test-client", overwrite=True
    )
    requests = write_requests(tmp_path / "requests.jsonl", 10)
    summary = await generate_dataset(str(requests), str(tmp_path / "out"), client_block="flow-test-client")
    assert summary["succeeded"] == 10 and summary["limits"]["sonnet-4"]["requests_per_minute"] == 4000

    from prefect.client.orchestration import get_client

    async with get_client() as client:
        runs = await client.read_flow_runs()
    assert runs and all(secret not in json.dumps(run.parameters, default=str) for run in runs)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()


async def test_progress_and_summary_artifacts_have_keys_of_their_dataset(emulator, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from prefect_anthropic.orchestration.observability import artifact_keys

    requests = write_requests(tmp_path / "requests.jsonl", 12)
    await run_flow(emulator, requests, tmp_path / "out", shard_size=5)
    await run_flow(emulator, requests, tmp_path / "other", shard_size=5)
    keys, other = artifact_keys(str(tmp_path / "out")), artifact_keys(str(tmp_path / "other"))
    assert keys["summary"] != other["summary"] and keys["summary"].startswith("anthropic-out-")
    async with get_client() as client:
        for key in (*keys.values(), *other.values()):
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert len(found) == 1, key  # each dataset its own history
        summary = (
            await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[keys["summary"]])))
        )[0]
    assert "12/12 succeeded, 0 failed" in summary.data


async def test_two_datasets_gathered_in_one_flow_share_the_account_not_the_client(start_emulator, tmp_path):
    """A user's flow generating two datasets at once: one client each (neither closes the other's), one set of
    limits for the account; both finish without a shard retry."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    emu = start_emulator(latency_ms=20)
    small = write_requests(tmp_path / "small.jsonl", 10)
    large = write_requests(tmp_path / "large.jsonl", 80, start=100)
    settings = ClientSettings(base_url=emu.base_url, max_concurrency=8, requests_per_minute=1200)

    @flow(name="two-datasets")
    async def two_datasets():
        return await asyncio.gather(
            generate_dataset(str(small), str(tmp_path / "small"), settings=settings, shard_size=5),
            generate_dataset(str(large), str(tmp_path / "large"), settings=settings, shard_size=20),
        )

    state = await two_datasets(return_state=True)
    first, second = await state.aresult()
    assert first["succeeded"] == 10 and second["succeeded"] == 80
    assert emu.stats()["billed_requests"] == 90 and emu.stats()["duplicate_billed_requests"] == 0
    async with get_client() as client:
        parent = FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
        datasets = await client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
        assert len(datasets) == 2
        ids = FlowRunFilterId(any_=[run.id for run in datasets])
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=ids))
    shard_runs = [run for run in runs if run.name.startswith("shard-")]
    assert len(shard_runs) >= 2 + 4 and all(run.run_count == 1 for run in shard_runs)  # no shard was retried
    assert all(run.state is not None and run.state.is_completed() for run in shard_runs)
