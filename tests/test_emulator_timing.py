"""Reply time as Claude's: time to first token, then the output at its speed; streams paced token by token;
the status above capacity; when requests arrived. Bounds are generous: they hold on a busy 2-core machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import pytest

from conftest import HEADERS, message_body
from prefect_anthropic.emulator import EmulatorConfig

# "echo: " and 98 one-token words: a reply of 100 output tokens, told in about 20 deltas.
LONG = " ".join(["word"] * 98)


def post(emu, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{emu.base_url}/v1/messages", json=body, headers=HEADERS, timeout=30, **kwargs)


def stream_timeline(emu, body: dict) -> tuple[list[tuple[float, str, dict]], BaseException | None]:
    """Every event of a streamed reply with its arrival, in seconds after the request was sent, and the
    error that cut the stream, if any."""
    events: list[tuple[float, str, dict]] = []
    started = time.perf_counter()
    try:
        with httpx.stream(
            "POST", f"{emu.base_url}/v1/messages", json={**body, "stream": True}, headers=HEADERS, timeout=30
        ) as response:
            assert response.status_code == 200
            name = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((time.perf_counter() - started, name, json.loads(line.removeprefix("data: "))))
    except httpx.RemoteProtocolError as error:
        return events, error
    return events, None


def arrivals(events: list[tuple[float, str, dict]], name: str) -> list[float]:
    return [at for at, event, _ in events if event == name]


def test_a_reply_takes_latency_plus_time_to_first_token_plus_its_output_at_the_output_speed(start_emulator):
    emu = start_emulator(latency_ms=100, ttft_ms=300, output_tokens_per_second=100)
    started = time.perf_counter()
    response = post(emu, message_body(LONG, max_tokens=500))
    elapsed = time.perf_counter() - started
    output_tokens = response.json()["usage"]["output_tokens"]
    assert output_tokens == 100
    expected = 0.1 + 0.3 + output_tokens / 100
    assert expected <= elapsed < expected + 2


def test_without_an_output_speed_the_output_is_instant(start_emulator):
    emu = start_emulator(ttft_ms=200)
    started = time.perf_counter()
    assert post(emu, message_body(LONG, max_tokens=500)).status_code == 200
    assert 0.2 <= time.perf_counter() - started < 1.5


def test_a_stream_starts_at_the_first_token_and_its_deltas_arrive_at_the_output_speed(start_emulator):
    emu = start_emulator(ttft_ms=300, output_tokens_per_second=100)
    events, error = stream_timeline(emu, message_body(LONG, max_tokens=500))
    assert error is None
    (started,) = arrivals(events, "message_start")
    deltas = arrivals(events, "content_block_delta")
    (stopped,) = arrivals(events, "message_stop")
    output_s = events[-2][2]["usage"]["output_tokens"] / 100  # message_delta carries the output usage
    assert 0.3 <= started < 0.3 + 1
    assert len(deltas) >= 15 and deltas == sorted(deltas)
    assert deltas[-1] - deltas[0] >= 0.5 * output_s  # spread over the output time, not in one burst
    assert 0.3 + output_s <= stopped < 0.3 + output_s + 2
    text = "".join(data["delta"]["text"] for _, name, data in events if name == "content_block_delta")
    assert text == "echo: " + LONG


@pytest.mark.parametrize("fault", ["drop_rate", "stream_error_rate"])
def test_a_stream_fault_happens_part_way_through_and_the_work_is_billed(start_emulator, fault):
    emu = start_emulator(ttft_ms=200, output_tokens_per_second=100, **{fault: 1.0})
    started = time.perf_counter()
    events, error = stream_timeline(emu, message_body(LONG, max_tokens=500))
    cut_at = time.perf_counter() - started
    deltas = arrivals(events, "content_block_delta")
    assert deltas and not arrivals(events, "message_stop")
    if fault == "drop_rate":
        assert isinstance(error, httpx.RemoteProtocolError)
    else:
        assert error is None and events[-1][1] == "error"
        assert events[-1][2]["error"]["type"] == "overloaded_error"
    # Cut when about half the output was told: after the first token and some deltas, before the end.
    assert 0.2 + 0.2 <= cut_at < 0.2 + 1.0 + 1
    stats = emu.stats()
    assert stats["billed_requests"] == 1 and stats["streamed_requests"] == 1


@pytest.mark.parametrize(("status", "error_type"), [(529, "overloaded_error"), (503, "api_error")])
def test_above_capacity_the_chosen_status_answers_while_a_stream_is_still_producing(start_emulator, status, error_type):
    emu = start_emulator(capacity=1, capacity_status=status, output_tokens_per_second=100)
    with httpx.stream(
        "POST", f"{emu.base_url}/v1/messages", json=message_body(LONG, max_tokens=500, stream=True), headers=HEADERS
    ) as streaming:
        lines = streaming.iter_lines()
        next(lines)  # message_start: the reply has its first token, the rest is to come
        refused = post(emu, message_body("one more"))
        assert refused.status_code == status and "retry-after" not in refused.headers
        envelope = refused.json()
        assert envelope["type"] == "error" and envelope["error"]["type"] == error_type
        assert envelope["request_id"] == refused.headers["request-id"]
        assert 'data: {"type":"message_stop"}' in list(lines)
    assert post(emu, message_body("after the stream")).status_code == 200  # the stream left when done
    stats = emu.stats()
    assert stats["responses_by_status"] == {"200": 2, str(status): 1}
    assert stats["billed_requests"] == 2 and stats["max_in_flight"] == 1


def test_output_tokens_of_a_stream_count_against_the_limit_when_its_output_is_done(start_emulator):
    emu = start_emulator(output_tokens_per_minute=60, burst_seconds=60, output_tokens_per_second=100)
    with httpx.stream(
        "POST", f"{emu.base_url}/v1/messages", json=message_body(LONG, max_tokens=500, stream=True), headers=HEADERS
    ) as streaming:
        lines = streaming.iter_lines()
        next(lines)
        assert post(emu, message_body("during")).status_code == 200  # the stream's 100 tokens not yet counted
        assert 'data: {"type":"message_stop"}' in list(lines)
    assert post(emu, message_body("after")).status_code == 429  # 60 - 100 - 5: in debt now


def test_the_ledger_tells_when_requests_arrived_apart_from_when_they_were_billed(start_emulator):
    # 2 requests, then 429 (the next token comes 30 s later, however slowly a busy machine posts them).
    emu = start_emulator(latency_ms=300, requests_per_minute=2, burst_seconds=60)
    assert emu.stats()["first_arrival_at"] is None
    before = time.time()
    for question in ("first", "second"):
        assert post(emu, message_body(question)).status_code == 200
    admitted = emu.stats()
    assert post(emu, message_body("rate limited")).status_code == 429
    assert post(emu, {"model": "claude-sonnet-4-6"}).status_code == 400
    stats = emu.stats()
    assert before <= stats["first_arrival_at"] < stats["last_arrival_at"] <= time.time()
    # Billed when produced, 300 ms after arriving.
    assert stats["first_request_at"] - stats["first_arrival_at"] >= 0.25
    assert stats["last_request_at"] - stats["last_arrival_at"] >= 0.25
    assert stats["last_arrival_at"] == admitted["last_arrival_at"]  # rejected requests did not arrive


def test_many_paced_streams_in_flight_at_once_overlap(start_emulator):
    emu = start_emulator(ttft_ms=1000, output_tokens_per_second=100)
    body = message_body("a few words of output", max_tokens=100, stream=True)  # ~7 tokens, 70 ms
    n = 100

    async def run() -> list[bytes]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=emu.base_url, headers=HEADERS, limits=limits, timeout=30) as client:

            async def one() -> bytes:
                async with client.stream("POST", "/v1/messages", json=body) as response:
                    return await response.aread()

            return await asyncio.gather(*(one() for _ in range(n)))

    started = time.perf_counter()
    replies = asyncio.run(run())
    assert time.perf_counter() - started < 1 + 3  # one after another, they would take 100 s
    assert all(reply.rstrip().endswith(b'{"type":"message_stop"}') for reply in replies)
    stats = emu.stats()
    assert stats["streamed_requests"] == n and stats["max_in_flight"] == n


def test_options_round_trip_through_the_command_line():
    config = EmulatorConfig(
        port=0,
        ttft_ms=250.5,
        output_tokens_per_second=80,
        latency_ms=0.1,
        capacity=2000,
        capacity_status=503,
        seed=3,
        billing_error=True,
        models_file="models.toml",
    )
    parser = argparse.ArgumentParser()
    EmulatorConfig.add_arguments(parser)
    assert EmulatorConfig.from_namespace(parser.parse_args(config.to_args())) == config
    assert EmulatorConfig.from_namespace(parser.parse_args([])) == EmulatorConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--capacity-status", "500"])
    with pytest.raises(ValueError):
        EmulatorConfig(capacity_status=500)
