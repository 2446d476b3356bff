"""The blocks follow Prefect's conventions (its own standard test suite) and build the shared client."""

from __future__ import annotations

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from prefect_anthropic import AnthropicClientConfig, AnthropicCredentials, ClientSettings


class TestAnthropicCredentials(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return AnthropicCredentials


class TestAnthropicClientConfig(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return AnthropicClientConfig


async def test_clients_of_one_configuration_share_the_accounts_limits_but_not_their_lifetime():
    config = AnthropicClientConfig(
        credentials=AnthropicCredentials(api_key="sk-ant-block"), tier="2", requests_per_minute=10
    )
    assert config.settings.tier == "2"  # settings given beside the credentials go into the settings field
    async with config.get_client() as client, config.get_client() as other:
        assert other is not client
        # One account in one process: the same token buckets and concurrency, as the server counts them.
        assert client.limiter("claude-sonnet-4-6") is other.limiter("claude-sonnet-4-6")
        assert client.limiter("claude-sonnet-4-6").limits.requests_per_minute == 10
        assert client.limiter("claude-sonnet-4-6").limits.input_tokens_per_minute == 450_000
        assert client.budget is None and other.stats is not client.stats
    assert "sk-ant-block" not in config.client_settings().model_dump_json()


def test_a_block_saved_with_flat_fields_loads_into_settings():
    config = AnthropicClientConfig.model_validate(
        {"credentials": {"api_key": "sk-ant-x"}, "tier": "4", "max_concurrency": 8, "max_cost_usd": 5.0}
    )
    assert config.settings.tier == "4" and config.settings.max_cost_usd == 5.0
    merged = config.client_settings(ClientSettings(max_cost_usd=1.0))
    assert merged.max_cost_usd == 1.0 and merged.max_concurrency == 8  # explicit over the block's, the rest kept
