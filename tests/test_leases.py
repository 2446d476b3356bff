"""Lease objects on every store that writes conditionally (issue 25), against real emulators of each API on
loopback: moto's server (S3), fake-gcs-server (GCS), Azurite (Azure Blob), and memory:// in process. Also plain
data through Storage, and a whole run, on gs:// and az://."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import environment_of, write_requests
from prefect_anthropic import ClientSettings, RunOptions
from prefect_anthropic.dataset.leases import LeaseConflict, LeaseExists, LeaseObject, lease_object
from prefect_anthropic.dataset.shard_loop import run_dataset
from prefect_anthropic.storage import Storage
from prefect_anthropic.testing import EmulatedStore, azurite_server, gcs_server

KEY = "sk-ant-fake-leases"
STORES = ["s3", "gs", "az", "memory"]


@pytest.fixture(scope="module")
def gcs() -> Iterator[EmulatedStore]:
    with gcs_server() as store, environment_of(store):
        yield store


@pytest.fixture(scope="module")
def azurite() -> Iterator[EmulatedStore]:
    """Azurite for the module. Without it, the Azure tests are skipped, visibly; under CI=true a missing Azurite
    fails them (.ci/run installs it)."""
    if shutil.which("azurite-blob") is None:
        message = "azurite is not installed (npm install -g azurite): the Azure Blob tests need it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    with azurite_server() as store, environment_of(store):
        yield store


def fresh(storage: Storage, protocol: str) -> str:
    """A new, empty bucket (container) on the store: its URL."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, path = storage.filesystem(f"{protocol}://{name}")
    fs.mkdir(path)
    return f"{protocol}://{name}"


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> tuple[Storage, str]:
    """(the Storage that reaches it, a fresh base URL) for each store."""
    protocol = request.param
    if protocol == "memory":
        return Storage(), f"memory://leases-{uuid.uuid4().hex[:12]}"
    if protocol == "s3":
        request.getfixturevalue("s3_endpoint")
        storage = Storage()
    else:
        emulated = request.getfixturevalue("gcs" if protocol == "gs" else "azurite")
        storage = Storage(dict(emulated.storage_options))
    return storage, fresh(storage, protocol)


@pytest.fixture
def lease(store: tuple[Storage, str]) -> LeaseObject:
    storage, base = store
    found = lease_object(storage, f"{base}/out/.prefect-anthropic.lease")
    assert found is not None
    return found


def body(name: str) -> bytes:
    return f'{{"run": "{name}-{uuid.uuid4().hex}"}}'.encode()


def test_create_twice_is_refused(lease: LeaseObject) -> None:
    assert lease.read() is None
    first = body("a")
    token = lease.create(first)
    with pytest.raises(LeaseExists):
        lease.create(body("b"))
    state = lease.read()
    assert state is not None and state.body == first and state.token == token and state.age_s >= 0


def test_replace_and_delete_hold_only_with_the_current_token(lease: LeaseObject) -> None:
    stale = lease.create(body("a"))
    second = body("a")
    current = lease.replace(second, stale)
    assert current != stale
    with pytest.raises(LeaseConflict):
        lease.replace(body("b"), stale)
    with pytest.raises(LeaseConflict):
        lease.delete(stale)
    state = lease.read()
    assert state is not None and state.body == second and state.token == current  # untouched by the refusals
    lease.delete(current)
    assert lease.read() is None
    lease.delete(current)  # gone already: fine
    with pytest.raises(LeaseConflict):  # nothing to replace: not the version we held either
        lease.replace(body("a"), current)
    assert lease.read() is None
    lease.create(body("c"))  # free again


def test_age_grows_by_the_stores_clock(lease: LeaseObject) -> None:
    token = lease.create(body("a"))
    before = lease.read()
    time.sleep(1.1)  # S3 and Azure date to the second: more than one second later, the age has grown by one
    after = lease.read()
    assert before is not None and after is not None
    assert 0 <= before.age_s < after.age_s < 60
    lease.replace(body("a"), token)
    renewed = lease.read()
    assert renewed is not None and renewed.age_s < after.age_s  # a write makes it young again


