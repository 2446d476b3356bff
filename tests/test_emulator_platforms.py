"""The clouds' surfaces of the emulator (issue 28, item 6, first part): the official SDK's own platform clients,
pointed at the emulator with `base_url`, get a message back through Bedrock's InvokeModel (SigV4 verified
against the emulator's test key pair) and Vertex AI's rawPredict (a bearer token), and neither surface sends
rate-limit headers or retry-after; throttling is worded as each platform words it."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from prefect_anthropic.emulator.platforms import TEST_AWS_ACCESS_KEY, TEST_AWS_SECRET_KEY

MODEL = "claude-sonnet-4-6"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(autouse=True)
def no_cloud_environment(monkeypatch):
    """The SDKs read these: a developer's own would change what is sent."""
    for name in ("AWS_BEARER_TOKEN_BEDROCK", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "ANTHROPIC_BEDROCK_BASE_URL", "ANTHROPIC_VERTEX_BASE_URL",
                 "ANTHROPIC_VERTEX_PROJECT_ID", "CLOUD_ML_REGION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def test_the_sdk_bedrock_client_gets_a_message_signed_with_sigv4(start_emulator):
    emu = start_emulator(seed=1, requests_per_minute=1_000)  # limits in force, yet no header says so
    client = anthropic.AnthropicBedrock(
        aws_access_key=TEST_AWS_ACCESS_KEY, aws_secret_key=TEST_AWS_SECRET_KEY, aws_region="us-east-1",
        base_url=emu.base_url, max_retries=0,
    )  # fmt: skip
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=32, messages=MESSAGES)
    message = raw.parse()
    assert message.type == "message" and message.content and message.usage.output_tokens > 0
    assert not [name for name in raw.headers if name.startswith("anthropic-ratelimit-") or name == "retry-after"]
    assert emu.stats()["billed_requests"] == 1

    # A signature made with another secret is refused, in Bedrock's words, and nothing is billed.
    forged = anthropic.AnthropicBedrock(
        aws_access_key=TEST_AWS_ACCESS_KEY, aws_secret_key="not-the-secret", aws_region="us-east-1",
        base_url=emu.base_url, max_retries=0,
    )  # fmt: skip
    with pytest.raises(anthropic.PermissionDeniedError, match="signature we calculated does not match"):
        forged.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
    assert emu.stats()["billed_requests"] == 1


def test_the_sdk_bedrock_client_streams_through_the_event_stream(start_emulator):
    emu = start_emulator(seed=6)
    client = anthropic.AnthropicBedrock(
        aws_access_key=TEST_AWS_ACCESS_KEY, aws_secret_key=TEST_AWS_SECRET_KEY, aws_region="us-east-1",
        base_url=emu.base_url, max_retries=0,
    )  # fmt: skip
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(block.text for block in final.content) and text.startswith("echo: ")
    assert final.usage.output_tokens > 0 and emu.stats()["billed_requests"] == 1


def test_a_bedrock_stream_cut_by_an_error_ends_with_the_sdk_s_error(start_emulator):
    emu = start_emulator(seed=7, stream_error_rate=1.0)
    client = anthropic.AnthropicBedrock(api_key="bedrock-api-key", aws_region="us-east-1", base_url=emu.base_url)
    with (
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream,
    ):
        "".join(stream.text_stream)


def test_the_sdk_bedrock_client_with_a_bearer_key(start_emulator):
    emu = start_emulator(seed=2)
    client = anthropic.AnthropicBedrock(api_key="bedrock-api-key", aws_region="us-east-1", base_url=emu.base_url)
    message = client.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    assert message.content and emu.stats()["billed_requests"] == 1


def test_the_sdk_vertex_client_gets_a_message_and_a_stream(start_emulator):
    emu = start_emulator(seed=3, requests_per_minute=1_000)
    client = anthropic.AnthropicVertex(
        region="us-east5", project_id="a-project", access_token="ya29.emulator-token", base_url=f"{emu.base_url}/v1",
        max_retries=0,
    )  # fmt: skip
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=32, messages=MESSAGES)
    assert raw.parse().content
    assert not [name for name in raw.headers if name.startswith("anthropic-ratelimit-") or name == "retry-after"]
    with client.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
    assert text and emu.stats()["billed_requests"] == 2


