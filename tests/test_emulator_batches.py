"""The Message Batches API: shapes, statuses, request_counts, custom_id rules, results, cancel, delete."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from conftest import HEADERS, message_body


def requests(n, start=0):
    return [{"custom_id": f"req-{i}", "params": message_body(f"batch question {i}")} for i in range(start, start + n)]


def wait_ended(client, batch_id, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.get(f"/v1/messages/batches/{batch_id}").json()
        if batch["processing_status"] == "ended" or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


@pytest.fixture
def batch_client(start_emulator):
    emu = start_emulator(batch_delay_s=0.5, seed=3)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS, timeout=30) as client:
        client.emulator = emu
        yield client


def test_batch_runs_to_completion_with_results_in_any_order(batch_client):
    invalid = {"custom_id": "bad-1", "params": {"model": "claude-sonnet-4-6", "messages": []}}
    created = batch_client.post("/v1/messages/batches", json={"requests": [*requests(20), invalid]}).json()
    assert created["id"].startswith("msgbatch_") and created["type"] == "message_batch"
    assert created["processing_status"] == "in_progress"
    assert created["request_counts"] == {"processing": 21, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    assert created["results_url"] is None and created["expires_at"] > created["created_at"]
    ended = wait_ended(batch_client, created["id"])
    assert ended["processing_status"] == "ended" and ended["ended_at"]
    assert ended["request_counts"]["succeeded"] == 20 and ended["request_counts"]["errored"] == 1
    results_response = batch_client.get(ended["results_url"].replace(str(batch_client.base_url).rstrip("/"), ""))
    lines = [orjson.loads(line) for line in results_response.content.splitlines()]
    by_id = {line["custom_id"]: line["result"] for line in lines}
    assert len(by_id) == 21
    assert by_id["req-7"]["type"] == "succeeded"
    assert by_id["req-7"]["message"]["content"][0]["text"] == "echo: batch question 7"
    assert by_id["bad-1"]["type"] == "errored"
    assert by_id["bad-1"]["error"]["error"]["type"] == "invalid_request_error"
    stats = batch_client.emulator.stats()
    assert stats["billed_requests"] == 20 and stats["billed_batch_requests"] == 20


def test_batch_is_billed_at_half_price(batch_client):
    batch = batch_client.post("/v1/messages/batches", json={"requests": requests(1)}).json()
    wait_ended(batch_client, batch["id"])
    batch_cost = batch_client.emulator.stats()["cost_usd"]
    batch_client.post("/v1/messages", json=requests(1)[0]["params"])
    assert batch_client.emulator.stats()["cost_usd"] == pytest.approx(batch_cost * 3, rel=1e-3)


def test_cancel_ends_unfinished_requests_as_canceled(start_emulator):
    emu = start_emulator(batch_delay_s=30)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS) as client:
        batch = client.post("/v1/messages/batches", json={"requests": requests(10)}).json()
        canceling = client.post(f"/v1/messages/batches/{batch['id']}/cancel").json()
        assert canceling["processing_status"] == "canceling" and canceling["cancel_initiated_at"]
        ended = wait_ended(client, batch["id"])
        assert ended["request_counts"]["canceled"] == 10
        assert client.delete(f"/v1/messages/batches/{batch['id']}").json()["type"] == "message_batch_deleted"
        assert client.get(f"/v1/messages/batches/{batch['id']}").status_code == 404


def test_requests_due_while_canceling_still_finish_and_are_billed(start_emulator):
    emu = start_emulator(batch_delay_s=4, batch_cancel_s=2)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS) as client:
        batch = client.post("/v1/messages/batches", json={"requests": requests(20)}).json()
        time.sleep(0.5)
        at_cancel = client.post(f"/v1/messages/batches/{batch['id']}/cancel").json()["request_counts"]
        ended = wait_ended(client, batch["id"])
    counts = ended["request_counts"]
    assert counts["succeeded"] > at_cancel["succeeded"] and counts["canceled"] > 0  # some finished meanwhile
    assert counts["succeeded"] + counts["canceled"] == 20
    assert emu.stats()["billed_requests"] == counts["succeeded"]


def test_processing_times_spread_around_the_mean(start_emulator):
    emu = start_emulator(batch_delay_s=1.0, batch_delay_jitter=0.5, seed=3)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS) as client:
        started = time.monotonic()
        ids = [client.post("/v1/messages/batches", json={"requests": requests(5)}).json()["id"] for _ in range(6)]
        ended: dict[str, float] = {}
        while len(ended) < len(ids) and time.monotonic() - started < 10:
            for batch_id in set(ids) - set(ended):
                if client.get(f"/v1/messages/batches/{batch_id}").json()["processing_status"] == "ended":
                    ended[batch_id] = time.monotonic() - started
            time.sleep(0.02)
    times = sorted(ended.values())
    assert len(times) == 6 and times[0] >= 0.4 and times[-1] <= 2.5 and times[-1] - times[0] > 0.2, times


def test_expired_requests_under_the_flag(start_emulator):
    emu = start_emulator(batch_delay_s=0.2, batch_expire_rate=0.5, seed=7)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS) as client:
        batch = client.post("/v1/messages/batches", json={"requests": requests(40)}).json()
        counts = wait_ended(client, batch["id"])["request_counts"]
    assert counts["expired"] > 5 and counts["succeeded"] > 5 and counts["expired"] + counts["succeeded"] == 40


def test_delete_refuses_a_running_batch_and_results_wait_for_the_end(start_emulator):
    emu = start_emulator(batch_delay_s=30)
    with httpx.Client(base_url=emu.base_url, headers=HEADERS) as client:
        batch = client.post("/v1/messages/batches", json={"requests": requests(2)}).json()
        assert client.delete(f"/v1/messages/batches/{batch['id']}").status_code == 400
        assert client.get(f"/v1/messages/batches/{batch['id']}/results").status_code == 400


@pytest.mark.parametrize(
    "bad",
    [
        {"requests": []},
        {"requests": [{"custom_id": "has space", "params": message_body()}]},
        {"requests": [{"custom_id": "x" * 65, "params": message_body()}]},
        {"requests": [{"custom_id": "dup", "params": message_body()}, {"custom_id": "dup", "params": message_body()}]},
        {"requests": [{"custom_id": "a"}]},
    ],
)
def test_create_validates_custom_ids_and_shape(batch_client, bad):
    response = batch_client.post("/v1/messages/batches", json=bad)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_list_pages_newest_first(batch_client):
    ids = [batch_client.post("/v1/messages/batches", json={"requests": requests(1)}).json()["id"] for _ in range(3)]
    page = batch_client.get("/v1/messages/batches", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    rest = batch_client.get("/v1/messages/batches", params={"limit": 2, "after_id": page["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False
