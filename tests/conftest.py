from __future__ import annotations

import contextlib
import os
import tempfile

# Keep Prefect quiet and local for every test that touches it, and learned corrections out of ~/.cache. A home
# of the session's own: the commands the tests start make their ephemeral server's database there, never in the
# user's ~/.prefect (which another Prefect version may have migrated past what this one knows).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-anthropic-prefect-home-")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_ANTHROPIC_STATE_DIR"] = tempfile.mkdtemp(prefix="prefect-anthropic-state-")

import httpx
import pytest

from prefect_anthropic.emulator import EmulatorConfig, RunningEmulator, emulator_in_thread

HEADERS = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
MODEL = "claude-sonnet-4-6"


def message_body(text: str = "Hello there", max_tokens: int = 50, **extra) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
def start_emulator():
    """Start emulators with given options; each is stopped at the end of the test."""
    with contextlib.ExitStack() as stack:

        def start(**options) -> RunningEmulator:
            return stack.enter_context(emulator_in_thread(EmulatorConfig(port=0), **options))

        yield start


@pytest.fixture
def emulator(start_emulator) -> RunningEmulator:
    return start_emulator(seed=1)


@pytest.fixture
def http(emulator):
    with httpx.Client(base_url=emulator.base_url, headers=HEADERS, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session (Prefect's own harness, ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server for the session. Without one, the tests that need it are skipped, visibly; under
    CI=true a missing Redis fails them (.ci/run installs Debian's redis-server)."""
    import shutil

    from prefect_anthropic.testing import redis_server

    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server): shared-limiter tests need it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    with redis_server() as url:
        yield url


def write_requests(path, n: int, *, start: int = 0, text: str = "Question {i}: what is {i} times 8?", extra=()):
    """A request file in the original format, one line per request, metadata carrying the row id."""
    import json

    with open(path, "w") as handle:
        for i in range(start, start + n):
            body = message_body(text.format(i=i), metadata={"row_id": i})
            handle.write(json.dumps(body) + "\n")
        for line in extra:
            handle.write(line + "\n")
    return path


@contextlib.contextmanager
def environment_of(store):
    """What reaches an emulated object store (`EmulatedStore.environment`) in this process's environment, so in
    the processes it starts too, for the block."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in store.environment.items():
            patch.setenv(name, value)
        yield store


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's standalone server), reached over HTTP by s3fs as the real S3 would
    be: AWS_ENDPOINT_URL and fake credentials in the environment, for this process and the ones it starts."""
    from prefect_anthropic.testing import s3_server

    with s3_server() as store, environment_of(store):
        yield store.endpoint


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket: its URL, s3://NAME."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"
