"""Today's API: version 2026-10-21, the generation-5 models, the model table users extend, the pre-flight
check. Through the official SDK (its defaults, and 2023-06-01 set explicitly) and through our CLI."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import anthropic
import pandas as pd
import pytest
import tomllib
from pydantic import BaseModel

from prefect_anthropic.api.models import (
    MODELS_FILE_ENV,
    TODAY_ENV,
    ModelsFileError,
    Usage,
    cost_usd,
    lookup_model,
    model_table,
    unpriced_reason,
    use_models_file,
)
from prefect_anthropic.api.request_rules import API_VERSION_2023, API_VERSION_2026
from prefect_anthropic.api.tiers import limits_for_tier
from prefect_anthropic.cli import main
from prefect_anthropic.dataset.estimate import estimate_file, format_estimate
from prefect_anthropic.engine import AnthropicClient, RequestItem, run_requests
from prefect_anthropic.engine.client import auth_headers
from prefect_anthropic.settings import ClientSettings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "ANTHROPIC_API_2026.md"
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def sdk(emulator):
    """The newest official SDK with its defaults: API version 2026-10-21, the key as a bearer token."""
    return anthropic.Anthropic(api_key="sk-ant-fake-sdk", base_url=emulator.base_url, max_retries=0)


@pytest.fixture
def sdk_2023(emulator):
    return anthropic.Anthropic(
        api_key="sk-ant-fake-sdk",
        base_url=emulator.base_url,
        max_retries=0,
        default_headers={"anthropic-version": API_VERSION_2023},
    )


@pytest.fixture(autouse=True)
def shipped_table_only(monkeypatch):
    """Each test starts from the shipped table (no models file in the environment)."""
    monkeypatch.delenv(MODELS_FILE_ENV, raising=False)


# -- the model table ---------------------------------------------------------------------------------------


def test_every_model_of_the_2026_page_is_in_the_table_with_a_source():
    if SHARED.exists():
        ids = set(re.findall(r"claude-[a-z]+-\d(?:-\d)?", SHARED.read_text()))
        ids = {i for i in ids if not i.startswith(("claude-opus-4-", "claude-sonnet-4-", "claude-haiku-4-"))} | {
            "claude-opus-4-8",
            "claude-opus-4-7",
            "claude-opus-4-6",
            "claude-opus-4-5",
            "claude-sonnet-4-6",
            "claude-haiku-4-5",
        }
        missing = sorted(i for i in ids if lookup_model(i) is None)
        assert not missing, f"models of ANTHROPIC_API_2026.md missing from models.toml: {missing}"
    for model in model_table().models:
        assert model.source and model.checked is not None, model.id


def test_facts_not_found_stay_unknown_and_retirements_are_kept():
    assert lookup_model("claude-mythos-5-2").prices is None  # every fact NF
    assert lookup_model("claude-sonnet-5-5").min_cacheable_tokens is None
    assert lookup_model("claude-opus-5").min_cacheable_tokens == 512
    assert lookup_model("claude-opus-4-1").is_retired(today=dt.date(2026, 8, 5))
    assert not lookup_model("claude-opus-4-1").is_retired(today=dt.date(2026, 8, 4))
    assert not lookup_model("claude-sonnet-4-5").is_retired(today=dt.date(2026, 11, 29))
    assert lookup_model("claude-opus-4-5").rate_limit_class == lookup_model("claude-opus-4-8").rate_limit_class


def test_prices_long_context_fast_and_us_multipliers():
    haiku = lookup_model("claude-haiku-5-5")
    short = Usage(input_tokens=100_000, output_tokens=1_000)
    long = Usage(input_tokens=100_001, output_tokens=1_000)
    assert cost_usd(haiku, short) == pytest.approx((100_000 * 0.10 + 1_000 * 0.50) / 1e6)
    assert cost_usd(haiku, long) == pytest.approx((100_001 * 0.50 + 1_000 * 2.50) / 1e6)
    opus = lookup_model("claude-opus-5")
    base = Usage(input_tokens=1_000, output_tokens=100)
    assert cost_usd(opus, Usage(input_tokens=1_000, output_tokens=100, speed="fast")) == pytest.approx(
        2 * cost_usd(opus, base)
    )
    assert cost_usd(opus, Usage(input_tokens=1_000, output_tokens=100, inference_geo="us")) == pytest.approx(
        1.1 * cost_usd(opus, base)
    )
    assert cost_usd(opus, base, batch=True) == pytest.approx(cost_usd(opus, base) / 2)
    # No silent $0: unknown models, unknown prices, unknown multipliers are None, with the reason.
    assert cost_usd("claude-unknown-9", base) is None
    assert "not in the model table" in unpriced_reason("claude-unknown-9", base)
    assert cost_usd("claude-mythos-5-2", base) is None
    fable_fast = Usage(input_tokens=1, speed="fast")
    assert cost_usd("claude-fable-5-2", fable_fast) is None
    assert "fast-mode price" in unpriced_reason("claude-fable-5-2", fable_fast)
    assert cost_usd("claude-sonnet-4-6", base, refused_before_output=True) == 0.0


def test_a_models_file_adds_and_overrides_entries(tmp_path, monkeypatch):
    extra = tmp_path / "models.toml"
    extra.write_text(
        '[[model]]\nid = "claude-newmodel-6"\nlimit_class = "newmodel"\nsource = "test"\n'
        "[model.prices]\ninput = 1.0\noutput = 2.0\ncache_write_5m = 1.25\ncache_write_1h = 2.0\ncache_read = 0.1\n"
        '[[model]]\nid = "claude-sonnet-5-5"\nmin_cacheable_tokens = 2048\n'
    )
    use_models_file(extra)
    assert lookup_model("claude-newmodel-6", models_file=extra).prices.output == 2.0
    sonnet = lookup_model("claude-sonnet-5-5", models_file=extra)
    assert sonnet.min_cacheable_tokens == 2048 and sonnet.prices.input == 2.0  # the rest of the entry stays
    assert lookup_model("claude-newmodel-6") is None  # the file is used where it is named
    monkeypatch.setenv(MODELS_FILE_ENV, str(extra))
    assert lookup_model("claude-newmodel-6").prices.output == 2.0  # or where the environment names it
    bad = tmp_path / "bad.toml"
    bad.write_text('[[model]]\nid = "x"\nrejects = ["colour"]\n')
    with pytest.raises(ModelsFileError, match="colour"):
        use_models_file(bad)


def test_tiers_adopt_the_server_for_buckets_without_published_numbers():
    start = limits_for_tier("start")
    assert start("fable-5").requests_per_minute == 1_000 and not start.adopts_server_limits("fable-5")
    assert start("sonnet-4").requests_per_minute == 1_000
    assert start.adopts_server_limits("sonnet-5-5") and start("sonnet-5-5").requests_per_minute == 50
    assert limits_for_tier("evaluation").adopts_server_limits("opus-4")
    assert limits_for_tier("scale").adopts_server_limits("opus-5-5:fast")


async def test_a_bucket_without_numbers_adopts_the_servers_limits(start_emulator):
    emu = start_emulator(requests_per_minute=3_000, input_tokens_per_minute=900_000)
    client = AnthropicClient("k", ClientSettings(base_url=emu.base_url, tier="build"))
    body = {"model": "claude-sonnet-5-5", "max_tokens": 10, "messages": USER}
    async with client:
        await run_requests(client, [RequestItem(line=i, custom_id=str(i), body=body) for i in range(1, 4)])
        assert client.limits_in_force()["sonnet-5-5"].requests_per_minute == 3_000


def test_the_client_sends_the_key_as_the_sdks_do():
    assert auth_headers("sk", API_VERSION_2023) == {"x-api-key": "sk"}
    assert auth_headers("sk", API_VERSION_2026) == {"authorization": "Bearer sk"}


# -- the emulator through the official SDK -------------------------------------------------------------------


def test_current_models_answered_and_priced(sdk, emulator):
    message = sdk.messages.create(model="claude-sonnet-5-5", max_tokens=50, messages=USER)
    assert message.content[0].text == "echo: Hello there"
    assert message.usage.output_tokens_details.thinking_tokens == 0
    assert message.usage.speed == "standard" and message.usage.inference_geo == "global"
    assert message.usage.service_tier == "standard"
    expected = cost_usd("claude-sonnet-5-5", Usage.from_api(message.usage.model_dump()))
    assert expected and emulator.stats()["cost_usd"] == pytest.approx(expected, abs=1e-6)
    haiku = sdk.messages.create(model="claude-haiku-5-5", max_tokens=50, messages=USER)
    assert haiku.model == "claude-haiku-5-5"


def test_messages_parse_returns_a_parsed_object(sdk):
    class Person(BaseModel):
        name: str
        age: int
        tags: list[str]

    result = sdk.messages.parse(model="claude-sonnet-5-5", max_tokens=400, messages=USER, output_format=Person)
    assert isinstance(result.parsed_output, Person)
    again = sdk.messages.parse(model="claude-sonnet-5-5", max_tokens=400, messages=USER, output_format=Person)
    assert again.parsed_output == result.parsed_output  # deterministic for a seed and a request


def test_version_2026_rejects_sampling_documents_in_assistant_turns_and_user_citations(sdk, sdk_2023):
    with pytest.raises(anthropic.BadRequestError, match="temperature: Extra inputs are not permitted"):
        sdk.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=USER, extra_body={"temperature": 1.0})
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    turns = [*USER, {"role": "assistant", "content": [document]}, {"role": "user", "content": "and?"}]
    with pytest.raises(anthropic.BadRequestError, match="document blocks"):
        sdk.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=turns)
    cited = [{"role": "user", "content": [{"type": "text", "text": "x", "citations": [{"type": "char_location"}]}]}]
    with pytest.raises(anthropic.BadRequestError, match="citations"):
        sdk.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=cited)
    # The same requests are fine under 2023-06-01.
    sdk_2023.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=USER, extra_body={"temperature": 1.0})
    sdk_2023.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=turns)


@pytest.mark.parametrize(
    ("model", "extra", "fragment"),
    [
        ("claude-sonnet-5-5", {"extra_body": {"temperature": 0.2}}, "`temperature` is deprecated for this model"),
        ("claude-opus-4-7", {"extra_body": {"top_p": 0.9}}, "`top_p` is deprecated"),
        ("claude-sonnet-4-6", {"messages": [*USER, {"role": "assistant", "content": "Sure"}]}, "prefill"),
        ("claude-sonnet-5", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "'enabled' is not supported"),
        ("claude-fable-5-2", {"thinking": {"type": "disabled"}}, "'disabled' is not supported"),
        ("claude-opus-5-5", {"tool_choice": {"type": "any"}, "tools": [{"name": "t", "input_schema": {}}]}, "forced"),
        ("claude-haiku-4-5", {"inference_geo": "us"}, "inference_geo is not supported"),
        ("claude-sonnet-5-5", {"speed": "fast"}, "not available"),
        ("claude-opus-5", {"speed": "fast"}, "preview"),
    ],
)
def test_each_models_rejections_on_any_version(sdk, sdk_2023, model, extra, fragment):
    arguments = {"model": model, "max_tokens": 5, "messages": USER, **extra}
    with pytest.raises(anthropic.BadRequestError, match=re.escape(fragment)):
        sdk_2023.messages.create(**arguments)
    # Under 2026-10-21 a sampling parameter is refused by the version's rule before the model's.
    fragment_2026 = "Extra inputs are not permitted" if "deprecated" in fragment else fragment
    with pytest.raises(anthropic.BadRequestError, match=re.escape(fragment_2026)):
        sdk.messages.create(**arguments)


def test_fast_mode_and_us_inference_priced_with_their_multipliers(sdk, emulator):
    fast = sdk.messages.create(model="claude-opus-5-5", max_tokens=20, messages=USER, speed="fast")
    assert fast.usage.speed == "fast"
    preview = sdk.messages.create(
        model="claude-opus-5",
        max_tokens=20,
        messages=USER,
        speed="fast",
        extra_headers={"anthropic-beta": "fast-mode-2026-02-01"},
    )
    us = sdk.messages.create(model="claude-opus-4-6", max_tokens=20, messages=USER, inference_geo="us")
    assert us.usage.inference_geo == "us"
    expected = sum(cost_usd(m.model, Usage.from_api(m.usage.model_dump())) for m in (fast, preview, us))
    plain = cost_usd("claude-opus-4-6", Usage(input_tokens=us.usage.input_tokens, output_tokens=us.usage.output_tokens))
    assert cost_usd("claude-opus-4-6", Usage.from_api(us.usage.model_dump())) == pytest.approx(1.1 * plain)
    assert emulator.stats()["cost_usd"] == pytest.approx(expected, abs=1e-6)


def test_retired_models_are_404(sdk, monkeypatch):
    monkeypatch.setenv(TODAY_ENV, "2026-12-02")  # Opus 4.1 retired on 2026-08-05
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.create(model="claude-opus-4-1", max_tokens=5, messages=USER)


async def test_one_clock_for_retirements_the_emulator_the_preflight_check_and_estimate(sdk, monkeypatch, tmp_path):
    """Sonnet 4.5 retired on 2026-11-30: PREFECT_ANTHROPIC_TODAY moves every reader of the table at once."""
    body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": USER}
    requests = _lines(tmp_path / "requests.jsonl", [body])
    monkeypatch.setenv(TODAY_ENV, "2026-11-01")
    assert sdk.messages.create(**body).usage.output_tokens > 0  # the emulator still serves it
    assert estimate_file(requests, ClientSettings())["rejected_lines"] == []
    async with AnthropicClient("k", base_url=str(sdk.base_url)) as client:
        record = await client.send(RequestItem(line=1, custom_id="a", body=body))
    assert record.succeeded
    monkeypatch.setenv(TODAY_ENV, "2026-12-01")
    with pytest.raises(anthropic.NotFoundError) as error:
        sdk.messages.create(**body)
    assert error.value.body["error"]["type"] == "not_found_error"
    rejected = estimate_file(requests, ClientSettings())["rejected_lines"]
    assert len(rejected) == 1 and "retired on 2026-11-30" in rejected[0]["error"]
    async with AnthropicClient("k", base_url=str(sdk.base_url)) as client:
        record = await client.send(RequestItem(line=1, custom_id="a", body=body))
    assert record.error_type == "invalid_request" and record.attempts == 0  # never sent
    monkeypatch.setenv(TODAY_ENV, "the first of december")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        lookup_model("claude-sonnet-4-5").is_retired()


def test_automatic_caching_reads_the_cache_on_the_second_request(sdk):
    long_text = " ".join(f"word{i % 97}" for i in range(3000))
    messages = [{"role": "user", "content": long_text}]
    first = sdk.messages.create(
        model="claude-sonnet-5", max_tokens=5, messages=messages, cache_control={"type": "ephemeral"}
    )
    second = sdk.messages.create(
        model="claude-sonnet-5", max_tokens=5, messages=messages, cache_control={"type": "ephemeral"}
    )
    assert first.usage.cache_creation_input_tokens > 1024 and first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    # diagnostics: a changed system prompt is named as the reason the cache missed.
    third = sdk.messages.create(
        model="claude-sonnet-5",
        max_tokens=5,
        system="A new system prompt.",
        messages=messages,
        cache_control={"type": "ephemeral"},
        diagnostics={"previous_message_id": second.id},
    )
    assert third.diagnostics.cache_miss_reason.type == "system_changed"


def test_structured_output_schemas_the_api_cannot_compile_are_400(sdk):
    numeric = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "required": ["n"]}
    with pytest.raises(anthropic.BadRequestError, match="minimum"):
        sdk.messages.create(
            model="claude-sonnet-5-5",
            max_tokens=50,
            messages=USER,
            output_config={"format": {"type": "json_schema", "schema": numeric}},
        )
    recursive = {
        "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
        "$ref": "#/$defs/node",
    }
    with pytest.raises(anthropic.BadRequestError, match="recursive"):
        sdk.messages.create(
            model="claude-sonnet-5-5",
            max_tokens=50,
            messages=USER,
            output_config={"format": {"type": "json_schema", "schema": recursive}, "effort": "low"},
        )


def test_refusals_ramp_limits_and_the_spend_cap_carry_their_details(start_emulator):
    emu = start_emulator(refusal_rate=1.0, seed=5)
    sdk = anthropic.Anthropic(api_key="k", base_url=emu.base_url, max_retries=0)
    refused = sdk.messages.create(model="claude-sonnet-5-5", max_tokens=20, messages=USER)
    assert refused.stop_reason == "refusal" and refused.stop_details.type == "refusal"
    assert refused.stop_details.category is not None
    assert emu.stats()["billed_requests"] == 0 and emu.stats()["refused_requests"] == 1

    ramp = start_emulator(ramp_limit_rate=1.0, fault_retry_after_s=2)
    sdk = anthropic.Anthropic(api_key="k", base_url=ramp.base_url, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk.messages.create(model="claude-sonnet-5-5", max_tokens=20, messages=USER)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.body["error"]["details"]["error_code"] == "ramp_limit_exceeded"


async def test_the_client_retries_a_ramp_limit_and_records_a_refusal_without_retrying(start_emulator):
    emu = start_emulator(ramp_limit_rate=0.3, fault_retry_after_s=0.1, seed=2)
    body = {"model": "claude-sonnet-5-5", "max_tokens": 10, "messages": USER}
    items = [RequestItem(line=i, custom_id=str(i), body=body) for i in range(1, 21)]
    records = []
    async with AnthropicClient("k", base_url=emu.base_url, anthropic_version=API_VERSION_2026) as client:
        await run_requests(client, items, on_record=records.append)
    assert all(r.succeeded for r in records) and client.stats.ramp_limited > 0
    assert all(r.cost_usd and r.cost_usd > 0 for r in records)

    refusing = start_emulator(refusal_rate=1.0)
    async with AnthropicClient("k", base_url=refusing.base_url) as client:
        records = []
        await run_requests(client, items[:3], on_record=records.append)
    assert {(r.status, r.error_type, r.attempts, r.cost_usd) for r in records} == {("errored", "refusal", 1, 0.0)}
    assert all(r.refusal_category for r in records)
    assert refusing.stats()["requests_total"] == 3


# -- the CLI: the check before paying, unknown models, the models file ---------------------------------------


def _lines(path: Path, bodies: list[dict]) -> Path:
    path.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    return path


@pytest.fixture
def flow_env(prefect_server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-cli")


PREFLIGHT = [
    {"model": "claude-sonnet-5-5", "max_tokens": 20, "messages": USER},
    {"model": "claude-sonnet-5-5", "max_tokens": 20, "messages": USER, "temperature": 0.7},
    {"model": "claude-sonnet-4-6", "max_tokens": 20, "messages": [*USER, {"role": "assistant", "content": "Hm"}]},
    {"model": "claude-sonnet-4-6", "max_tokens": 20, "messages": USER, "top_k": 5},
]


def test_the_preflight_check_sends_nothing_the_api_would_reject(flow_env, emulator, tmp_path):
    requests = _lines(tmp_path / "requests.jsonl", PREFLIGHT)
    base = ["--base-url", emulator.base_url, "--no-progress"]
    assert main(["run", str(requests), "--output-dir", str(tmp_path / "out"), *base]) == 1
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("line")
    assert list(rows["status"]) == ["succeeded", "errored", "errored", "succeeded"]
    assert rows.loc[1, "model"] == "claude-sonnet-5-5" and rows.loc[1, "cost_usd"] > 0  # answered and priced
    assert rows.loc[1, "speed"] == "standard" and rows.loc[1, "service_tier"] == "standard"
    assert "'temperature'" in rows.loc[2, "error_message"] and "claude-sonnet-5-5" in rows.loc[2, "error_message"]
    assert "prefill" in rows.loc[3, "error_message"] and rows.loc[3, "error_type"] == "invalid_request"
    assert emulator.stats()["requests_total"] == 2  # the two rejected lines were never sent

    # Under 2026-10-21 top_k is rejected too; --drop-unsupported-params sends both lines without them.
    emulator.reset()
    out = tmp_path / "out-2026"
    args = ["run", str(requests), "--output-dir", str(out), *base, "--anthropic-version", "2026-10-21"]
    assert main([*args, "--drop-unsupported-params"]) == 1  # the prefill line cannot be fixed by dropping
    rows = pd.read_parquet(out / "results.parquet").set_index("line")
    assert list(rows["status"]) == ["succeeded", "succeeded", "errored", "succeeded"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lines_with_dropped_params"] == 2 and summary["lines_rejected_before_sending"] == 1
    assert emulator.stats()["requests_total"] == 3 and emulator.stats()["responses_by_status"] == {"200": 3}

    # estimate lists the lines by number, with the reason, before anything is paid.
    estimate = estimate_file(requests, ClientSettings())
    assert [entry["line"] for entry in estimate["rejected_lines"]] == [2, 3]
    assert "temperature" in estimate["rejected_lines"][0]["error"]


def test_an_unknown_model_is_sent_priced_null_with_a_warning_then_priced_from_a_models_file(
    flow_env, start_emulator, tmp_path
):
    entry = '[[model]]\nid = "claude-sonnet-6"\nlimit_class = "sonnet-6"\nsource = "test"\nchecked = 2026-11-26\n'
    server_table = tmp_path / "server-models.toml"
    server_table.write_text(entry)  # the API knows the new model; our table does not
    emu = start_emulator(models_file=str(server_table))
    requests = _lines(tmp_path / "requests.jsonl", [{"model": "claude-sonnet-6", "max_tokens": 20, "messages": USER}])
    base = ["--base-url", emu.base_url, "--no-progress"]
    assert main(["run", str(requests), "--output-dir", str(tmp_path / "a"), *base]) == 0
    rows = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert rows["status"].tolist() == ["succeeded"] and rows["cost_usd"].isna().all()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert any("claude-sonnet-6" in w and "--models-file" in w for w in summary["warnings"])
    assert summary["unpriced_models"] == {"claude-sonnet-6": 1}
    unpriced = estimate_file(requests, ClientSettings())
    assert unpriced["unpriced_models"] == ["claude-sonnet-6"] and "price unknown" in format_estimate(unpriced)

    priced = tmp_path / "priced.toml"
    priced.write_text(
        entry + "[model.prices]\ninput = 3.0\noutput = 15.0\ncache_write_5m = 3.75\ncache_write_1h = 6.0\n"
        "cache_read = 0.30\n"
    )
    run = ["run", str(requests), "--output-dir", str(tmp_path / "b"), *base, "--models-file", str(priced)]
    assert main(run) == 0
    rows = pd.read_parquet(tmp_path / "b" / "results.parquet")
    expected = (rows["input_tokens"][0] * 3.0 + rows["output_tokens"][0] * 15.0) / 1e6
    assert rows["cost_usd"][0] == pytest.approx(expected)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["unpriced_models"] == {}
    assert estimate_file(requests, ClientSettings(models_file=str(priced)))["cost_usd_min"] > 0


def test_the_shipped_table_parses_as_the_documented_format():
    text = (Path(__file__).resolve().parents[1] / "src" / "prefect_anthropic" / "api" / "models.toml").read_text()
    entries = tomllib.loads(text)["model"]
    assert len(entries) == len(model_table().models)
