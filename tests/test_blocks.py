"""The blocks follow Prefect's conventions (its own standard test suite) and build the shared client."""

from __future__ import annotations

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from prefect_anthropic import AnthropicClientConfig, AnthropicCredentials


class TestAnthropicCredentials(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return AnthropicCredentials


class TestAnthropicClientConfig(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return AnthropicClientConfig


async def test_one_client_per_configuration_and_event_loop():
    config = AnthropicClientConfig(
        credentials=AnthropicCredentials(api_key="sk-ant-block"), tier="2", requests_per_minute=10
    )
    client = config.get_client()
    assert config.get_client() is client  # shards of one process share limiters and concurrency cap
    assert client.limiter("claude-sonnet-4-6").limits.requests_per_minute == 10
    assert client.limiter("claude-sonnet-4-6").limits.input_tokens_per_minute == 450_000
    assert "sk-ant-block" not in config.settings().model_dump_json()
    await client.aclose()
