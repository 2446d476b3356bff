"""The official anthropic SDK, pointed at the emulator, works as against the real API."""

from __future__ import annotations

import concurrent.futures
import time

import anthropic
import pytest

from conftest import MODEL
from prefect_anthropic.api.models import TODAY_ENV


@pytest.fixture(params=[None, "2023-06-01"], ids=["sdk-default-version", "version-2023-06-01"])
def sdk(start_emulator, request):
    """The SDK as it comes (its own default API version), and pinned to the older 2023-06-01."""
    emu = start_emulator(batch_delay_s=0.3)
    headers = {"anthropic-version": request.param} if request.param else None
    return anthropic.Anthropic(
        api_key="sk-ant-fake-sdk-key", base_url=emu.base_url, max_retries=0, default_headers=headers
    )


def test_sdk_creates_a_message(sdk):
    message = sdk.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hello SDK"}])
    assert message.content[0].text == "echo: Hello SDK"
    assert message.usage.input_tokens > 0 and message.stop_reason == "end_turn"


def test_sdk_counts_tokens(sdk):
    counted = sdk.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Count me"}])
    assert counted.input_tokens > 0


def test_sdk_runs_a_batch_and_reads_results(sdk):
    batch = sdk.messages.batches.create(
        requests=[
            {
                "custom_id": f"r{i}",
                "params": {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": f"n{i}"}]},
            }
            for i in range(5)
        ]
    )
    while batch.processing_status != "ended":
        time.sleep(0.1)
        batch = sdk.messages.batches.retrieve(batch.id)
    assert batch.request_counts.succeeded == 5
    results = {r.custom_id: r.result for r in sdk.messages.batches.results(batch.id)}
    assert results["r3"].type == "succeeded" and results["r3"].message.content[0].text == "echo: n3"


def test_sdk_sees_rate_limit_error_with_retry_after(start_emulator):
    emu = start_emulator(requests_per_minute=60, burst_seconds=1)
    client = anthropic.Anthropic(api_key="sk-ant-fake-sdk-key", base_url=emu.base_url, max_retries=0)
    client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "a"}])
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "b"}])
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_sdk_error_classes_match_statuses(start_emulator, monkeypatch):
    monkeypatch.setenv(TODAY_ENV, "2026-12-02")  # Sonnet 3.5 was retired on 2025-10-22
    emu = start_emulator(api_key="only-this-key")
    client = anthropic.Anthropic(api_key="wrong", base_url=emu.base_url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "a"}])
    client = anthropic.Anthropic(api_key="only-this-key", base_url=emu.base_url, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="claude-3-5-sonnet-20240620", max_tokens=5, messages=[{"role": "user", "content": "a"}]
        )
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "system", "content": "a"}])


def test_sdk_streams_a_reply_paced_at_the_output_speed(start_emulator):
    emu = start_emulator(ttft_ms=200, output_tokens_per_second=100)
    client = anthropic.Anthropic(api_key="sk-ant-fake-sdk-key", base_url=emu.base_url, max_retries=0)
    words = " ".join(["word"] * 98)
    started = time.perf_counter()
    arrivals = []
    with client.messages.stream(model=MODEL, max_tokens=500, messages=[{"role": "user", "content": words}]) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.perf_counter() - started)
        message = stream.get_final_message()
    assert message.content[0].text == "echo: " + words and message.usage.output_tokens == 100
    assert arrivals[0] >= 0.2 and arrivals[-1] - arrivals[0] >= 0.5  # over the 1 s of output, not at once
    assert time.perf_counter() - started >= 0.2 + 1.0


def test_sdk_sees_a_full_gateway_as_a_server_error(start_emulator):
    emu = start_emulator(capacity=1, capacity_status=503, latency_ms=1000)
    client = anthropic.Anthropic(api_key="sk-ant-fake-sdk-key", base_url=emu.base_url, max_retries=0)

    def ask(text: str):
        return client.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": text}])

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(ask, "holds the only place")
        while emu.stats()["first_arrival_at"] is None:
            time.sleep(0.01)
        with pytest.raises(anthropic.InternalServerError) as caught:
            ask("one too many")
        assert held.result().content[0].text == "echo: holds the only place"
    assert caught.value.status_code == 503 and caught.value.body["error"]["type"] == "api_error"
