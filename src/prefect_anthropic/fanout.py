"""Shards past one machine: each shard a child flow run on a Prefect work pool, taken by any worker.

The parent flow plans the shards, registers the shard deployment it needs on the pool (once per pool,
upserted), runs one child flow run per shard and waits for them; workers started with
`prefect worker start --pool NAME` on any machine take them. The output directory must be shared by every
worker (NFS, a mounted bucket): the parent writes a marker file with a fresh id, and a worker that does not
see it refuses the shard with a message saying so. A shard whose flow run did not complete (its worker was
killed, its machine lost) is run again, on whichever worker takes it, and resumes from its results file:
no request that succeeded is sent again.

Limits across machines come from the Redis-shared limiter (`limiter_url`); without it each worker process
keeps its own limits, and the parent warns.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from .blocks import resolve_settings
from .engine import AnthropicClient
from .engine.budget import Budget, SpendingJournal
from .engine.shared_budget import SharedBudget
from .inputs import Shard
from .pipeline import SHUTDOWN, SPENDING_DIR, DatasetRun, run_shard_requests, shard_marker_path
from .settings import ClientSettings

__all__ = ["OutputDirectoryNotShared", "mark_shared_directory", "run_shard_flow", "run_shards_on_pool"]

SHARD_FLOW_NAME = "anthropic-dataset-shard"
SHARD_FLOW_ENTRYPOINT = "prefect_anthropic.fanout:run_shard_flow"
SHARED_MARKER = ".prefect-anthropic-directory-id"


class OutputDirectoryNotShared(RuntimeError):
    """A worker does not see the output directory the parent wrote: it is not on shared storage."""


def mark_shared_directory(output_dir: str | os.PathLike[str]) -> str:
    """Write a fresh id into the output directory; every worker must read the same one."""
    directory_id = uuid.uuid4().hex
    (Path(output_dir) / SHARED_MARKER).write_text(directory_id)
    return directory_id


def check_shared_directory(output_dir: str | os.PathLike[str], directory_id: str) -> None:
    marker = Path(output_dir) / SHARED_MARKER
    seen = marker.read_text().strip() if marker.exists() else None
    if seen != directory_id:
        raise OutputDirectoryNotShared(
            f"worker {worker_name()} does not see the run's output directory {output_dir} (marker "
            f"{SHARED_MARKER} {'missing' if seen is None else 'from another run'}): with --work-pool, the "
            "output directory and the request file must be on storage every worker mounts at the same path"
        )


def worker_name() -> str:
    """The Prefect worker running this flow run (process workers pass their name), else the host."""
    return os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname()


def _heartbeat_file(work_dir: str, shard: Shard) -> Path:
    return Path(work_dir) / f"shard-{shard.index:05d}.heartbeat"


HEARTBEAT_S = 2.0


async def _beat(path: Path) -> None:
    """A count that changes every HEARTBEAT_S while the shard runs (a count, not a time: the parent compares
    it on its own clock, so machines' clocks need not agree)."""
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID", "")
    count = 0
    while True:
        count += 1
        path.write_text(f"{worker_name()} {flow_run_id} {count}")
        await asyncio.sleep(HEARTBEAT_S)


def _worker_file(work_dir: str, shard: Shard) -> Path:
    return Path(work_dir) / f"shard-{shard.index:05d}.worker.json"


@flow(name=SHARD_FLOW_NAME, flow_run_name="shard-{shard.index:05d}", validate_parameters=True)
async def run_shard_flow(
    requests_path: str,
    shard: Shard,
    work_dir: str,
    settings: ClientSettings,
    client_block: str | None = None,
    credentials_block: str | None = None,
    directory_id: str = "",
    budget_id: str | None = None,
) -> dict[str, Any]:
    """One shard on a worker, with a client of its own: the same steps as in one process, resuming from the
    shard's results file."""
    output_dir = Path(work_dir).parent
    check_shared_directory(output_dir, directory_id)
    if not Path(requests_path).exists():
        raise OutputDirectoryNotShared(f"worker {worker_name()} does not see the request file {requests_path}")
    settings, api_key = await resolve_settings(settings, client_block, credentials_block)
    journal = SpendingJournal(output_dir / SPENDING_DIR)
    budget = (
        SharedBudget.connect(settings, api_key, budget_id, settings.max_cost_usd, journal=journal)
        if budget_id is not None and settings.max_cost_usd is not None
        else Budget(None, journal=journal)
    )
    heart = asyncio.create_task(_beat(_heartbeat_file(work_dir, shard)))
    try:
        async with AnthropicClient(api_key, settings, budget=budget) as client:
            await client.check_limiter()
            summary = await run_shard_requests(client, requests_path, shard, work_dir, stop=SHUTDOWN)
    finally:
        heart.cancel()
    _worker_file(work_dir, shard).write_text(json.dumps({"worker": worker_name(), "shard": shard.index}))
    return summary


async def ensure_shard_deployment(work_pool: str) -> str:
    """Register (or update) the shard deployment on `work_pool`; its full name for run_deployment."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.callables import parameter_schema

    name = f"pool-{work_pool}"
    async with get_client() as client:
        await client.read_work_pool(work_pool)  # a clear ObjectNotFound when the pool does not exist
        flow_id = await client.create_flow_from_name(SHARD_FLOW_NAME)
        await client.create_deployment(
            flow_id=flow_id,
            name=name,
            work_pool_name=work_pool,
            entrypoint=SHARD_FLOW_ENTRYPOINT,  # the package is installed on every worker: no code to pull
            parameter_openapi_schema=parameter_schema(run_shard_flow).model_dump(),
            enforce_parameter_schema=False,
        )
    return f"{SHARD_FLOW_NAME}/{name}"


async def run_shards_on_pool(
    run: DatasetRun,
    client_block: str | None,
    credentials_block: str | None,
    *,
    budget_id: str | None = None,
    on_shard_done: Any = None,
) -> dict[str, int]:
    """Run every shard not finished yet as a child flow run on the pool; the shards each worker ran."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.flow_runs import arun_deployment

    logger = get_run_logger()
    options = run.options
    work_pool = options.work_pool
    assert work_pool is not None and run.plan is not None
    if not run.settings.shares_limits:
        logger.warning(
            "--work-pool without --limiter-url: each worker process keeps its own rate limits, so together "
            "they may send more than the account allows. Give them a shared Redis with --limiter-url."
        )
    directory_id = mark_shared_directory(run.output_dir)
    deployment = await ensure_shard_deployment(work_pool)
    work_dir = str(Path(run.work_dir).resolve())
    gate = asyncio.Semaphore(options.max_parallel_shards)
    ran: Counter[str] = Counter()
    shard_retries = options.shard_retries
    parameters = {
        "requests_path": str(Path(run.requests_path).resolve()),
        "work_dir": work_dir,
        "settings": run.settings,
        "client_block": client_block,
        "credentials_block": credentials_block,
        "directory_id": directory_id,
        "budget_id": budget_id,
    }
    heartbeat_timeout_s = options.shard_heartbeat_timeout_s

    async def one(shard: Shard, client: Any) -> None:
        async with gate:
            for attempt in range(shard_retries + 1):
                if shard_marker_path(work_dir, shard).exists():
                    break
                flow_run = await arun_deployment(
                    deployment, parameters={**parameters, "shard": shard}, timeout=0, as_subflow=True
                )
                state = await _wait_for(client, flow_run.id, _heartbeat_file(work_dir, shard), heartbeat_timeout_s)
                if state is not None and state.is_completed():
                    worker_file = _worker_file(work_dir, shard)
                    if worker_file.exists():
                        ran[json.loads(worker_file.read_text())["worker"]] += 1
                    break
                message = (state.message if state is not None else None) or ""
                logger.warning(
                    "Shard %d on the pool ended %s (%s)%s",
                    shard.index,
                    state.name if state is not None else "without a state",
                    message,
                    "; running it again, it resumes" if attempt < shard_retries else "",
                )
                if "does not see" in message:
                    raise OutputDirectoryNotShared(message)
            else:
                raise RuntimeError(f"shard {shard.index} did not complete on work pool {work_pool!r}")
        if on_shard_done is not None:
            on_shard_done(shard)

    async with get_client() as client:
        await asyncio.gather(*(one(shard, client) for shard in run.plan.shards))
    return dict(ran)


_POLL_S = 1.0


async def _wait_for(client: Any, flow_run_id: Any, heartbeat: Path, timeout_s: float) -> Any:
    """The flow run's final state. A running shard whose heartbeat stops for `timeout_s` (its worker or
    machine is gone: nothing will ever report its end) is marked Crashed, so that it can run again."""
    from prefect.states import Crashed

    last_beat: str | None = None
    last_change: float | None = None
    while True:
        await asyncio.sleep(_POLL_S)
        flow_run = await client.read_flow_run(flow_run_id)
        state = flow_run.state
        if state is None or state.is_final():
            return state
        if not state.is_running():
            last_change = None  # waiting for a worker is not a lost worker
            continue
        beat = heartbeat.read_text() if heartbeat.exists() else None
        now = asyncio.get_running_loop().time()
        if beat != last_beat or last_change is None:
            last_beat, last_change = beat, now
        elif now - last_change > timeout_s:
            crashed: Any = Crashed(
                message=f"no heartbeat from the shard's flow run for {timeout_s:.0f} s: its worker was lost"
            )
            await client.set_flow_run_state(flow_run_id, crashed, force=True)
            return crashed
