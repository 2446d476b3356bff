"""Reliability: faults survived, crashes resumed, bad input answered, secrets kept (issue 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import message_body, write_requests
from prefect_anthropic import ClientSettings
from prefect_anthropic.cli import main
from prefect_anthropic.orchestration.flows import generate_dataset

pytestmark = pytest.mark.usefixtures("prefect_server")


def cli_env(**extra) -> dict:
    """Environment for a CLI subprocess that uses this session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING", **extra}


def cli_command(requests, out, base_url, *flags) -> list[str]:
    return [sys.executable, "-m", "prefect_anthropic.cli", "run", str(requests), "--output-dir", str(out),
            "--base-url", base_url, "--api-key", "sk-ant-reliability", "--no-progress", *flags]  # fmt: skip


def shard_lines(out: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in out.glob(".shards-*/shard-*[0-9].jsonl"))


async def test_every_fault_at_once_ends_complete_without_duplicate_rows(start_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-faults")
    emu = start_emulator(
        seed=21, latency_ms=5, latency_jitter_ms=5, error_rate_429=0.01, error_rate_529=0.03, error_rate_500=0.03,
        drop_rate=0.01, stall_rate=0.005, stall_s=3, fault_retry_after_s=1,
    )  # fmt: skip
    requests = write_requests(tmp_path / "requests.jsonl", 2000)
    settings = ClientSettings(base_url=emu.base_url, max_attempts=10, timeout_s=1.0, max_concurrency=50)
    summary = await generate_dataset(
        str(requests), str(tmp_path / "out"), settings=settings, shard_size=500, shard_retries=2, shard_retry_delay_s=0
    )
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert summary["succeeded"] == 2000 and len(frame) == 2000 and frame["line"].is_unique
    assert (frame["status"] == "succeeded").all()
    stats = emu.stats()
    statuses = stats["responses_by_status"]
    assert statuses.get("429", 0) and statuses.get("529", 0) and statuses.get("500", 0)
    # Billed twice only where the server did the work but the answer never arrived (drop or stall).
    assert stats["billed_requests"] == 2000 + stats["duplicate_billed_requests"]
    assert stats["duplicate_billed_requests"] <= 0.01 * 2000 * 3 + 0.005 * 2000 * 3


def test_faults_outlasting_max_attempts_are_failed_rows_and_a_nonzero_exit(emulator, tmp_path):
    requests = write_requests(
        tmp_path / "requests.jsonl",
        20,
        extra=[json.dumps(message_body(f"x [[emulator:status=529]] {i}")) for i in range(3)],
    )
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url,
            "--api-key", "sk-ant-k", "--max-attempts", "2", "--shard-retries", "1", "--shard-retry-delay", "0",
            "--no-progress"]  # fmt: skip
    assert main(args) == 1
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("line")
    assert len(frame) == 23 and (frame.loc[1:20, "status"] == "succeeded").all()
    failed = frame.loc[21:23]
    assert (failed["status"] == "errored").all() and (failed["error_type"] == "overloaded_error").all()
    assert (failed["attempts"] == 2).all()


