"""Secrets never in a URL or a parameter (issue 25, finding 6): a password or token given in `limiter_url` or
`base_url` (userinfo or a query parameter) is refused with a message saying where it goes instead, `redact_url`
hides it whatever it is given, and a canary secret passed through every channel a secret may take (API key,
Redis password, storage key and secret, credentials block) is found in no output file, no flow-run or task-run
parameter, log, artifact or event of the Prefect server, and no message."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import write_requests
from prefect_anthropic.cli import main
from prefect_anthropic.engine.shared_limiter import redact_url
from prefect_anthropic.settings import BASE_URL_ENV, LIMITER_PASSWORD_ENV, LIMITER_URL_ENV, ClientSettings

SECRET = "hunter2"

LIMITER_URLS_WITH_SECRETS = [
    "redis://default@h:6379/0?password=hunter2",  # the issue's: a user, and the password as a query parameter
    "redis://:hunter2@h:6379/0",
    "redis://default:hunter2@h:6379/0",
    "redis://hunter2@h:6379/0",  # a lone user part may be a token
    "redis://h:6379/0?password=hunter2",
    "rediss://h:6380/0?Password=hunter2&ssl_cert_reqs=none",
    "unix:///run/redis.sock?db=0&password=hunter2",
    "redis://h:6379/0?auth_token=hunter2",
]
BASE_URLS_WITH_SECRETS = [
    "https://user:hunter2@gateway.example",
    "https://hunter2@gateway.example/anthropic",
    "https://:hunter2@gateway.example",
    "https://gateway.example/anthropic?api_key=hunter2",
    "https://gateway.example/?token=hunter2",
    "https://gateway.example/?x-api-key=hunter2",
    "https://gateway.example/?accessToken=hunter2",
    "https://gateway.example/?sig=hunter2&sv=2024-01-01",
    "https://gateway.example/?X-Amz-Signature=hunter2",
    "https://gateway.example/?client_secret=hunter2",
]


@pytest.mark.parametrize("url", LIMITER_URLS_WITH_SECRETS)
def test_a_limiter_url_carrying_a_secret_is_refused_saying_where_it_goes(url):
    with pytest.raises(ValueError) as refused:
        ClientSettings(limiter_url=url)
    message = str(refused.value)
    assert SECRET not in message
    assert LIMITER_PASSWORD_ENV in message and "--limiter-block" in message


@pytest.mark.parametrize("url", BASE_URLS_WITH_SECRETS)
def test_a_base_url_carrying_a_secret_is_refused_saying_where_it_goes(url):
    with pytest.raises(ValueError) as refused:
        ClientSettings(base_url=url)
    message = str(refused.value)
    assert SECRET not in message
    assert "ANTHROPIC_API_KEY" in message and "AnthropicCredentials" in message


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("limiter_url", "redis://127.0.0.1:6379/0"),
        ("limiter_url", "rediss://redis.example:6380/2?socket_timeout=5"),
        ("limiter_url", "unix:///run/redis.sock?db=1"),
        ("base_url", "https://api.anthropic.com"),
        ("base_url", "http://127.0.0.1:8080/anthropic/v1beta?region=eu&keyspace=a"),  # keyspace is no key
    ],
)
def test_urls_without_secrets_are_accepted(field, url):
    assert getattr(ClientSettings(**{field: url}), field) == url


def test_a_refused_url_is_not_echoed_by_any_validation_error():
    """Pydantic puts the input in its messages: not this one's (a wrong scheme with a password, say)."""
    with pytest.raises(ValueError) as refused:
        ClientSettings(limiter_url="http://user:hunter2@h:6379/0")
    assert SECRET not in str(refused.value)


def test_urls_from_the_environment_get_the_same_check(monkeypatch):
    monkeypatch.setenv(LIMITER_URL_ENV, "redis://default@h:6379/0?password=hunter2")
    settings = ClientSettings()
    with pytest.raises(ValueError) as refused:
        settings.redis_url  # noqa: B018 - where the environment's URL is read
    assert SECRET not in str(refused.value) and LIMITER_URL_ENV in str(refused.value)
    assert LIMITER_PASSWORD_ENV in str(refused.value)
    monkeypatch.setenv(BASE_URL_ENV, "https://user:hunter2@gateway.example")
    with pytest.raises(ValueError) as refused:
        settings.api_base_url  # noqa: B018
    assert SECRET not in str(refused.value) and BASE_URL_ENV in str(refused.value)


