"""The budget's worst case for what a request's bytes do not size (issue 25, item 9): images and PDFs given by
URL or file id, base64 PDFs, server tools' results and per-use fees."""

from __future__ import annotations

import json

import orjson
import pandas as pd
import pytest

from prefect_anthropic.api.models import MODELS_FILE_ENV, resolve_model, use_models_file
from prefect_anthropic.dataset.shard_loop import run_dataset
from prefect_anthropic.engine.budget import max_input_tokens, unbudgeted_reason, worst_case_cost
from prefect_anthropic.settings import ClientSettings

MODEL = "claude-sonnet-5-5"  # $2 / $10 per million tokens, a context window of 1M
WINDOW = 1_000_000


def body(*content: dict, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": list(content)}], **extra}


TEXT = {"type": "text", "text": "What is in it?"}
IMAGE_URL = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
DOCUMENT_FILE = {"type": "document", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}
PDF = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}


@pytest.fixture
def models_file(tmp_path, monkeypatch):
    """A models file in use for the test (named by the environment, as --models-file does), the shipped table
    afterwards."""

    def use(text: str) -> None:
        path = tmp_path / "models.toml"
        path.write_text(text)
        use_models_file(path)  # read afresh: the same path, new text
        monkeypatch.setenv(MODELS_FILE_ENV, str(path))

    return use


@pytest.mark.parametrize(
    "content",
    [
        IMAGE_URL,
        DOCUMENT_FILE,
        {"type": "image", "source": {"type": "file", "file_id": "file_abc"}},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        PDF,  # compressed page streams: its bytes do not bound its tokens either
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [IMAGE_URL]},  # nested in a tool result
    ],
)
def test_content_the_bytes_do_not_size_is_bounded_by_the_context_window(content):
    request = body(content, TEXT)
    assert max_input_tokens(request, context_window=WINDOW) == WINDOW
    # Every input token at its price, and max_tokens of output: far above what the request's bytes suggest.
    assert worst_case_cost(MODEL, request) == pytest.approx((WINDOW * 2.0 + 100 * 10.0) / 1e6)
    assert unbudgeted_reason(MODEL, request) is None


def test_a_model_without_a_known_context_window_cannot_be_budgeted_for_such_content():
    model = "claude-opus-4-5-20251101"  # priced, context window NF
    assert resolve_model(model).prices is not None and resolve_model(model).context_window is None
    request = {**body(IMAGE_URL, TEXT), "model": model}
    assert worst_case_cost(model, request) is None
    reason = unbudgeted_reason(model, request)
    assert reason is not None and "an image given by URL" in reason and "context window" in reason
    # Plain text on the same model is still bounded by its bytes.
    assert worst_case_cost(model, {**body(TEXT), "model": model}) is not None


def test_server_tools_add_a_window_per_pass_and_their_fees_times_max_uses(models_file):
    request = body(TEXT, tools=[WEB_SEARCH])
    reason = unbudgeted_reason(MODEL, request)
    assert worst_case_cost(MODEL, request) is None  # the shipped table has no web_search fee (NF)
    assert reason is not None and "web_search" in reason and "server_tool_fees" in reason
    models_file("[server_tool_fees]\nweb_search = 0.01\n")
    # 3 uses: up to 4 sampling passes, each over up to the whole window and writing up to max_tokens.
    assert max_input_tokens(request, context_window=WINDOW) == 4 * WINDOW
    expected = (4 * WINDOW * 2.0 + 4 * 100 * 10.0) / 1e6 + 3 * 0.01
    assert worst_case_cost(MODEL, request) == pytest.approx(expected)
    assert worst_case_cost(MODEL, request, batch=True) == pytest.approx((expected - 0.03) / 2 + 0.03)
    unbounded = body(TEXT, tools=[{k: v for k, v in WEB_SEARCH.items() if k != "max_uses"}])
    assert worst_case_cost(MODEL, unbounded) is None
    assert "no max_uses" in (unbudgeted_reason(MODEL, unbounded) or "")
    # A client tool (run by the caller) is sized by its bytes as before.
    client_tool = body(TEXT, tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    assert worst_case_cost(MODEL, client_tool) == pytest.approx(
        ((len(orjson.dumps(client_tool)) + 2048) * 2.0 + 100 * 10.0) / 1e6
    )


def test_a_models_file_sets_a_context_window_and_fees_and_rejects_bad_fees(models_file):
    models_file('[[model]]\nid = "claude-opus-4-5-20251101"\ncontext_window = 200000\n')
    assert worst_case_cost("claude-opus-4-5-20251101", {**body(IMAGE_URL), "model": "claude-opus-4-5-20251101"})
    with pytest.raises(ValueError, match=r"server_tool_fees\.web_search"):
        models_file('[server_tool_fees]\nweb_search = "ten"\n')


async def test_a_budget_run_does_not_send_what_it_cannot_bound(start_emulator, tmp_path):
    """Against the emulator: before, an image by URL was reserved at its few bytes and sent under a $0.50
    budget its worst case ($2 of a 1M window) does not fit; an unbounded request was sent too."""
    emu = start_emulator()
    lines = [
        body(TEXT),  # bounded by its bytes: sent
        body(IMAGE_URL, TEXT),  # worst case $2 > $0.50
        {**body(DOCUMENT_FILE, TEXT), "model": "claude-opus-4-5-20251101"},  # no window: no bound
        body(TEXT, tools=[WEB_SEARCH]),  # no fee in the table: no bound
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = ClientSettings(base_url=emu.base_url, max_cost_usd=0.5, max_concurrency=1)
    await run_dataset(str(requests), str(tmp_path / "out"), settings, "sk-ant-fake")
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("line")
    assert frame.loc[1, "status"] == "succeeded"
    assert emu.stats()["billed_requests"] == 1  # only the first line was sent
    assert list(frame.loc[[2, 3, 4], "error_type"]) == ["budget_exhausted"] * 3
    assert "--max-cost-usd" in frame.loc[2, "error_message"]
    assert "context window" in frame.loc[3, "error_message"]
    assert "server_tool_fees" in frame.loc[4, "error_message"]
