"""What the Prefect UI tells a user watching a run (issue 21), read back from a real Prefect server: logs,
the final state's message, artifacts that add up across shard retries, events for automations."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from conftest import write_requests
from prefect_anthropic.cli import main
from prefect_anthropic.orchestration.observability import artifact_keys

pytestmark = pytest.mark.usefixtures("prefect_server")

BAD_LINES = [
    "{not json",
    json.dumps({"max_tokens": 10, "messages": [{"role": "user", "content": "no model"}]}),
    json.dumps({"model": "claude-nonexistent-9", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}),
]


async def _eventually(read, ready, timeout: float = 20.0):
    """Logs and events reach the server in the background: read until they are there."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await read()
        if ready(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.5)


def _money(text: str) -> float:
    return float(re.search(r"\$([0-9,.]+)", text).group(1).replace(",", ""))


def test_logs_state_artifacts_and_events_add_up_across_shard_retries(start_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-ui")
    # 500s on a fifth of the attempts and two attempts a request: shards end with retryable failures and
    # Prefect retries them, each retry resuming with only those lines.
    emu = start_emulator(seed=4, error_rate_500=0.2, latency_ms=5)
    requests = write_requests(tmp_path / "requests.jsonl", 300, extra=BAD_LINES)
    out = tmp_path / "out"
    argv = ["run", str(requests), "--output-dir", str(out), "--base-url", emu.base_url, "--no-progress"]
    argv += ["--max-attempts", "2", "--shard-size", "100", "--shard-retries", "5", "--shard-retry-delay", "0.2"]
    assert main(argv) == 1  # 3 lines failed
    summary = json.loads((out / "summary.json").read_text())
    ledger = emu.stats()
    assert summary["succeeded"] == 300 and summary["failed"] == 3
    assert summary["requests_sent_this_run"] == 301  # 303 lines less the 2 that can never be sent
    assert ledger["responses_by_status"]["404"] == 1  # the unknown model's line: sent once, never again
    assert summary["cost_usd"] == pytest.approx(ledger["cost_usd"], abs=1e-4)
    asyncio.run(_check_the_server(out, summary, ledger))


async def _check_the_server(out, summary, ledger) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
    )
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    async with get_client() as client:
        flow_run = (await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1))[0]
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        # The state says what happened, not only "Completed".
        assert flow_run.state.is_completed()
        assert re.fullmatch(r"300/303 succeeded, 3 failed, \$[0-9.]+, \d+ s", flow_run.state.message)
        assert _money(flow_run.state.message) == pytest.approx(ledger["cost_usd"], abs=1e-4)
        # A shard was retried, and the run said why; its task names say which lines.
        tasks = await client.read_task_runs(flow_run_filter=run_filter, task_run_filter=TaskRunFilter())
        names = {task.name for task in tasks}
        assert {"plan-shards", "merge-shards", "shard-00002 (lines 201-300)"} <= names
        assert any(task.run_count > 1 for task in tasks if task.name.startswith("shard-"))
        logs = await _eventually(
            lambda: client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))),
            lambda found: any("Done: 300/303 succeeded" in log.message for log in found),
        )
        messages = [log.message for log in logs]
        assert any(re.search(r"Shard \d done: \d+ answered", message) for message in messages)  # the package's lines
        assert any("retryable errors" in message for message in messages)  # why a shard was retried
        assert any("Done: 300/303 succeeded, 3 failed" in message for message in messages)

        # Artifacts under keys of this dataset, with figures that agree with the ledger.
        keys = artifact_keys(str(out))
        assert summary["artifacts"] == keys

        async def latest(key: str):
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.UPDATED_DESC
            )
            return found[0]

        progress = await latest(keys["progress"])
        assert progress.data == 100.0
        assert _money(progress.description) == pytest.approx(ledger["cost_usd"], abs=1e-4)  # "$0.0431 of ~..."
        assert progress.description.startswith("303/303 requests, 3 failed")
        markdown = (await latest(keys["summary"])).data
        assert "300/303 succeeded, 3 failed" in markdown and "| failed | 3 |" in markdown
        assert f"(/artifacts/key/{keys['failures']})" in markdown  # linked from the summary
        failures = json.loads((await latest(keys["failures"])).data)
        assert sorted(row["line"] for row in failures) == [301, 302, 303]
        assert {row["error_type"] for row in failures} == {"invalid_request", "not_found_error"}

        # The event automations react to, with the same figures.
        async def finished_events():
            response = await client._client.post(
                "/events/filter", json={"filter": {"event": {"name": ["prefect-anthropic.run.finished"]}}}
            )
            return [
                event
                for event in response.json()["events"]
                if any(r["prefect.resource.id"] == f"prefect.flow-run.{flow_run.id}" for r in event["related"])
            ]

        events = await _eventually(finished_events, bool)
    assert len(events) == 1
    payload = events[0]["payload"]
    assert payload["succeeded"] == 300 and payload["failed"] == 3 and payload["requests_sent_this_run"] == 301
    assert payload["cost_usd"] == pytest.approx(ledger["cost_usd"], abs=1e-4)
    assert events[0]["resource"]["prefect-anthropic.outcome"] == "failed-rows"


