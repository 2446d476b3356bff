"""The command line: run, estimate, demo, and the drop-in script with the original flags."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import message_body, write_requests
from prefect_anthropic.cli import main

ROOT = Path(__file__).resolve().parents[1]


def load_drop_in():
    spec = importlib.util.spec_from_file_location("drop_in", ROOT / "api_request_parallel_processor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def flow_env(prefect_server, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def test_run_writes_outputs_and_exit_code_reflects_failures(flow_env, emulator, tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", 20)
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url]
    args += ["--api-key", "sk-ant-cli-key", "--shard-size", "8", "--requests-per-minute", "6000", "--no-progress"]
    assert main(args) == 0
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(frame) == 20 and (frame["status"] == "succeeded").all()
    assert "20 of 20 requests succeeded" in capsys.readouterr().err

    with open(requests, "a") as handle:
        handle.write("{broken\n")
    assert main(args) == 1  # one invalid line: resumes, and says so by its exit code
    assert len(pd.read_parquet(tmp_path / "out" / "results.parquet")) == 21
    assert emulator.stats()["billed_requests"] == 20  # the second run re-sent nothing


def test_run_without_a_key_or_with_a_wrong_one_stops_with_a_message(flow_env, start_emulator, tmp_path, capsys):
    emu = start_emulator(api_key="right")
    requests = write_requests(tmp_path / "requests.jsonl", 5)
    base = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emu.base_url, "--no-progress"]
    assert main(base) == 2
    assert "No Anthropic API key" in capsys.readouterr().err
    assert main([*base, "--api-key", "wrong"]) == 2
    assert "authentication_error" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o"), "--api-key", "k"]) == 2
    assert "requests file not found" in capsys.readouterr().err


def test_estimate_counts_prices_and_lists_invalid_lines(tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", 10, extra=["{oops", json.dumps({"model": "x"})])
    assert main(["estimate", str(requests), "--tier", "1", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 10
    assert [entry["line"] for entry in result["rejected_lines"]] == [11, 12]
    assert result["output_tokens_max"] == 500
    assert 0 < result["cost_usd_min"] < result["cost_usd_max"]
    assert result["models"]["claude-sonnet-4-6"]["batch_cost_usd_max"] == pytest.approx(
        result["models"]["claude-sonnet-4-6"]["cost_usd_max"] / 2
    )
    assert result["duration_s_min"] == pytest.approx(12.0)  # 10 requests at Tier 1's 50 requests/min
    assert main(["estimate", str(requests)]) == 1
    assert "line 11" in capsys.readouterr().out


def test_demo_runs_the_flow_on_the_example(flow_env, tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    frame = pd.read_parquet(tmp_path / "demo" / "results.parquet")
    assert len(frame) == 200 and (frame["status"] == "succeeded").all()


def test_drop_in_defaults_and_flag_parsing():
    drop_in = load_drop_in()
    args = drop_in.build_parser().parse_args(["--requests_filepath", "x.jsonl"])
    assert (args.max_requests_per_minute, args.max_tokens_per_minute, args.max_attempts) == (40, 16_000, 5)
    assert args.logging_level == 20 and args.use_caching is False
    assert args.request_url == "https://api.anthropic.com/v1/messages"
    parse = drop_in.build_parser().parse_args
    assert parse(["--requests_filepath", "x", "--use_caching", "False"]).use_caching is False
    assert parse(["--requests_filepath", "x", "--use_caching", "True"]).use_caching is True
    for name, number in (("TRACE", 5), ("SUCCESS", 25), ("critical", 50)):
        assert parse(["--requests_filepath", "x", "--logging_level", name]).logging_level == number
    with pytest.raises(SystemExit):
        parse(["--requests_filepath", "x", "--use_caching", "maybe"])


def test_drop_in_writes_the_original_layout_and_parquet_beside_it(flow_env, emulator, tmp_path):
    requests = write_requests(tmp_path / "jobs.jsonl", 6, extra=[json.dumps(message_body("no metadata"))])
    with open(requests, "a") as handle:
        handle.write(json.dumps(message_body("bad", temperature=5)) + "\n")
    drop_in = load_drop_in()
    code = drop_in.main(
        [
            "--requests_filepath", str(requests),
            "--request_url", f"{emulator.base_url}/v1/messages",
            "--api_key", "sk-ant-drop-in",
            "--max_requests_per_minute", "6000",
            "--max_tokens_per_minute", "1000000",
        ]
    )  # fmt: skip
    assert code == 1  # the temperature=5 line fails
    save = tmp_path / "jobs_results.jsonl"
    rows = [json.loads(line) for line in save.read_text().splitlines()]
    assert len(rows) == 8
    request, response, metadata = rows[0]
    assert request["messages"][0]["content"] == "Question 0: what is 0 times 8?" and "metadata" not in request
    assert response["content"][0]["text"].startswith("echo: Question 0") and metadata == {"row_id": 0}
    assert len(rows[6]) == 2 and rows[6][1]["type"] == "message"  # no metadata: [request, response]
    failed_request, errors = rows[7]
    assert failed_request["temperature"] == 5 and "temperature" in errors[0]
    assert len(pd.read_parquet(tmp_path / "jobs_results.parquet")) == 8