def test_the_sdk_aws_client_signs_for_claude_platform_on_aws_with_its_workspace(start_emulator):
    emu = start_emulator(seed=8, requests_per_minute=1_000)
    client = anthropic.AnthropicAWS(
        aws_access_key=TEST_AWS_ACCESS_KEY, aws_secret_key=TEST_AWS_SECRET_KEY, aws_region="us-east-1",
        workspace_id="wrkspc_emulator", base_url=emu.base_url, max_retries=0,
    )  # fmt: skip
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=32, messages=MESSAGES)
    assert raw.parse().content
    assert [name for name in raw.headers if name.startswith("anthropic-ratelimit-")]  # the full API's headers
    with client.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream)
    keyed = anthropic.AnthropicAWS(api_key="aws-api-key", workspace_id="wrkspc_emulator", base_url=emu.base_url)
    assert keyed.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES).content
    assert emu.stats()["billed_requests"] == 3


def test_the_sdk_google_cloud_client_reaches_a_workspace_s_api(start_emulator):
    emu = start_emulator(seed=9)
    base_url = f"{emu.base_url}/v1/projects/a-project/locations/global/workspaces/wrkspc_emulator/invoke"
    client = anthropic.AnthropicGoogleCloud(token_provider=lambda: "ya29.emulator-token", base_url=base_url)
    message = client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
    assert message.content
    counted = client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert counted.input_tokens > 0 and emu.stats()["billed_requests"] == 1


def test_throttling_in_each_platform_s_words_without_retry_after(start_emulator):
    emu = start_emulator(seed=4, requests_per_minute=1)
    vertex_url = f"{emu.base_url}/v1/projects/p/locations/us-east5/publishers/anthropic/models/{MODEL}:rawPredict"
    body = {"anthropic_version": "2026-10-21", "max_tokens": 8, "messages": MESSAGES}
    headers = {"authorization": "Bearer ya29.token"}
    answers = [httpx.post(vertex_url, json=body, headers=headers, timeout=30) for _ in range(3)]
    assert answers[0].status_code == 200
    throttled = answers[-1]
    assert throttled.status_code == 429
    assert throttled.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert "retry-after" not in throttled.headers
    assert not [name for name in throttled.headers if name.startswith("anthropic-ratelimit-")]

    bedrock_url = f"{emu.base_url}/model/{MODEL}/invoke"
    bedrock = httpx.post(bedrock_url, json=body, headers={"authorization": "Bearer bedrock-key"}, timeout=30)
    assert bedrock.status_code == 200  # another key: its own limits
    again = httpx.post(bedrock_url, json=body, headers={"authorization": "Bearer bedrock-key"}, timeout=30)
    assert again.status_code == 429 and again.headers["x-amzn-errortype"].startswith("ThrottlingException")
    assert again.json() == {"message": "Too many requests, please wait before trying again."}
    assert "retry-after" not in again.headers


def test_a_platform_body_with_a_model_or_without_its_version_is_refused(start_emulator):
    emu = start_emulator(seed=5)
    url = f"{emu.base_url}/v1/projects/p/locations/us-east5/publishers/anthropic/models/{MODEL}:rawPredict"
    headers = {"authorization": "Bearer ya29.token"}
    missing = httpx.post(url, json={"max_tokens": 8, "messages": MESSAGES}, headers=headers, timeout=30)
    assert missing.status_code == 400 and "anthropic_version" in missing.json()["error"]["message"]
    unauthenticated = httpx.post(url, json={"anthropic_version": "2026-10-21", "max_tokens": 8, "messages": MESSAGES})
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["status"] == "UNAUTHENTICATED"
    assert emu.stats()["billed_requests"] == 0
