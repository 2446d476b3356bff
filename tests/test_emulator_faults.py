"""Fault injection: each flag does what it says, reproducibly under --seed."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import HEADERS, message_body


def statuses(emu, n):
    with httpx.Client(base_url=emu.base_url, headers=HEADERS, timeout=30) as client:
        return [client.post("/v1/messages", json=message_body(f"q{i}")).status_code for i in range(n)]


@pytest.mark.parametrize(
    ("flag", "status"),
    [
        ("error_rate_429", 429),
        ("error_rate_529", 529),
        ("error_rate_500", 500),
        ("error_rate_504", 504),
        ("error_rate_409", 409),
    ],
)
def test_error_rates(start_emulator, flag, status):
    emu = start_emulator(seed=11, **{flag: 0.3})
    seen = statuses(emu, 200)
    share = seen.count(status) / len(seen)
    assert 0.2 <= share <= 0.4
    assert set(seen) == {200, status}
    assert emu.stats()["billed_requests"] == seen.count(200)  # errors are not billed


def test_injected_429_carries_retry_after(start_emulator):
    emu = start_emulator(error_rate_429=1.0, fault_retry_after_s=3)
    response = httpx.post(f"{emu.base_url}/v1/messages", json=message_body(), headers=HEADERS)
    assert response.status_code == 429 and response.headers["retry-after"] == "3"


def test_same_seed_same_faults(start_emulator):
    first = statuses(start_emulator(seed=5, error_rate_500=0.2, error_rate_529=0.2), 60)
    second = statuses(start_emulator(seed=5, error_rate_500=0.2, error_rate_529=0.2), 60)
    assert first == second


def test_latency_mean_and_jitter(start_emulator):
    emu = start_emulator(latency_ms=100, latency_jitter_ms=50, seed=2)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS) as client:
        elapsed = []
        for _ in range(8):
            started = time.perf_counter()
            client.post("/v1/messages", json=message_body())
            elapsed.append(time.perf_counter() - started)
    assert min(elapsed) >= 0.045 and max(elapsed) <= 0.3
    assert 0.07 <= sum(elapsed) / len(elapsed) <= 0.16


def test_dropped_connection_mid_response(start_emulator):
    emu = start_emulator(drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{emu.base_url}/v1/messages", json=message_body(), headers=HEADERS)
    assert emu.stats()["billed_requests"] == 1  # the server did the work: it is billed


def test_stalled_response_outlasts_a_client_timeout(start_emulator):
    emu = start_emulator(stall_rate=1.0, stall_s=5)
    started = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{emu.base_url}/v1/messages", json=message_body(), headers=HEADERS, timeout=0.5)
    assert time.perf_counter() - started < 2
