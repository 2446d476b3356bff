"""Rate limits as Anthropic documents them: per key, per model class, continuously refilled buckets."""

from __future__ import annotations

import datetime as dt

import httpx

from conftest import HEADERS, message_body


def post(emu, body, key="test-key"):
    return httpx.post(f"{emu.base_url}/v1/messages", json=body, headers={**HEADERS, "x-api-key": key}, timeout=30)


def test_requests_bucket_rejects_then_refills(start_emulator):
    # Capacity 2, one refilled every 30 s of the emulator's clock, which the test moves on: a busy machine's slow
    # posts cannot refill the bucket between them.
    emu = start_emulator(requests_per_minute=2, burst_seconds=60)
    assert [post(emu, message_body()).status_code for _ in range(2)] == [200, 200]
    rejected = post(emu, message_body())
    assert rejected.status_code == 429
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.headers["anthropic-ratelimit-requests-remaining"] == "0"
    httpx.post(f"{emu.base_url}/_emulator/advance", params={"seconds": 31})  # 30 s refill one request
    assert post(emu, message_body()).status_code == 200


def test_limits_are_per_key_and_per_model_class(start_emulator):
    # Capacity 1, refilled once a minute: the posts below are never far enough apart for a refill, however busy
    # the machine (one a second refilled between two of them when a loaded CI took over a second for four posts).
    emu = start_emulator(requests_per_minute=1, burst_seconds=60)
    opus = {**message_body(), "model": "claude-opus-4-7"}
    assert post(emu, opus).status_code == 200
    assert post(emu, opus).status_code == 429
    assert post(emu, opus, key="other-key").status_code == 200
    assert post(emu, {**message_body(), "model": "claude-haiku-4-5"}).status_code == 200
    # Opus 4.7 and Opus 4.6 share one class bucket.
    assert post(emu, {**message_body(), "model": "claude-opus-4-6"}).status_code == 429


def test_headers_report_limit_remaining_and_rfc3339_reset(start_emulator):
    emu = start_emulator(requests_per_minute=50, input_tokens_per_minute=30_000, output_tokens_per_minute=8_000)
    response = post(emu, message_body())
    headers = response.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "30000"
    assert int(headers["anthropic-ratelimit-input-tokens-remaining"]) % 1000 == 0
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "8000"
    assert headers["anthropic-ratelimit-tokens-limit"] in ("30000", "8000")
    reset = dt.datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    now = dt.datetime.now(dt.timezone.utc)
    assert now - dt.timedelta(seconds=2) <= reset <= now + dt.timedelta(seconds=5)


def test_input_tokens_bucket_and_refill_by_clock(start_emulator):
    emu = start_emulator(input_tokens_per_minute=600, burst_seconds=60)  # capacity 600
    big = message_body("word " * 400)  # ~400 tokens
    assert post(emu, big).status_code == 200
    rejected = post(emu, big)
    assert rejected.status_code == 429 and "input tokens" in rejected.json()["error"]["message"]
    emu.advance(60)  # a minute later the bucket is full again
    assert post(emu, big).status_code == 200


def test_cache_reads_do_not_count_toward_input_tokens(start_emulator):
    emu = start_emulator(input_tokens_per_minute=4000, burst_seconds=60)
    shared = "This shared context is long enough to be cached by the model. " * 250  # ~3,500 tokens
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 10,
        "system": [{"type": "text", "text": shared, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "q"}],
    }
    first = post(emu, body).json()["usage"]
    assert first["cache_creation_input_tokens"] > 2048
    # Three more reads would exceed 4,000 input tokens if reads counted; they do not.
    for _ in range(3):
        usage = post(emu, body).json()["usage"]
        assert usage["cache_read_input_tokens"] == first["cache_creation_input_tokens"]


def test_output_tokens_are_counted_as_produced(start_emulator):
    emu = start_emulator(output_tokens_per_minute=60, burst_seconds=60)  # capacity 60
    # max_tokens far above the real output does not matter today: only produced tokens count.
    body = message_body("one two three four five six seven eight nine", max_tokens=4000)
    statuses = [post(emu, body).status_code for _ in range(5)]
    assert statuses == [200] * 5  # 5 x 11 tokens = 55 < 60
    assert post(emu, body).status_code == 200  # bucket still positive (5 left) so admitted
    assert post(emu, body).status_code == 429  # now in debt


def test_output_reserved_from_max_tokens_under_the_legacy_flag(start_emulator):
    emu = start_emulator(output_tokens_per_minute=600, burst_seconds=60, reserve_max_tokens=True)
    body = message_body("short", max_tokens=500)
    assert post(emu, body).status_code == 200  # reserves 500, settles to ~3
    assert post(emu, body).status_code == 200
    big = message_body("short", max_tokens=2000)
    assert post(emu, big).status_code == 429  # 2,000 reserved cannot fit
