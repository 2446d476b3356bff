"""Issue 26: a run without a Prefect server sends at once and imports no Prefect; the demo leaves its run in a
Prefect UI that is up; a server that cannot start is one line and exit 2, nothing sent."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from prefect_anthropic.emulator.server import free_port

ROOT = Path(__file__).resolve().parents[1]
HTML = {"Accept": "text/html"}  # what a browser asks for: Prefect serves the UI's page only then


def new_user_env(home: Path, **extra: str) -> dict[str, str]:
    """A new user's environment: an empty Prefect home, no Prefect API configured, a fake key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ANTHROPIC_"))}
    return {**env, "PREFECT_HOME": str(home), "ANTHROPIC_API_KEY": "sk-ant-fake-startup", **extra}


def write_requests(path: Path, n: int) -> Path:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 16}
    lines = (json.dumps({**body, "messages": [{"role": "user", "content": f"hi {i}"}]}) for i in range(n))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefect_anthropic.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_imports_stay_light(tmp_path):
    """--help and estimate load neither Prefect nor pandas nor pyarrow; the package's public names still work."""
    requests = write_requests(tmp_path / "requests.jsonl", 3)
    code = (
        "import sys\n"
        "import prefect_anthropic, prefect_anthropic.cli\n"
        f"assert prefect_anthropic.cli.main(['estimate', {str(requests)!r}]) == 0\n"
        "heavy = [m for m in ('prefect', 'pandas', 'pyarrow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert prefect_anthropic.RunOptions().shard_size > 0 and 'prefect' not in sys.modules\n"
        "from prefect_anthropic import AnthropicCredentials, generate_dataset\n"
        "assert generate_dataset.name == 'anthropic-requests-to-dataset' and AnthropicCredentials\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_run_without_a_prefect_server_runs_locally_and_says_so(emulator, tmp_path):
    """No PREFECT_API_URL: the run goes through pipeline.run_dataset (no Prefect imported, no server started in
    the fresh home), says so in one line, writes the dataset; the drop-in script takes the same path."""
    requests = write_requests(tmp_path / "requests.jsonl", 3)
    home = tmp_path / "home"
    env = new_user_env(home)
    out = tmp_path / "out"
    done = run_cli("run", str(requests), "--output-dir", str(out), "--base-url", emulator.base_url, env=env)
    assert done.returncode == 0, done.stderr
    assert "no Prefect server configured: running locally" in done.stderr
    assert (out / "results.jsonl").read_text().count("\n") == 3
    assert not (home / "prefect.db").exists()  # no ephemeral server ran on the home
    drop_in = subprocess.run(
        [sys.executable, str(ROOT / "api_request_parallel_processor.py"), "--requests_filepath", str(requests),
         "--save_filepath", str(tmp_path / "dropin.jsonl"), "--request_url", f"{emulator.base_url}/v1/messages"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert drop_in.returncode == 0, drop_in.stderr
    assert "no Prefect server configured: running locally" in drop_in.stderr
    assert (tmp_path / "dropin.jsonl").read_text().count("\n") == 3
    assert emulator.stats()["billed_requests"] == 6


def _flow_run_of(api: str, output_dir: Path) -> dict:
    body = {"sort": "START_TIME_DESC", "limit": 200, "flows": {"name": {"any_": ["anthropic-requests-to-dataset"]}}}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()
    (run,) = [run for run in runs if run["parameters"].get("output_dir") == str(output_dir)]
    return run


def test_with_a_prefect_server_the_first_requests_leave_while_prefect_loads(start_emulator, prefect_server, tmp_path):
    """PREFECT_API_URL set: the run opens and sends before Prefect has loaded, and the flow run, created after
    the first request arrived, adopts it: its shard tasks take over the shards under way, nothing is sent twice,
    and the run is in the UI (shard tasks, artifacts) as any flow run."""
    from prefect.settings import PREFECT_API_URL

    emulator = start_emulator(seed=1, latency_ms=300)
    api = PREFECT_API_URL.value()
    requests = write_requests(tmp_path / "requests.jsonl", 30)
    out = tmp_path / "out"
    env = new_user_env(tmp_path / "home", PREFECT_API_URL=api)
    done = run_cli(
        "run", str(requests), "--output-dir", str(out), "--base-url", emulator.base_url, "--shard-size", "10",
        "--no-progress", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "running locally" not in done.stderr
    assert emulator.stats()["billed_requests"] == 30
    assert (out / "results.jsonl").read_text().count("\n") == 30
    flow_run = _flow_run_of(api, out)
    assert flow_run["state_type"] == "COMPLETED"
    created = datetime.fromisoformat(flow_run["created"].replace("Z", "+00:00")).timestamp()
    assert emulator.stats()["first_arrival_at"] < created  # sent before the flow run existed
    of_run = {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
    tasks = httpx.post(f"{api}/task_runs/filter", json=of_run, timeout=30).json()
    assert sorted(task["name"] for task in tasks if task["name"].startswith("shard-")) == [
        "shard-00000 (lines 1-10)", "shard-00001 (lines 11-20)", "shard-00002 (lines 21-30)"
    ]  # fmt: skip
    assert all(task["state_type"] == "COMPLETED" for task in tasks)


@contextlib.contextmanager
def healthy_but_broken_prefect_server() -> Iterator[str]:
    """A Prefect API that answers its health check and refuses everything after (a server going away)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(200 if self.path.endswith("/health") else 404)

        def do_POST(self) -> None:
            self._answer(404)

        def _answer(self, status: int) -> None:
            body = b"true" if status == 200 else b'{"detail": "gone"}'
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def test_a_flow_run_that_cannot_be_created_after_sending_began_loses_and_repays_nothing(start_emulator, tmp_path):
    """The server answered its health check, the run began sending, then the flow run could not be created:
    exit 2 with one line, the requests in flight are saved, and the same command resumes with the rest."""
    emulator = start_emulator(seed=1, latency_ms=1500)
    requests = write_requests(tmp_path / "requests.jsonl", 40)
    out = tmp_path / "out"
    command = ("run", str(requests), "--output-dir", str(out), "--base-url", emulator.base_url, "--no-progress")
    with healthy_but_broken_prefect_server() as api:
        done = run_cli(*command, env=new_user_env(tmp_path / "home", PREFECT_API_URL=api))
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    first = emulator.stats()["billed_requests"]
    assert first > 0  # it had begun sending
    again = run_cli(*command, env=new_user_env(tmp_path / "home"))  # no server now: runs locally, resumes
    assert again.returncode == 0, again.stderr
    assert emulator.stats()["billed_requests"] == 40  # every request paid once
    assert (out / "results.jsonl").read_text().count("\n") == 40


def test_an_unreachable_prefect_server_is_one_line_and_exit_2(emulator, tmp_path):
    requests = write_requests(tmp_path / "requests.jsonl", 2)
    env = new_user_env(tmp_path / "home", PREFECT_API_URL=f"http://127.0.0.1:{free_port('127.0.0.1')}/api")
    out = str(tmp_path / "out")
    done = run_cli("run", str(requests), "--output-dir", out, "--base-url", emulator.base_url, env=env)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing was sent" in errors[0] and "Traceback" not in done.stderr
    assert emulator.stats()["requests_total"] == 0


def test_the_demo_leaves_its_run_in_a_prefect_ui(tmp_path):
    """`demo` starts a local Prefect server in the background (a fresh home, a free port), runs the example
    there, and prints the UI page of the run and how to stop the server: the page is served, the run is
    found through the API with its shard tasks, logs and artifacts. The server is stopped at the end."""
    home = tmp_path / "home"
    port = free_port("127.0.0.1")
    env = new_user_env(home, PREFECT_SERVER_API_PORT=str(port))
    requests = write_requests(tmp_path / "requests.jsonl", 4)
    try:
        done = run_cli("demo", "--requests", str(requests), "--output-dir", str(tmp_path / "out"), env=env, timeout=400)
        assert done.returncode == 0, done.stderr
        address = re.search(r"Prefect UI[^:]*: (http://\S+/runs/flow-run/([0-9a-f-]{36}))", done.stderr)
        assert address, done.stderr
        stop = re.search(r"stop it with: (.*prefect server stop)", done.stderr)
        assert stop and str(home) in stop.group(1)
        page = httpx.get(address.group(1), headers=HTML, follow_redirects=True, timeout=30)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        api, run_id = f"http://127.0.0.1:{port}/api", address.group(2)
        assert httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()["state_type"] == "COMPLETED"
        of_run = {"flow_runs": {"id": {"any_": [run_id]}}}
        tasks = httpx.post(f"{api}/task_runs/filter", json=of_run, timeout=30).json()
        assert any(task["name"].startswith("shard-") for task in tasks)
        artifacts = httpx.post(f"{api}/artifacts/filter", json=of_run, timeout=30).json()
        assert {artifact["type"] for artifact in artifacts} >= {"markdown", "progress", "table"}
        logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}, timeout=30)
        assert logs.json()
    finally:
        subprocess.run([sys.executable, "-m", "prefect", "server", "stop"], env=env, capture_output=True, timeout=120)
    for _ in range(120):  # SIGTERM sent: the server ends within seconds
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
        except httpx.TransportError:
            break
        time.sleep(0.25)
    else:
        pytest.fail("the demo's Prefect server is still up after `prefect server stop`")