def race(attempts: list[Callable[[], str]]) -> tuple[list[str], list[BaseException]]:
    """Run the attempts at once (threads released together); their results and their errors."""
    barrier = threading.Barrier(len(attempts))
    won: list[str] = []
    lost: list[BaseException] = []

    def attempt(call: Callable[[], str]) -> None:
        barrier.wait()
        try:
            won.append(call())
        except BaseException as exc:
            lost.append(exc)

    threads = [threading.Thread(target=attempt, args=(call,)) for call in attempts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return won, lost


def test_two_runs_racing_to_create_one_wins(store: tuple[Storage, str]) -> None:
    storage, base = store
    for round_ in range(5):
        leases = [lease_object(storage, f"{base}/race-{round_}/.lease") for _ in range(2)]
        bodies = [body("a"), body("b")]
        won, lost = race(
            [lambda lease=lease, data=data: lease.create(data) for lease, data in zip(leases, bodies, strict=True)]
        )
        assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], LeaseExists), lost
        state = leases[0].read()
        assert state is not None and state.token == won[0] and state.body in bodies


def test_two_runs_racing_to_replace_one_token_one_wins(store: tuple[Storage, str]) -> None:
    storage, base = store
    for round_ in range(5):
        leases = [lease_object(storage, f"{base}/race-{round_}/.lease") for _ in range(2)]
        token = leases[0].create(body("old"))
        bodies = [body("a"), body("b")]
        won, lost = race(
            [
                lambda lease=lease, data=data, token=token: lease.replace(data, token)
                for lease, data in zip(leases, bodies, strict=True)
            ]
        )
        assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], LeaseConflict), lost
        state = leases[1].read()
        assert state is not None and state.token == won[0] and state.body in bodies


def test_stores_without_conditional_writes_have_no_lease(tmp_path) -> None:
    storage = Storage()
    assert lease_object(storage, "hf://datasets/someone/something/.lease") is None
    assert lease_object(storage, str(tmp_path / ".lease")) is None  # local directories: an OS file lock
    assert lease_object(storage, f"file://{tmp_path}/.lease") is None


def test_an_unreachable_store_is_not_a_lost_lease(s3_endpoint, gcs, azurite, monkeypatch) -> None:
    """Connection refused must reach the caller as itself (or as a timeout: the clients retry it for long),
    never as LeaseExists/LeaseConflict: a run that cannot renew for a moment has not lost its lease."""
    from prefect_anthropic.dataset import leases
    from prefect_anthropic.testing import AZURITE_ACCOUNT, AZURITE_KEY, free_port

    monkeypatch.setattr(leases, "CALL_TIMEOUT_S", 1.0)
    dead = f"http://127.0.0.1:{free_port()}"
    options: dict[str, dict[str, Any]] = {
        "s3": {
            "client_kwargs": {"endpoint_url": dead},
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        },
        "gs": {"endpoint_url": dead, "token": "anon", "project": "test"},
        "az": {
            "connection_string": f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={dead}/{AZURITE_ACCOUNT};",
        },
    }
    for protocol, given in options.items():
        lease = lease_object(Storage(given), f"{protocol}://bucket/out/.lease")
        assert lease is not None
        for operation in ("create", "replace", "delete"):
            with pytest.raises(Exception) as caught:
                if operation == "create":
                    lease.create(b"{}")
                elif operation == "replace":
                    lease.replace(b"{}", "1")
                else:
                    lease.delete("1")
            assert not isinstance(caught.value, (LeaseExists, LeaseConflict)), (protocol, operation, caught.value)