def test_sigkill_mid_run_then_resume(start_emulator, tmp_path):
    emu = start_emulator(latency_ms=100)
    requests = write_requests(tmp_path / "requests.jsonl", 400)
    out = tmp_path / "out"
    command = cli_command(requests, out, emu.base_url, "--requests-per-minute", "3000", "--max-concurrency", "20",
                          "--shard-size", "100")  # fmt: skip
    process = subprocess.Popen(command, env=cli_env(), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while shard_lines(out) < 120:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    billed_at_kill = emu.stats()["billed_requests"]
    assert 120 <= billed_at_kill < 400

    again = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    frame = pd.read_parquet(out / "results.parquet")
    assert list(frame["line"]) == list(range(1, 401)) and (frame["status"] == "succeeded").all()
    stats = emu.stats()
    assert stats["duplicate_billed_requests"] <= 20  # at most what was in flight at the kill


def test_ctrl_c_saves_in_flight_requests_and_exits_resumable(start_emulator, tmp_path):
    emu = start_emulator(latency_ms=300)
    requests = write_requests(tmp_path / "requests.jsonl", 400)
    out = tmp_path / "out"
    command = cli_command(requests, out, emu.base_url, "--requests-per-minute", "3000", "--max-concurrency", "20")
    process = subprocess.Popen(command, env=cli_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while shard_lines(out) < 60:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr
    assert time.monotonic() - started < 30
    assert "run the same command again to resume" in stderr
    saved = shard_lines(out)
    assert emu.stats()["billed_requests"] == saved  # every request the server did is saved

    again = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(pd.read_parquet(out / "results.parquet")) == 400
    assert emu.stats()["duplicate_billed_requests"] == 0


def test_bad_input_lines_become_error_rows_naming_the_line(emulator, tmp_path):
    good = json.dumps(message_body("fine")).encode()
    oversized = json.dumps(message_body("x" * (33 * 1024 * 1024))).encode()
    content = (
        b"\r\n".join(
            [
                b"\xef\xbb\xbf" + good,  # byte-order mark on line 1
                b"{malformed",
                b'"just a string"',
                json.dumps({"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "x"}]}).encode(),
                json.dumps(message_body("x") | {"messages": [{"role": "boss", "content": "x"}]}).encode(),
                b"",
                b'{"model": "\xff\xfe", "max_tokens": 5}',
                oversized,
                good,
            ]
        )
        + b"\r\n"
    )
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(content)
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url,
            "--api-key", "sk-ant-k", "--no-progress"]  # fmt: skip
    assert main(args) == 1
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("line")
    assert list(frame.index) == [1, 2, 3, 4, 5, 7, 8, 9]
    assert frame.loc[1, "status"] == "succeeded" and frame.loc[9, "status"] == "succeeded"
    expected = {2: "invalid JSON", 3: "expected a JSON object", 4: "missing required field max_tokens",
                5: "role", 7: "not valid UTF-8", 8: "over the API's 32 MB limit"}  # fmt: skip
    for line, fragment in expected.items():
        message = frame.loc[line, "error_message"]
        assert message.startswith(f"line {line}: ") and fragment in message, message
    assert emulator.stats()["requests_total"] == 2


def test_unusable_paths_get_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["--api-key", "sk-ant-k", "--no-progress", "--base-url", "http://127.0.0.1:9"]
    assert main(["run", str(empty), "--output-dir", str(tmp_path / "o"), *base]) == 2
    assert f"requests file is empty: {empty}" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "o"), *base]) == 2
    assert "requests file not found" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    requests = write_requests(tmp_path / "r.jsonl", 1)
    assert main(["run", str(requests), "--output-dir", str(blocker / "sub"), *base]) == 2
    assert f"output directory is not writable: {blocker / 'sub'}" in capsys.readouterr().err


async def test_the_api_key_appears_nowhere(emulator, tmp_path, caplog):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    secret = "sk-ant-RECOGNISABLE-fake-key-4242"
    requests = write_requests(tmp_path / "requests.jsonl", 10, extra=["{bad line"])
    os.environ["ANTHROPIC_API_KEY"] = secret
    try:
        settings = ClientSettings(base_url=emulator.base_url)
        await generate_dataset(str(requests), str(tmp_path / "out"), settings=settings, shard_size=4)
    finally:
        del os.environ["ANTHROPIC_API_KEY"]
    assert secret not in caplog.text
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    async with get_client() as client:
        runs = await client.read_flow_runs()
        artifacts = await client.read_artifacts()
        logs = await client.read_logs()
    assert all(secret not in json.dumps(run.parameters, default=str) for run in runs)
    assert all(secret not in json.dumps(a.data, default=str) for a in artifacts)
    assert all(secret not in log.message for log in logs)
    database = PREFECT_API_DATABASE_CONNECTION_URL.value().split(":///")[-1]
    for path in Path(database).parent.glob(Path(database).name + "*"):
        assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
@pytest.mark.load
def test_load_of_100k_requests_with_faults(tmp_path):
    from prefect_anthropic.emulator import emulator_process

    with emulator_process(seed=5, error_rate_529=0.01, error_rate_500=0.01, drop_rate=0.002) as emu:
        requests = write_requests(tmp_path / "requests.jsonl", 100_000)
        command = cli_command(requests, tmp_path / "out", emu.base_url, "--max-concurrency", "200",
                              "--max-attempts", "8", "--shard-size", "10000")  # fmt: skip
        log = tmp_path / "run.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=stderr)
            watchdog = threading.Timer(900, process.kill)
            watchdog.start()
            # This command's own peak (and its children's), not the largest of every process the session started.
            _, status, usage = os.wait4(process.pid, 0)
            watchdog.cancel()
        stats = emu.stats()
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-2000:]
    peak_mib = usage.ru_maxrss / 1024
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet", columns=["line", "status"])
    assert len(frame) == 100_000 and frame["line"].is_unique and (frame["status"] == "succeeded").all()
    assert stats["billed_requests"] - stats["duplicate_billed_requests"] == 100_000
    assert peak_mib < 700, f"peak RSS {peak_mib:.0f} MiB"