def test_fail_on_errors_ends_the_flow_run_failed_with_the_same_message(start_emulator, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-ui")
    emu = start_emulator(latency_ms=5)
    requests = write_requests(tmp_path / "requests.jsonl", 20, extra=BAD_LINES[:1])
    argv = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emu.base_url, "--no-progress"]
    assert main([*argv, "--fail-on-errors"]) == 1

    async def last_flow_run():
        async with get_client() as client:
            return (await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1))[0]

    flow_run = asyncio.run(last_flow_run())
    assert flow_run.state.is_failed() and flow_run.state.message.startswith("20/21 succeeded, 1 failed")
    assert (tmp_path / "out" / "results.parquet").exists()  # the dataset is written all the same


def test_a_budget_stop_and_the_breaker_are_events(start_emulator, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-ui")
    emu = start_emulator(latency_ms=5)
    requests = write_requests(tmp_path / "requests.jsonl", 60)
    argv = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emu.base_url, "--no-progress"]
    assert main([*argv, "--max-cost-usd", "0.01"]) == 3
    down = start_emulator(error_rate_529=1.0)
    argv = ["run", str(requests), "--output-dir", str(tmp_path / "down"), "--base-url", down.base_url]
    assert main([*argv, "--no-progress", "--give-up-after", "3"]) == 2

    async def event_names():
        async with get_client() as client:

            async def names():
                response = await client._client.post(
                    "/events/filter",
                    json={
                        "filter": {
                            "event": {
                                "name": ["prefect-anthropic.budget.exhausted", "prefect-anthropic.breaker.tripped"]
                            }
                        },
                        "limit": 50,
                    },
                )
                return {event["event"] for event in response.json()["events"]}

            wanted = {"prefect-anthropic.budget.exhausted", "prefect-anthropic.breaker.tripped"}
            return await _eventually(names, lambda found: wanted <= found)

    seen = asyncio.run(event_names())
    assert {"prefect-anthropic.budget.exhausted", "prefect-anthropic.breaker.tripped"} <= seen


@pytest.mark.usefixtures("prefect_server")
def test_the_readme_automation_for_failed_rows_is_accepted_by_the_server():
    import importlib.util

    from prefect.automations import Automation
    from prefect.blocks.notifications import SlackWebhook

    path = Path(__file__).resolve().parents[1] / "examples" / "notify_on_failed_rows.py"
    spec = importlib.util.spec_from_file_location("notify_on_failed_rows", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    block_id = SlackWebhook(url="https://hooks.slack.example/T000/B000").save("failed-rows-test", overwrite=True)
    created = example.failed_rows_automation(str(block_id)).create()
    stored = Automation.read(id=created.id)
    assert stored.trigger.expect == {"prefect-anthropic.run.finished"}
    assert stored.trigger.match.model_dump().get("prefect-anthropic.outcome") == "failed-rows"