@pytest.mark.parametrize("protocol", ["gs", "az"])
def test_data_through_storage_on_gcs_and_azure(protocol: str, request: pytest.FixtureRequest) -> None:
    emulated = request.getfixturevalue("gcs" if protocol == "gs" else "azurite")
    storage = Storage(dict(emulated.storage_options))
    base = fresh(storage, protocol)
    storage.write_bytes(f"{base}/data/a.bin", b"\x00\x01" * 1000)
    storage.write_text(f"{base}/data/b.json", '{"x": 1}')
    assert storage.exists(f"{base}/data/a.bin") and not storage.exists(f"{base}/data/none")
    assert storage.read_bytes(f"{base}/data/a.bin") == b"\x00\x01" * 1000
    assert storage.read_text(f"{base}/data/b.json") == '{"x": 1}'
    assert storage.list(f"{base}/data", "*.json") == [f"{base}/data/b.json"]
    with pytest.raises(RuntimeError), storage.atomic_writer(f"{base}/data/c.bin") as handle:
        handle.write(b"half")
        raise RuntimeError("the writer failed")
    assert not storage.exists(f"{base}/data/c.bin")  # abandoned: never committed
    storage.remove(f"{base}/data/a.bin")
    assert not storage.exists(f"{base}/data/a.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/data/a.bin")


@pytest.mark.parametrize("protocol", ["gs", "az"])
async def test_a_run_with_its_output_on_gcs_and_azure(
    protocol: str, request: pytest.FixtureRequest, start_emulator, tmp_path
) -> None:
    emulated = request.getfixturevalue("gcs" if protocol == "gs" else "azurite")
    storage = Storage(dict(emulated.storage_options))
    out = f"{fresh(storage, protocol)}/datasets/a"
    emu = start_emulator(latency_ms=2)
    settings = ClientSettings(base_url=emu.base_url)
    requests = write_requests(tmp_path / "requests.jsonl", 12)
    summary = await run_dataset(str(requests), out, settings, KEY, RunOptions(shard_size=5), storage=storage)
    assert summary["succeeded"] == 12
    with storage.open(f"{out}/results.parquet") as handle:
        frame = pq.read_table(handle).to_pandas()
    assert list(frame["line"]) == list(range(1, 13)) and (frame["status"] == "succeeded").all()
    again = await run_dataset(str(requests), out, settings, KEY, RunOptions(shard_size=5), storage=storage)
    assert again["requests_sent_this_run"] == 0  # resumed from the store: nothing sent twice
    assert emu.stats()["billed_requests"] == 12


@pytest.mark.parametrize("protocol", ["gs", "az", "memory"])
async def test_two_runs_on_one_output_the_second_sends_nothing(
    protocol: str, request: pytest.FixtureRequest, start_emulator, tmp_path
) -> None:
    """Issue 25, finding 4: two runs 1 s apart on one gs:// or az:// output both sent everything (no lock across
    processes there). Now the second is refused before sending, naming the first."""
    from prefect_anthropic.dataset.run_lock import OutputDirectoryLocked

    if protocol == "memory":
        storage, out = Storage(), f"memory://two-runs-{uuid.uuid4().hex[:12]}/out"
    else:
        emulated = request.getfixturevalue("gcs" if protocol == "gs" else "azurite")
        storage = Storage(dict(emulated.storage_options))
        out = f"{fresh(storage, protocol)}/datasets/two"
    # 100 requests at 20/s after a burst of 20: the first run sends for about 4 s, so it still holds the output
    # when the second starts, 1 s after its first answer. (With 40, it could finish within that second on a
    # quick machine, and the second then rightly ran: a resume, not a race.)
    emu = start_emulator(latency_ms=300, requests_per_minute=1_200, burst_seconds=1)
    settings = ClientSettings(base_url=emu.base_url, requests_per_minute=1_200)
    requests = write_requests(tmp_path / "requests.jsonl", 100)
    first = asyncio.create_task(
        run_dataset(str(requests), out, settings, KEY, RunOptions(shard_size=10), storage=storage)
    )
    while not first.done() and emu.stats()["billed_requests"] == 0:  # the first run holds the output and sends
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    second_storage = Storage(dict(storage.options))  # another process's view of the store
    with pytest.raises(OutputDirectoryLocked, match="in use by another run"):
        await run_dataset(str(requests), out, settings, KEY, RunOptions(shard_size=10), storage=second_storage)
    summary = await first
    assert summary["succeeded"] == 100
    assert emu.stats()["billed_requests"] == 100 and emu.stats()["duplicate_billed_requests"] == 0
