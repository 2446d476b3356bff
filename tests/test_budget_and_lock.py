"""Never pay more than asked (issue 12): one run per output directory, a hard budget, live cost and ETA on
the terminal, an exact estimate from count_tokens, failed lines in the Prefect UI."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pandas as pd
import pytest

from conftest import write_requests
from prefect_anthropic.cli import main
from prefect_anthropic.engine import RequestItem
from prefect_anthropic.engine.budget import (
    Budget,
    SpendingJournal,
    journaled_spending,
    max_input_tokens,
    worst_case_cost,
)
from prefect_anthropic.orchestration.flows import generate_dataset, spent_in
from prefect_anthropic.orchestration.observability import artifact_keys
from prefect_anthropic.settings import ClientSettings

pytestmark = pytest.mark.usefixtures("prefect_server")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name"]}


def cli_env(**extra) -> dict:
    """Environment for a CLI subprocess that uses this session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    state = os.environ.get("PREFECT_ANTHROPIC_STATE_DIR", "")
    return {**env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_ANTHROPIC_STATE_DIR": state, **extra}


def cli_command(requests, out, base_url, *flags) -> list[str]:
    return [sys.executable, "-m", "prefect_anthropic.cli", "run", str(requests), "--output-dir", str(out),
            "--base-url", base_url, "--api-key", "sk-ant-fake-budget", "--no-progress", *flags]  # fmt: skip


def shard_lines(out: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in out.glob(".shards-*/shard-*[0-9].jsonl"))


def wait_for_lines(process: subprocess.Popen, out: Path, lines: int) -> None:
    deadline = time.monotonic() + 90
    while shard_lines(out) < lines:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended too early"
        time.sleep(0.05)


# -- one run per output directory ----------------------------------------------------------------------------


def test_a_second_run_on_the_same_directory_sends_nothing_and_names_the_holder(start_emulator, tmp_path):
    emu = start_emulator(latency_ms=300)  # the first run lasts ~6 s: longer than the second takes to start
    requests = write_requests(tmp_path / "requests.jsonl", 200)
    out = tmp_path / "out"
    flags = ("--requests-per-minute", "3000", "--max-concurrency", "10")
    first = subprocess.Popen(cli_command(requests, out, emu.base_url, *flags), env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_lines(first, out, 10)
    # Paused while the second run starts, however long that takes on a busy machine: it still holds the OS lock.
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cli_command(requests, out, emu.base_url, *flags), env=cli_env(),
                                capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert "in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    stats = emu.stats()
    assert stats["billed_requests"] == 200 and stats["duplicate_billed_requests"] == 0


def test_a_killed_runs_lock_never_blocks_the_next(start_emulator, tmp_path):
    emu = start_emulator(latency_ms=100)
    requests = write_requests(tmp_path / "requests.jsonl", 150)
    out = tmp_path / "out"
    command = cli_command(requests, out, emu.base_url, "--requests-per-minute", "3000", "--max-concurrency", "10")
    killed = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(killed, out, 10)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=10)
    again = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(pd.read_parquet(out / "results.parquet")) == 150
    assert emu.stats()["duplicate_billed_requests"] <= 10  # at most what was in flight at the kill


# -- the budget --------------------------------------------------------------------------------------------


def test_the_worst_case_bounds_the_real_cost():
    body = {"model": "claude-sonnet-5-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]}
    # A token is at least a byte: the request's bytes (plus what the API adds) bound its input tokens.
    tokens = len(orjson.dumps(body)) + 256
    assert max_input_tokens(body) == tokens
    assert worst_case_cost("claude-sonnet-5-5", body) == pytest.approx((tokens * 2.0 + 1000 * 10.0) / 1e6)
    fast = {**body, "model": "claude-opus-5-5", "speed": "fast"}
    tokens = len(orjson.dumps(fast)) + 256
    assert worst_case_cost("claude-opus-5-5", fast) == pytest.approx(2 * (tokens * 4.0 + 1000 * 20.0) / 1e6)
    # A breakpoint: every input token may be a cache write (dearer than input), never a cheap read.
    cached = {**body, "system": [{"type": "text", "text": "policy " * 50, "cache_control": {"type": "ephemeral"}}]}
    tokens = len(orjson.dumps(cached)) + 256
    assert worst_case_cost("claude-sonnet-5-5", cached) == pytest.approx((tokens * 2.5 + 1000 * 10.0) / 1e6)
    assert worst_case_cost("claude-mythos-5-2", body) is None


def test_an_attempt_that_does_not_fit_waits_for_those_in_flight_and_the_budget_stops_when_none_can_fit():
    budget = Budget(1.0)
    first = budget.reserve(0.6)
    assert first is not None and budget.reserve(0.5) is None and not budget.exhausted  # waits: 0.6 may settle low
    budget.settle(0.6, 0.1, first)
    assert budget.spent_usd == pytest.approx(0.1) and budget.reserved_usd == 0.0 and budget.holding == 0
    assert budget.reserve(0.5) is not None
    assert budget.reserve(0.95) is None and budget.exhausted  # 0.1 spent + 0.95 > 1 whatever settles
    assert budget.reserve(0.01) is None  # exhausted: nothing more is sent


def test_the_journal_counts_what_a_killed_run_had_in_flight(tmp_path):
    budget = Budget(1.0, journal=SpendingJournal(tmp_path / "spending"))
    settled, refunded, in_flight, queued = (budget.reserve(usd) for usd in (0.2, 0.3, 0.25, 0.1))
    for entry, usd in ((settled, 0.2), (refunded, 0.3), (in_flight, 0.25)):
        budget.sent(entry, usd)
    budget.settle(0.2, 0.05, settled)
    budget.refund(0.3, refunded)
    # The process dies here: the third attempt may have been billed, so the next run counts its worst case;
    # the fourth was still waiting for the rate limiter: never sent, never billed.
    assert queued is not None and journaled_spending(tmp_path / "spending") == pytest.approx(0.05 + 0.25)
    budget.journal.close()


def test_a_budget_run_under_faults_and_repairs_stays_within_it_then_resumes(start_emulator, tmp_path):
    emu = start_emulator(seed=21, latency_ms=20, error_rate_529=0.1, error_rate_429=0.05, schema_violation_rate=0.3)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    requests = tmp_path / "requests.jsonl"
    body = {"model": "claude-sonnet-5-5", "max_tokens": 300}
    requests.write_text(
        "".join(json.dumps({**body, "messages": [{"role": "user", "content": f"Item {i}"}]}) + "\n" for i in range(60))
    )
    out = tmp_path / "out"
    args = ["run", str(requests), "--output-dir", str(out), "--base-url", emu.base_url, "--api-key", "sk-ant-fake"]
    # Enough repairs and attempts that no row fails for good by chance (0.3^11 and 0.15^8 per row): the resumed
    # run must end with every row answered.
    args += ["--schema", str(schema_file), "--validation-retries", "10", "--max-attempts", "8"]
    args += ["--max-concurrency", "8", "--no-progress"]
    assert main([*args, "--max-cost-usd", "0.02"]) == 3
    ledger = emu.stats()
    assert 0 < ledger["cost_usd"] <= 0.02
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_budget"] is True and summary["budget_usd"] == 0.02
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 60 and (frame["error_type"] == "budget_exhausted").sum() > 0
    assert set(frame["status"]) <= {"succeeded", "errored"}
    assert frame.loc[frame["error_type"] == "budget_exhausted", "error_message"].str.contains("--max-cost-usd").all()
    succeeded_before = int((frame["status"] == "succeeded").sum())
    assert succeeded_before > 0
    # A row whose paid reply failed validation and whose repair the budget then stopped has no valid answer
    # yet: its request is sent again. Nothing else may be.
    paid_without_answer = int(((frame["error_type"] == "budget_exhausted") & (frame["attempts"] > 0)).sum())

    assert main([*args, "--max-cost-usd", "5"]) == 0  # the same command with a higher budget resumes
    frame = pd.read_parquet(out / "results.parquet")
    assert (frame["status"] == "succeeded").all()
    ledger = emu.stats()
    assert ledger["duplicate_billed_requests"] <= paid_without_answer  # nothing that succeeded is paid twice
    assert ledger["cost_usd"] <= 5
    assert spent_in(str(out)) == pytest.approx(ledger["cost_usd"], abs=1e-5)  # every dollar paid is on record


async def test_batch_mode_reserves_per_batch(monkeypatch, start_emulator, tmp_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-budget")
    emu = start_emulator(batch_delay_s=0.2)
    requests = write_requests(tmp_path / "requests.jsonl", 40)
    settings = ClientSettings(base_url=emu.base_url, max_cost_usd=0.01)
    summary = await generate_dataset(
        str(requests), str(tmp_path / "out"), settings=settings, mode="batch", batch_poll_interval_s=0.2, shard_size=10
    )
    assert summary["stopped_by_budget"] is True
    assert 0 < emu.stats()["cost_usd"] <= 0.01
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert (frame["error_type"] == "budget_exhausted").sum() + (frame["status"] == "succeeded").sum() == 40


# -- estimate --exact --json ---------------------------------------------------------------------------------


def test_estimate_exact_equals_what_the_emulator_then_bills(start_emulator, tmp_path, capsys):
    emu = start_emulator(count_tokens_per_minute=600)
    requests = tmp_path / "requests.jsonl"
    bodies = [
        {"model": "claude-haiku-5-5", "max_tokens": 50, "system": "Answer in French. " * (i % 5),
         "messages": [{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * (i % 7 + 1)}]}
        for i in range(30)
    ]  # fmt: skip
    requests.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    base = ["--base-url", emu.base_url, "--api-key", "sk-ant-fake-exact"]
    assert main(["estimate", str(requests), "--exact", "--json", *base]) == 0
    estimate = json.loads(capsys.readouterr().out)
    keys = {"requests", "input_tokens", "output_tokens_max", "cost_usd_min", "cost_usd_max", "batch_cost_usd_min",
            "batch_cost_usd_max", "duration_s_min", "rejected_lines"}  # fmt: skip
    assert set(estimate) >= keys
    assert estimate["input_tokens_exact"] is True and emu.stats()["counted_requests"] == 30
    assert main(["estimate", str(requests), "--exact", "--json", *base]) == 0  # counts are kept: none asked again
    assert json.loads(capsys.readouterr().out)["input_tokens"] == estimate["input_tokens"]
    assert emu.stats()["counted_requests"] == 30

    assert main(["run", str(requests), "--output-dir", str(tmp_path / "out"), *base, "--no-progress"]) == 0
    ledger = emu.stats()
    billed_input = ledger["input_tokens"] + ledger["cache_creation_input_tokens"] + ledger["cache_read_input_tokens"]
    assert estimate["input_tokens"] == billed_input
    assert estimate["output_tokens_max"] == 30 * 50


# -- the terminal --------------------------------------------------------------------------------------------


def test_the_terminal_shows_the_bar_on_its_own_line_with_cost_and_eta_and_logs_above(start_emulator, tmp_path):
    emu = start_emulator(latency_ms=50)
    requests = write_requests(tmp_path / "requests.jsonl", 120)
    with open(requests, "a") as handle:  # a model without prices: its warning is logged mid-run
        handle.write(json.dumps({"model": "claude-mythos-5-2", "max_tokens": 20,
                                 "messages": [{"role": "user", "content": "hi"}]}) + "\n")  # fmt: skip
    command = cli_command(requests, tmp_path / "out", emu.base_url, "--requests-per-minute", "1200")
    command.remove("--no-progress")
    leader, follower = pty.openpty()
    env = cli_env(TERM="xterm-256color", COLUMNS="80", LINES="40")
    process = subprocess.Popen(command, env=env, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    assert process.returncode == 0, output[-2000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode("utf-8", "replace"))
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    bar_lines = [line for line in lines if "requests" in line and "ETA" in line]
    money_lines = [line for line in lines if line.startswith("$") and "req/min" in line]
    assert bar_lines and money_lines
    assert all(len(line) <= 80 for line in bar_lines + money_lines)  # two lines of an 80-column terminal
    assert any(re.search(r"ETA \d+ (s|min)", line) for line in bar_lines), bar_lines[-5:]
    # Requests/min against the limits: two model classes (Sonnet 4.x and Mythos 5.2), 1,200 each.
    assert any("/2,400 req/min" in line for line in money_lines), money_lines[-5:]
    warnings = [line for line in lines if "No price for claude-mythos-5-2" in line]
    assert warnings and not any("━" in line or "ETA" in line for line in warnings)  # printed above, not into
    assert not any("Beginning flow run" in line or "Finished in state" in line for line in lines)  # quiet


# -- the Prefect UI -----------------------------------------------------------------------------------------


async def test_the_failures_artifact_lists_failed_lines(monkeypatch, emulator, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-artifacts")
    requests = write_requests(tmp_path / "requests.jsonl", 5, extra=["{broken", json.dumps({"model": "x"})])
    await generate_dataset(str(requests), str(tmp_path / "out"), settings=ClientSettings(base_url=emulator.base_url))
    keys = artifact_keys(str(tmp_path / "out"))
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[keys["failures"]])),
            limit=1,
            sort="CREATED_DESC",
        )
        summary = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[keys["summary"]])),
            limit=1,
            sort="CREATED_DESC",
        )
    rows = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    assert [(row["line"], row["error_type"]) for row in rows] == [(6, "invalid_request"), (7, "invalid_request")]
    assert all(row["error_message"].startswith(f"line {row['line']}") for row in rows)
    markdown = summary[0].data
    assert "req/min" in markdown and ".0 req" not in markdown and "| requests | 7 |" in markdown


def test_budget_exhausted_rows_are_not_final(tmp_path):
    from prefect_anthropic.engine.results_file import is_final

    record = RequestItem(line=1, custom_id="a", body={})
    assert not is_final({"status": "errored", "error_type": "budget_exhausted", "line": record.line})
