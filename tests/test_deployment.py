"""The shipped deployment: deployed to a real local Prefect server, run by a process worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from conftest import write_requests
from prefect_anthropic.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prefect(*args: str, env: dict, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_bucket_deployment_runs_on_a_worker_that_shares_no_disk(emulator, bucket, tmp_path):
    """Deployed as shipped; run by a process worker started in an empty directory of its own, reading and
    writing only the bucket (moto's S3 on loopback): what a container of a Docker/Kubernetes/ECS pool sees."""
    from prefect_anthropic.storage import Storage

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_ANTHROPIC_WORKDIR": str(tmp_path),
        "ANTHROPIC_API_KEY": "",
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the Prefect server did not start"
            time.sleep(0.5)

        prefect("work-pool", "create", "anthropic-pool", "--type", "process", env=env)
        prefect("block", "register", "-m", "prefect_anthropic", env=env)
        save_blocks = (
            "from prefect_anthropic import AnthropicClientConfig, AnthropicCredentials\n"
            f"c = AnthropicCredentials(api_key='sk-ant-deploy-secret', base_url='{emulator.base_url}')\n"
            "AnthropicClientConfig(credentials=c, requests_per_minute=6000).save('anthropic-production')\n"
        )
        subprocess.run([sys.executable, "-c", save_blocks], env=env, check=True, timeout=60)
        prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all", env=env)

        storage = Storage.from_environment()
        requests, out = f"{bucket}/requests/nightly.jsonl", f"{bucket}/datasets/nightly"
        storage.write_bytes(requests, write_requests(tmp_path / "requests.jsonl", 15).read_bytes())
        prefect("deployment", "run", "anthropic-requests-to-dataset/nightly-dataset-bucket",
                "--param", f"requests_path={requests}", "--param", f"output_dir={out}", env=env)  # fmt: skip
        container = tmp_path / "container"  # the worker's disk: empty, its own, thrown away
        container.mkdir()
        prefect("worker", "start", "--pool", "anthropic-pool", "--run-once", env=env, timeout=240, cwd=container)

        frame = pd.read_parquet(f"{out}/results.parquet")
        assert len(frame) == 15 and (frame["status"] == "succeeded").all()
        summary = json.loads(storage.read_text(f"{out}/summary.json"))
        assert summary["limits"]["sonnet-4"]["requests_per_minute"] == 6000
        runs = httpx.post(f"http://127.0.0.1:{port}/api/flow_runs/filter", json={}, timeout=10).json()
        assert runs and all("sk-ant-deploy-secret" not in json.dumps(run["parameters"]) for run in runs)
        for name in ("nightly-dataset-bucket", "nightly-dataset"):
            deployment = httpx.get(
                f"http://127.0.0.1:{port}/api/deployments/name/anthropic-requests-to-dataset/{name}", timeout=10
            ).json()
            assert [s["schedule"]["cron"] for s in deployment["schedules"] if s["active"]] == ["0 2 * * *"]
            assert deployment["work_pool_name"] == "anthropic-pool"
            # Overlapping runs of the deployment cannot start: one at a time, a new one is cancelled.
            assert deployment["concurrency_limit"] == 1 or deployment["global_concurrency_limit"]["limit"] == 1
            assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    finally:
        server.terminate()
        server.wait(timeout=30)
