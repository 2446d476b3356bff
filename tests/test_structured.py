"""Structured outputs as typed columns, validation and repair, refusals, thinking and tool calls in the rows,
long outputs streamed (issue 11). Real HTTP to the emulator, real Prefect, files read back."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from prefect_anthropic import ClientSettings
from prefect_anthropic.api.schema import OutputSchema, SchemaError, load_schema, to_api_schema
from prefect_anthropic.cli import main
from prefect_anthropic.dataset.estimate import estimate_file
from prefect_anthropic.engine import AnthropicClient, RequestItem, RetryPolicy, run_requests
from prefect_anthropic.orchestration.flows import generate_dataset

MODEL = "claude-sonnet-5-5"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags"],
}


def requests_file(path: Path, n: int, **extra) -> Path:
    lines = (
        json.dumps(
            {"model": MODEL, "max_tokens": 400, "messages": [{"role": "user", "content": f"Person {i}"}], **extra}
        )
        for i in range(n)
    )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def flow_env(prefect_server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-structured")


# -- the schema ---------------------------------------------------------------------------------------------


def test_unsupported_keywords_move_out_of_the_sent_schema_and_are_checked_here():
    schema = OutputSchema(PERSON)
    sent = schema.sent
    assert (
        "maxLength" not in sent["properties"]["name"] and "maxLength: 40" in sent["properties"]["name"]["description"]
    )
    assert sent["additionalProperties"] is False and sent["properties"]["address"]["additionalProperties"] is False
    assert sent["properties"]["email"]["format"] == "email"
    assert schema.validate({"name": "x" * 41, "age": 3, "tags": []}) is not None  # enforced on our side
    assert schema.validate({"name": "Ann", "age": -1, "tags": []}) is not None
    assert schema.validate({"name": "Ann", "age": 3, "tags": ["a"]}) is None
    assert to_api_schema({"type": "string", "format": "color"})["description"] == "{format: color}"


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
         "recursive"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "external"),
        ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(30)}}, "optional parameters"),
    ],
)  # fmt: skip
def test_a_schema_the_api_cannot_take_is_refused_naming_the_keyword(schema, keyword):
    with pytest.raises(SchemaError, match=keyword):
        OutputSchema(schema)


def test_a_schema_the_api_cannot_take_stops_the_run_before_anything_is_sent(emulator, tmp_path, capsys):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"$defs": {"n": {"$ref": "#/$defs/n"}}, "$ref": "#/$defs/n"}))
    requests = requests_file(tmp_path / "requests.jsonl", 3)
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url]
    assert main([*args, "--api-key", "sk-ant-fake", "--schema", str(schema_file), "--no-progress"]) == 2
    assert "recursive" in capsys.readouterr().err
    assert emulator.stats()["requests_total"] == 0


# -- typed columns, validation and repair through the CLI and the flow ---------------------------------------


def test_repair_under_schema_violations_ends_with_every_row_valid_and_typed(flow_env, start_emulator, tmp_path):
    emu = start_emulator(seed=11, schema_violation_rate=0.2, invalid_json_rate=0.05)
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    requests = requests_file(tmp_path / "requests.jsonl", 40)
    out = tmp_path / "out"
    args = ["run", str(requests), "--output-dir", str(out), "--base-url", emu.base_url, "--schema", str(schema_file)]
    assert main([*args, "--validation-retries", "6", "--no-progress", "--shard-size", "15"]) == 0

    table = pq.read_table(out / "results.parquet")
    parsed_type = table.schema.field("parsed").type
    assert str(parsed_type.field("age").type) == "int64"
    assert str(parsed_type.field("tags").type.value_type) == "string"
    assert not parsed_type.field("name").nullable and parsed_type.field("email").nullable
    assert str(parsed_type.field("address").type) == "struct<city: string not null, zip: string>"
    frame = table.to_pandas()
    assert (frame["status"] == "succeeded").all() and frame["validation_error"].isna().all()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(OutputSchema(PERSON).validate(row["parsed"]) is None for row in rows)  # JSONL keeps the object
    assert [row["parsed"]["name"] for row in rows] == [value["name"] for value in frame["parsed"]]
    assert frame["attempts"].max() > 1  # some rows needed a repair
    ages = duckdb.sql(f"select parsed.age as age from read_parquet('{out / 'results.parquet'}')").fetchall()
    assert len(ages) == 40 and all(isinstance(age, int) for (age,) in ages)
    assert len(duckdb.sql(f"select parsed.name from read_json_auto('{out / 'results.jsonl'}')").fetchall()) == 40

    summary = json.loads((out / "summary.json").read_text())
    ledger = emu.stats()
    assert summary["validation_repairs"] > 0
    assert summary["cost_usd"] == pytest.approx(ledger["cost_usd"], abs=1e-5)  # every attempt paid is counted
    assert frame["cost_usd"].sum() == pytest.approx(ledger["cost_usd"], abs=1e-5)


def test_without_retries_invalid_replies_are_validation_errors_with_the_reply_kept(flow_env, start_emulator, tmp_path):
    emu = start_emulator(schema_violation_rate=1.0)
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    requests = requests_file(tmp_path / "requests.jsonl", 5)
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emu.base_url]
    assert main([*args, "--schema", str(schema_file), "--validation-retries", "0", "--no-progress"]) == 1
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert (frame["error_type"] == "validation_error").all() and frame["parsed"].isna().all()
    assert frame["text"].map(lambda text: isinstance(json.loads(text), dict | list | str | int)).all()
    assert frame["validation_error"].notna().all() and (frame["attempts"] == 1).all()
    assert emu.stats()["billed_requests"] == 5


async def test_a_pydantic_model_in_python_gives_typed_columns(prefect_server, monkeypatch, emulator, tmp_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-structured")

    class City(BaseModel):
        name: str
        population: int
        districts: list[str]
        coastal: bool

    settings = ClientSettings(base_url=emulator.base_url, output_schema=City, max_concurrency=5)
    requests = requests_file(tmp_path / "requests.jsonl", 6)
    summary = await generate_dataset(str(requests), str(tmp_path / "out"), settings=settings)
    assert summary["succeeded"] == 6
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert all(City.model_validate(value) for value in frame["parsed"])
    parsed_type = pq.read_schema(tmp_path / "out" / "results.parquet").field("parsed").type
    assert str(parsed_type.field("coastal").type) == "bool"


async def test_batch_mode_carries_the_schema_and_validates_results(
    prefect_server, monkeypatch, start_emulator, tmp_path
):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-structured")
    emu = start_emulator(batch_delay_s=0.3)
    settings = ClientSettings(base_url=emu.base_url, output_schema=PERSON)
    requests = requests_file(tmp_path / "requests.jsonl", 8)
    summary = await generate_dataset(
        str(requests), str(tmp_path / "out"), settings=settings, mode="batch", batch_poll_interval_s=0.2
    )
    assert summary["succeeded"] == 8 and emu.stats()["billed_batch_requests"] == 8
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(OutputSchema(PERSON).validate(row["parsed"]) is None for row in rows)


def test_estimate_counts_the_schemas_tokens(tmp_path):
    requests = requests_file(tmp_path / "requests.jsonl", 10)
    without = estimate_file(requests, ClientSettings())["input_tokens"]
    with_schema = estimate_file(requests, ClientSettings(output_schema=PERSON))["input_tokens"]
    assert with_schema > without + 10 * 50
    assert load_schema(PERSON).full == PERSON


# -- refusals, thinking, tool calls --------------------------------------------------------------------------


def test_refusals_are_errored_rows_never_retried(flow_env, start_emulator, tmp_path):
    emu = start_emulator(refusal_rate=1.0)
    requests = requests_file(tmp_path / "requests.jsonl", 4)
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emu.base_url, "--no-progress"]
    assert main(args) == 1
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert (frame["error_type"] == "refusal").all() and frame["refusal_category"].notna().all()
    assert (frame["attempts"] == 1).all() and (frame["cost_usd"] == 0).all()
    assert emu.stats()["requests_total"] == 4 and emu.stats()["billed_requests"] == 0
    assert main(args) == 1  # the same command again: a refusal is final, nothing is sent again
    assert emu.stats()["requests_total"] == 4


def test_thinking_and_tool_calls_have_their_columns(flow_env, emulator, tmp_path):
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    weather = {"name": "get_weather", "description": "Weather in a city", "input_schema": city}
    bodies = [
        {"model": MODEL, "max_tokens": 300, "thinking": {"type": "adaptive"},
         "messages": [{"role": "user", "content": "Think first, then answer."}]},
        {"model": "claude-haiku-5-5", "max_tokens": 300, "tools": [weather],
         "tool_choice": {"type": "tool", "name": "get_weather"},
         "messages": [{"role": "user", "content": "Weather in Paris?"}]},
        {"model": MODEL, "max_tokens": 300, "tools": [weather],
         "messages": [{"role": "user", "content": "Call get_weather for Lyon"}]},
    ]  # fmt: skip
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    args = ["run", str(requests), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url]
    assert main([*args, "--no-progress"]) == 0
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("line")
    assert rows.loc[1, "thinking"] and rows.loc[1, "thinking_tokens"] > 0 and rows.loc[1, "text"]
    assert [block["type"] for block in json.loads(rows.loc[1, "content"])] == ["thinking", "text"]
    for line in (2, 3):
        calls = json.loads(rows.loc[line, "tool_calls"])
        assert calls[0]["name"] == "get_weather" and isinstance(calls[0]["input"]["city"], str)
        assert rows.loc[line, "stop_reason"] == "tool_use"
    assert pd.isna(rows.loc[1, "tool_calls"])


# -- long outputs streamed -----------------------------------------------------------------------------------


async def test_a_100000_max_tokens_request_is_streamed_and_complete(emulator):
    body = {"model": MODEL, "max_tokens": 100_000, "thinking": {"type": "adaptive"},
            "messages": [{"role": "user", "content": "Write at length about streams."}]}  # fmt: skip
    records = []
    async with AnthropicClient("k", base_url=emulator.base_url) as client:
        await run_requests(client, [RequestItem(line=1, custom_id="long", body=body)], on_record=records.append)
    (record,) = records
    assert record.succeeded and record.text == "echo: Write at length about streams."
    assert record.stop_reason == "end_turn" and record.output_tokens > 0 and record.thinking_tokens > 0
    assert record.response["content"][0]["type"] == "thinking" and record.response["content"][0]["signature"]
    stats = emulator.stats()
    assert stats["streamed_requests"] == 1 and client.stats.streamed_requests == 1
    assert record.output_tokens == stats["output_tokens"] and record.input_tokens == stats["input_tokens"]


async def test_a_stream_cut_mid_way_or_interrupted_by_an_error_event_is_retried(start_emulator):
    emu = start_emulator(seed=4, drop_rate=0.15, stream_error_rate=0.1)
    body = {"model": MODEL, "max_tokens": 50_000, "messages": [{"role": "user", "content": "A long story, please."}]}
    items = [RequestItem(line=i, custom_id=str(i), body=body) for i in range(1, 21)]
    records = []
    retry = RetryPolicy(max_attempts=8, initial_delay_s=0.01, max_delay_s=0.05)
    async with AnthropicClient("k", base_url=emu.base_url, max_concurrency=5, retry=retry) as client:
        await run_requests(client, items, on_record=records.append)
    assert all(r.succeeded and r.text == "echo: A long story, please." for r in records) and len(records) == 20
    assert client.stats.connection_errors > 0 and client.stats.server_errors > 0
    assert any(r.attempts > 1 for r in records)
    assert emu.stats()["streamed_requests"] == client.stats.http_requests
