"""Exit codes that mean one thing (issue 25): 0 all succeeded, 1 some rows failed, 2 stopped (bad input,
configuration, locked output, Prefect unreachable, any unexpected error: one `error: ...` line, no traceback),
3 budget, 130 interrupted. And the Prefect settings the CLI needs are the ones Prefect uses (issue 26)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import message_body, write_requests
from prefect_anthropic.cli import main
from prefect_anthropic.dataset.run_lock import hold_output_directory
from prefect_anthropic.settings import API_KEY_ENV
from prefect_anthropic.storage import STORAGE_OPTIONS_ENV

FAST = ["--requests-per-minute", "6000", "--no-progress", "--api-key", "sk-ant-exit-codes"]

# Runs the CLI with Prefect's temporary-server start wrapped: it prints the start-up timeout Prefect reads at
# that point of the run path, then either starts the server for real or fails the way Prefect's start does.
START_PROBE = """
import os, sys
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
from prefect_anthropic.cli import main

real_start = SubprocessASGIServer.start

def start(self, timeout=None):
    print(f"startup timeout: {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()}", file=sys.stderr)
    if os.environ.get("PROBE_REAL_START"):
        return real_start(self, timeout)
    raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

SubprocessASGIServer.start = start
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def cli_env(prefect_server, monkeypatch):
    """In-process runs on the session's Prefect server; what `--api-key` and `--storage-options` put in this
    process's environment is taken out again after the test."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(STORAGE_OPTIONS_ENV, raising=False)


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A CLI subprocess's environment: a fresh Prefect home and no Prefect setting of this session's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    state = os.environ.get("PREFECT_ANTHROPIC_STATE_DIR", "")
    return {**env, "PREFECT_HOME": str(home), "PREFECT_ANTHROPIC_STATE_DIR": state, **extra}


def one_error_line(stderr: str) -> str:
    """The `error: ...` line, checking it is the only line that says so and that no traceback was printed."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_table_is_in_the_help(capsys):
    for argv in (["--help"], ["run", "--help"]):
        assert main(argv) == 0
        table = capsys.readouterr().out.split("exit codes:")[1]
        for code in ("0", "1", "2", "3", "130"):
            assert f"\n  {code} " in table


def test_0_when_every_row_succeeds(cli_env, emulator, tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", 5)
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url, *FAST]
    assert main(args) == 0
    assert "5 of 5 requests succeeded" in capsys.readouterr().err


def test_1_when_the_api_rejects_a_line_for_good(cli_env, emulator, tmp_path, capsys):
    rejected = json.dumps(message_body("too hot", temperature=5))  # 400 invalid_request_error: never retried
    requests = write_requests(tmp_path / "requests.jsonl", 4, extra=[rejected])
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url, *FAST]
    assert main(args) == 1
    assert "4 of 5 requests succeeded, 1 failed" in capsys.readouterr().err


def test_2_on_bad_input(tmp_path, capsys):
    table = tmp_path / "rows.csv"
    table.write_text("question\nwhat is 2 + 2?\n")
    assert main(["run", str(table), "--output-dir", str(tmp_path / "out"), *FAST]) == 2
    assert "give --template" in one_error_line(capsys.readouterr().err)


def test_2_on_a_storage_option_the_filesystem_does_not_take(cli_env, emulator, bucket, tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", 3)
    args = ["run", str(requests), "--output-dir", f"{bucket}/out", "--base-url", emulator.base_url, *FAST]
    # s3fs hands unknown options to its session: a TypeError, once exit 1 ("some rows failed") and a traceback.
    assert main([*args, "--storage-options", '{"not_an_option": 1}']) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: TypeError: ") and "not_an_option" in line
    assert emulator.stats()["billed_requests"] == 0

    assert main([*args, "--storage-options", '{"not_an_option": 1}', "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err  # --verbose shows it


def test_2_when_another_run_holds_the_output(cli_env, emulator, tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", 3)
    out = tmp_path / "out"
    with hold_output_directory(out):
        assert main(["run", str(requests), "--output-dir", str(out), "--base-url", emulator.base_url, *FAST]) == 2
    assert "in use by another run" in one_error_line(capsys.readouterr().err)
    assert emulator.stats()["billed_requests"] == 0


@pytest.mark.parametrize(
    ("user_timeout", "real_start", "expected"),
    [
        (None, False, 180),  # the CLI's default, though Prefect read its settings (20 s) before main ran
        ("1", True, 1),  # the user's own value wins; and a server that really does not start in time: exit 2
    ],
)
def test_prefect_waits_for_its_server_as_the_cli_says_and_a_failed_start_is_exit_2(
    emulator, tmp_path, user_timeout, real_start, expected
):
    requests = write_requests(tmp_path / "requests.jsonl", 2)
    extra = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": user_timeout} if user_timeout else {}
    if real_start:
        extra["PROBE_REAL_START"] = "1"
    # A work pool: a run with no server configured starts none (issues 26, 27); one on a work pool still does.
    command = [sys.executable, "-c", START_PROBE, "run", str(requests), "--output-dir", str(tmp_path / "out"),
               "--base-url", emulator.base_url, "--work-pool", "a-pool", *FAST]  # fmt: skip
    done = subprocess.run(
        command, env=child_env(tmp_path / "prefect-home", **extra), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert f"startup timeout: {expected}\n" in done.stderr
    line = one_error_line(done.stderr)
    assert "Prefect's temporary server did not start in time" in line and "PREFECT_API_URL" in line
    assert emulator.stats()["billed_requests"] == 0


def test_3_when_the_budget_stops_the_run(cli_env, emulator, tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", 10)
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url, *FAST]
    assert main([*args, "--max-cost-usd", "0.000001"]) == 3  # less than any request's worst case
    assert "stopped by the budget" in capsys.readouterr().err
    assert emulator.stats()["billed_requests"] == 0


def test_130_on_ctrl_c(prefect_server, start_emulator, tmp_path):
    from prefect.settings import PREFECT_API_URL

    emu = start_emulator(ttft_ms=1500)  # slow replies: the run is surely mid-way when the signal comes
    requests = write_requests(tmp_path / "requests.jsonl", 30)
    command = [sys.executable, "-m", "prefect_anthropic.cli", "run", str(requests), "--output-dir",
               str(tmp_path / "out"), "--base-url", emu.base_url, "--max-concurrency", "3", *FAST]  # fmt: skip
    env = child_env(tmp_path / "prefect-home", PREFECT_API_URL=PREFECT_API_URL.value())
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while emu.stats()["first_arrival_at"] is None:  # the first request reached the API
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before sending"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