def test_the_environment_password_still_reaches_redis(monkeypatch):
    monkeypatch.setenv(LIMITER_PASSWORD_ENV, "p@ss/word")
    assert ClientSettings(limiter_url="redis://h:6379/0").redis_url == "redis://:p%40ss%2Fword@h:6379/0"


@pytest.mark.parametrize("flag", ["--limiter-url", "--base-url"])
def test_the_command_line_refuses_them_before_anything_runs(flag, tmp_path, capsys):
    url = LIMITER_URLS_WITH_SECRETS[0] if flag == "--limiter-url" else BASE_URLS_WITH_SECRETS[0]
    requests = write_requests(tmp_path / "requests.jsonl", 1)
    assert main(["run", str(requests), "--output-dir", str(tmp_path / "out"), flag, url, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.err + captured.out
    assert "error:" in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://default@h:6379/0?password=hunter2", "redis://***@h:6379/0?password=***"),
        ("redis://:hunter2@h:6379/0", "redis://***@h:6379/0"),
        ("redis://default:hunter2@h:6379/0", "redis://***@h:6379/0"),
        ("rediss://h:6380/0?ssl_cert_reqs=none&Password=hunter2", "rediss://h:6380/0?ssl_cert_reqs=none&Password=***"),
        ("https://gateway.example/a?api_key=hunter2&region=eu", "https://gateway.example/a?api_key=***&region=eu"),
        ("https://gateway.example/?sig=hunter2&sv=2024", "https://gateway.example/?sig=***&sv=2024"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url_hides_userinfo_and_secret_query_parameters(url, redacted):
    assert redact_url(url) == redacted


# -- the canary ---------------------------------------------------------------------------------------------


@pytest.fixture
def redis_with_password():
    """A real redis-server that refuses clients without its password (`requirepass`)."""
    import shutil

    from prefect_anthropic.testing import redis_server

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    password = f"redis-{uuid.uuid4().hex}"
    with redis_server(password=password) as url:
        yield url, password


def _files_under(*roots: Path) -> list[Path]:
    return [path for root in roots if root.exists() for path in root.rglob("*") if path.is_file()]


async def _eventually(read, ready, timeout: float = 30.0):
    """Logs and events reach the server in the background: read until they are there."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await read()
        if ready(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.5)


def test_a_canary_secret_in_every_channel_appears_nowhere(
    prefect_server, start_emulator, bucket, redis_with_password, tmp_path, monkeypatch, capfd, caplog
):
    from prefect_anthropic.orchestration.blocks import AnthropicCredentials
    from prefect_anthropic.orchestration.flows import generate_dataset
    from prefect_anthropic.storage import STORAGE_OPTIONS_ENV, Storage

    canary = f"CANARY{uuid.uuid4().hex}"
    secrets = {
        "api key (--api-key)": f"sk-ant-{canary}-flag",
        "api key (credentials block)": f"sk-ant-{canary}-block",
        "storage key": f"AKIA{canary}",
        "storage secret": f"{canary}-storage-secret",
    }
    redis_url, redis_password = redis_with_password
    secrets["redis password"] = redis_password
    emu = start_emulator(latency_ms=2)
    # Temporary files (results staged before upload, journals) land where the scan looks.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv(LIMITER_PASSWORD_ENV, redis_password)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    # moto takes any key and secret: these reach it only through the storage options.
    storage_options = json.dumps({"key": secrets["storage key"], "secret": secrets["storage secret"]})
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, "{}")  # restored after the CLI sets it
    requests = write_requests(tmp_path / "requests.jsonl", 6, extra=["{broken"])
    Storage().write_bytes(f"{bucket}/in/requests.jsonl", requests.read_bytes())

    # 1. The command line: the key as --api-key, the storage options as a flag, Redis's password from env.
    first_out = f"{bucket}/first"
    argv = ["run", f"{bucket}/in/requests.jsonl", "--output-dir", first_out, "--base-url", emu.base_url]
    argv += ["--api-key", secrets["api key (--api-key)"], "--storage-options", storage_options, "--no-progress"]
    argv += ["--limiter-url", redis_url, "--shard-size", "4", "--max-cost-usd", "5"]
    assert main(argv) == 1  # the broken line

    # 2. The flow in Python: the key from a credentials block, the same storage options from the environment.
    block = f"canary-{uuid.uuid4().hex[:8]}"

    async def second_run() -> dict:
        await AnthropicCredentials(api_key=secrets["api key (credentials block)"], base_url=emu.base_url).asave(block)
        settings = ClientSettings(limiter_url=redis_url)
        return await generate_dataset(
            f"{bucket}/in/requests.jsonl", f"{bucket}/second", settings=settings, credentials_block=block, shard_size=4
        )

    monkeypatch.setenv(STORAGE_OPTIONS_ENV, storage_options)
    asyncio.run(second_run())
    assert emu.stats()["billed_requests"] == 12  # both runs sent, so every secret was used

    def leaks(text: str) -> list[str]:
        return [name for name, secret in secrets.items() if secret in text] + (["canary"] if canary in text else [])

    found: dict[str, list[str]] = {}

    def scan(where: str, text: str) -> None:
        if leaked := leaks(text):
            found[where] = leaked

    # Every output file, read back from the bucket, and every local file the runs wrote.
    import s3fs

    bucket_fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    outputs = [path for path in bucket_fs.find(bucket.removeprefix("s3://")) if "/in/" not in path]
    assert any(path.endswith("first/summary.json") for path in outputs), outputs
    assert any(path.endswith("second/results.parquet") for path in outputs), outputs
    for path in outputs:
        scan(f"s3://{path}", bucket_fs.cat_file(path).decode("latin-1"))
    for path in _files_under(tmp_path):
        scan(str(path), path.read_bytes().decode("latin-1"))
    captured = capfd.readouterr()
    scan("stderr", captured.err)
    scan("stdout", captured.out)
    scan("python logs", caplog.text)

    asyncio.run(_scan_the_server(scan))
    assert not found, f"secrets leaked: {found}"


async def _scan_the_server(scan) -> None:
    """Flow runs and task runs (parameters, states), logs, artifacts and events of the runs just made."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=2)
        ids = [run.id for run in runs]
        assert len(ids) == 2
        for run in runs:
            assert run.parameters["settings"]["limiter_url"]  # the runs that used the secrets
            scan(f"flow run {run.name}", run.model_dump_json())
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        assert tasks
        for task in tasks:
            scan(f"task run {task.name}", task.model_dump_json())
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))
        logs = await _eventually(
            lambda: client.read_logs(log_filter=log_filter),
            lambda found: sum("Done:" in log.message for log in found) == 2,
        )
        assert sum("Done:" in log.message for log in logs) == 2
        for log in logs:
            scan(f"log {log.name}", log.model_dump_json())
        for artifact in await client.read_artifacts():
            scan(f"artifact {artifact.key}", artifact.model_dump_json())

        resources = [f"prefect.flow-run.{run_id}" for run_id in ids]

        async def events() -> list[dict]:
            body = {"filter": {"any_resource": {"id": resources}}, "limit": 50}
            response = await client._client.post("/events/filter", json=body)
            page = response.json()
            found = list(page["events"])
            while page.get("next_page"):
                page = (await client._client.get(page["next_page"])).json()
                found += page["events"]
            return found

        every = await _eventually(
            events, lambda found: sum(e["event"] == "prefect-anthropic.run.finished" for e in found) == 2
        )
        assert sum(event["event"] == "prefect-anthropic.run.finished" for event in every) == 2
        for event in every:
            scan(f"event {event['event']}", json.dumps(event))


def test_storage_options_are_not_in_a_repr():
    from prefect_anthropic.storage import Storage

    storage = Storage({"key": "AKIA-hunter2", "secret": SECRET})
    assert SECRET not in repr(storage) and SECRET not in str(storage)


def test_a_credentials_blocks_base_url_gets_the_same_check():
    """The block's base_url fills in the settings' (and so the flow's parameters): refused there, unechoed."""
    with pytest.raises(ValueError) as refused:
        ClientSettings().filled_from(base_url="https://user:hunter2@gateway.example")
    assert SECRET not in str(refused.value) and "AnthropicCredentials" in str(refused.value)
