"""One source for every option: each ClientSettings field reaches the client from the command line, from a
client block, and from a block with an explicit option over it; the flow's parameters are RunOptions'."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

from conftest import write_requests
from prefect_anthropic import AnthropicClientConfig, AnthropicCredentials, ClientSettings, RunOptions
from prefect_anthropic.cli import _settings, build_parser, main
from prefect_anthropic.engine import AnthropicClient
from prefect_anthropic.orchestration.blocks import resolve_settings
from prefect_anthropic.orchestration.flows import generate_dataset

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}

#: A value other than the default for every field (a new field without one fails the first test).
SAMPLES: dict[str, Any] = {
    "base_url": "http://127.0.0.1:9",
    "anthropic_version": "2026-10-21",
    "tier": "3",
    "requests_per_minute": 123.0,
    "input_tokens_per_minute": 4567.0,
    "output_tokens_per_minute": 890.0,
    "limit_share": 0.5,
    "max_concurrency": 7,
    "adaptive_concurrency": False,
    "give_up_after_s": 42.0,
    "max_attempts": 3,
    "timeout_s": 12.0,
    "include_request": True,
    "use_caching": True,
    "auto_cache": True,
    "drop_unsupported_params": True,
    "models_file": None,  # a file written by the fixture
    "output_schema": SCHEMA,
    "validation_retries": 4,
    "max_cost_usd": 1.5,
    "limiter_url": "redis://127.0.0.1:1/0",
    "limiter_block": "some-redis-block",
    "shared_max_concurrency": 9,
}
#: A second value, for "an explicit option over a block's".
OVERRIDES: dict[str, Any] = {
    **{name: not value for name, value in SAMPLES.items() if isinstance(value, bool)},
    "base_url": "http://127.0.0.1:10",
    "anthropic_version": "2023-06-01",
    "tier": "build",
    "requests_per_minute": 321.0,
    "input_tokens_per_minute": 7654.0,
    "output_tokens_per_minute": 98.0,
    "limit_share": 0.25,
    "max_concurrency": 11,
    "give_up_after_s": 24.0,
    "max_attempts": 2,
    "timeout_s": 21.0,
    "models_file": None,
    "output_schema": {**SCHEMA, "required": []},
    "validation_retries": 1,
    "max_cost_usd": 0.75,
    "limiter_url": "redis://127.0.0.1:2/1",
    "limiter_block": "other-redis-block",
    "shared_max_concurrency": 3,
}


@pytest.fixture
def samples(tmp_path) -> tuple[dict[str, Any], dict[str, Any]]:
    models = tmp_path / "models.toml"
    models.write_text('[[model]]\nid = "claude-sonnet-5-5"\nmin_cacheable_tokens = 2048\n')
    other = tmp_path / "other-models.toml"
    other.write_text('[[model]]\nid = "claude-sonnet-5-5"\nmin_cacheable_tokens = 4096\n')
    return {**SAMPLES, "models_file": str(models)}, {**OVERRIDES, "models_file": str(other)}


def command_line(values: dict[str, Any], tmp_path) -> list[str]:
    """The flags that set `values`, spelled as the parser generated them."""
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    flags = {action.dest: action for action in run._actions}
    argv: list[str] = []
    for name, value in values.items():
        action = flags[name]
        flag = action.option_strings[0]
        if isinstance(value, bool):
            assert action.const is value, name  # the switch sets exactly this value
            argv.append(flag)
        elif isinstance(value, dict):
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(value))
            argv += [flag, str(path)]
        else:
            argv += [flag, str(value)]
    return argv


def uses(client: AnthropicClient, name: str, value: Any) -> bool:
    """The client acts on the setting (where that can be read off it), and holds it."""
    checks = {
        "base_url": lambda: client.base_url == value,
        "anthropic_version": lambda: client.anthropic_version == value and client.preflight.api_version == value,
        "max_concurrency": lambda: client.max_concurrency == value and client.account.max_concurrency == value,
        "adaptive_concurrency": lambda: client.window("claude-sonnet-4-6").adaptive is value,
        "give_up_after_s": lambda: client.account.breaker(client.window("claude-sonnet-4-6")).give_up_after_s == value,
        "max_attempts": lambda: client.retry.max_attempts == value,
        "include_request": lambda: client.include_request is value,
        "use_caching": lambda: (client.warmer is not None) is (value or client.settings.auto_cache),
        "auto_cache": lambda: (client.auto_cache is not None) is value,
        "drop_unsupported_params": lambda: client.preflight.drop_unsupported_params is value,
        "output_schema": lambda: client.output_schema is not None and client.output_schema.full == value,
        "validation_retries": lambda: client.validation_retries == value,
        "max_cost_usd": lambda: client.budget is not None and client.budget.limit_usd == value,
        "requests_per_minute": lambda: (
            client.limiter("claude-sonnet-4-6").limits.requests_per_minute == value * client.settings.limit_share
        ),
    }
    return getattr(client.settings, name) == value and checks.get(name, lambda: True)()


def test_every_field_has_a_sample_and_a_flag():
    assert set(SAMPLES) == set(ClientSettings.model_fields) == set(OVERRIDES)
    help_text = build_parser().format_help()
    assert "run" in help_text


async def test_every_setting_reaches_the_client_from_the_command_line(samples, tmp_path):
    values, _ = samples
    args = build_parser().parse_args(["run", "requests.jsonl", "--output-dir", "out", *command_line(values, tmp_path)])
    settings = _settings(args)
    assert settings.model_fields_set == set(values)
    async with AnthropicClient("sk-ant-fake", settings) as client:
        for name, value in values.items():
            assert uses(client, name, value), name


@pytest.mark.usefixtures("prefect_server")
async def test_every_setting_reaches_the_client_from_a_block_and_an_explicit_one_over_it(samples):
    values, overrides = samples
    credentials = AnthropicCredentials(api_key="sk-ant-from-the-block", base_url="http://127.0.0.1:8")
    await AnthropicClientConfig(credentials=credentials, settings=ClientSettings(**values)).save(
        "every-option", overwrite=True
    )
    settings, key = await resolve_settings(None, "every-option")
    assert key == "sk-ant-from-the-block"
    async with AnthropicClient(key, settings) as client:
        for name, value in values.items():
            assert uses(client, name, value), name
    for name, value in overrides.items():
        settings, _ = await resolve_settings(ClientSettings(**{name: value}), "every-option")
        async with AnthropicClient(key, settings) as client:
            assert uses(client, name, value), name
            others = [other for other in values if other != name and other != "auto_cache"]
            assert all(getattr(client.settings, other) == values[other] for other in others), name


@pytest.mark.usefixtures("prefect_server")
async def test_the_credentials_give_the_endpoint_unless_the_settings_name_one():
    credentials = AnthropicCredentials(api_key="k", base_url="http://127.0.0.1:8", anthropic_version="2026-10-21")
    await AnthropicClientConfig(credentials=credentials, tier="2").save("endpoint-from-credentials", overwrite=True)
    settings, _ = await resolve_settings(None, "endpoint-from-credentials")
    assert settings.api_base_url == "http://127.0.0.1:8" and settings.api_version == "2026-10-21"
    settings, _ = await resolve_settings(ClientSettings(base_url="http://127.0.0.1:9"), "endpoint-from-credentials")
    assert settings.api_base_url == "http://127.0.0.1:9" and settings.tier == "2"


def test_the_flow_takes_every_run_option_with_its_default():
    parameters = inspect.signature(generate_dataset.fn).parameters
    for name, info in RunOptions.model_fields.items():
        assert name in parameters, name
        assert parameters[name].default == info.default, name


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="warm_cache"):
        ClientSettings(warm_cache=True)


@pytest.mark.usefixtures("prefect_server")
def test_a_client_block_with_an_explicit_budget_stops_at_it(start_emulator, tmp_path, monkeypatch):
    """The block holds everything but the budget; --max-cost-usd on the command line is laid over it."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    emu = start_emulator(latency_ms=5)
    credentials = AnthropicCredentials(api_key="sk-ant-fake-block-budget", base_url=emu.base_url)
    AnthropicClientConfig(credentials=credentials, max_concurrency=4).save("budget-over-block", overwrite=True)
    requests = write_requests(tmp_path / "requests.jsonl", 200)
    out = tmp_path / "out"
    argv = ["run", str(requests), "--output-dir", str(out), "--client-block", "budget-over-block", "--no-progress"]
    assert main([*argv, "--max-cost-usd", "0.05"]) == 3
    assert 0 < emu.stats()["cost_usd"] <= 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget_usd"] == 0.05 and summary["settings"]["max_concurrency"] == 4


def test_the_flow_takes_each_run_option_as_a_parameter_made_from_its_declaration():
    """Issue 27: the flow's option parameters are generated from RunOptions (name, type, default, and the
    description the Prefect UI shows), never copied by hand."""
    from prefect.utilities.callables import parameter_schema

    from prefect_anthropic.orchestration.flows import generate_dataset

    properties = parameter_schema(generate_dataset).model_dump()["properties"]
    for name, field in RunOptions.model_fields.items():
        assert properties[name].get("default") == field.default, name
        assert " ".join(properties[name]["description"].split()) == " ".join(field.description.split()), name
    assert properties["mode"]["enum"] == ["realtime", "batch", "auto"]
    own = {"requests_path", "output_dir", "settings", "client_block", "credentials_block", "original_layout_path",
           "parquet_beside_original", "input_table", "input_columns"}  # fmt: skip
    assert set(properties) == own | set(RunOptions.model_fields)
