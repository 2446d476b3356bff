"""Shards past one machine: each shard a child flow run on a Prefect work pool, taken by any worker.

The parent flow plans the shards, registers the shard deployment it needs on the pool (once per pool,
upserted), runs one child flow run per shard and waits for them; workers started with
`prefect worker start --pool NAME` on any machine take them. The output directory must be shared by every
worker (NFS, a mounted bucket): the parent writes a marker file with a fresh id, and a worker that does not
see it refuses the shard with a message saying so. A shard whose flow run did not complete (its worker was
killed, its machine lost) is run again, on whichever worker takes it, and resumes from its results file:
no request that succeeded is sent again.

Only one copy of a shard sends at a time. Each attempt has an id, written to the shard's claim object before
it is launched; the attempt sends only while it can prove it holds the claim: each heartbeat it writes is
followed by a read of the claim, and a request leaves only within a margin (half the heartbeat timeout, on a
clock that counts a paused process's pause) of the last beat so confirmed. A copy that was superseded, or
whose beats fail, stops sending; the parent launches the next attempt only once the previous one wrote that
it stopped, or once the margin has passed since it was superseded.

Limits across machines come from the Redis-shared limiter (`limiter_url`); without it each worker process
keeps its own limits, and the parent warns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from prefect import flow
from prefect.logging import get_run_logger

from ..dataset.executor import RetryPolicy
from ..dataset.inputs import Shard
from ..dataset.pipeline import DatasetRun, open_budget, run_shard_requests
from ..dataset.shard_loop import run_shards
from ..dataset.shard_store import ShardStore
from ..engine import AnthropicClient
from ..engine.errors import OutputLost
from ..settings import ClientSettings, RunOptions
from ..storage import Storage, is_url, join, local_path
from .edge import resolve_run
from .handoff import HANDOFF
from .observability import forward_logs

T = TypeVar("T")

__all__ = [
    "OutputDirectoryNotShared",
    "ShardClaim",
    "mark_shared_location",
    "run_shard_flow",
    "run_shards_on_pool",
    "take_over",
    "wait_until_stopped",
    "write_claim",
]

SHARD_FLOW_NAME = "anthropic-dataset-shard"
SHARD_FLOW_ENTRYPOINT = "prefect_anthropic.orchestration.fanout:run_shard_flow"
SHARED_MARKER = ".prefect-anthropic-directory-id"


class OutputDirectoryNotShared(RuntimeError):
    """A worker does not see the output directory the parent wrote: it is not on shared storage."""


def mark_shared_location(storage: Storage, output: str) -> str:
    """Write a fresh id at the output location; every worker must read the same one."""
    location_id = uuid.uuid4().hex
    storage.write_text(join(output, SHARED_MARKER), location_id)
    return location_id


def check_shared_location(storage: Storage, output: str, location_id: str) -> None:
    marker = join(output, SHARED_MARKER)
    seen = storage.read_text(marker).strip() if storage.exists(marker) else None
    if seen != location_id:
        raise OutputDirectoryNotShared(
            f"worker {worker_name()} does not see the run's output location {output} (marker {SHARED_MARKER} "
            f"{'missing' if seen is None else 'from another run'}): with --work-pool, the output and the request "
            "file must be on storage every worker reaches: a bucket (s3://...), or a directory every worker "
            "mounts at the same path"
        )


def worker_name() -> str:
    """The Prefect worker running this flow run (process workers pass their name), else the host."""
    return os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname()


def _heartbeat_name(shard: Shard) -> str:
    return f"shard-{shard.index:05d}.heartbeat"


def _worker_name_file(shard: Shard) -> str:
    return f"shard-{shard.index:05d}.worker.json"


def _logger() -> Any:
    """The flow run's logger, or the module's outside a flow run."""
    try:
        return get_run_logger()
    except Exception:  # MissingContextError: not in a flow run
        return logging.getLogger(__name__)


def _claim_name(shard: Shard) -> str:
    return f"shard-{shard.index:05d}.claim.json"


HEARTBEAT_S = 2.0
_POLL_S_DEFAULT = 1.0


def _clock() -> float:
    """Seconds on a clock that keeps counting while the process is stopped or its machine suspended."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _parse_beat(text: str | None) -> tuple[str, str] | None:
    """(attempt id, count or "stopped") of a heartbeat `worker attempt count|stopped flow-run-id`."""
    parts = (text or "").split()
    return (parts[1], parts[2]) if len(parts) >= 3 else None


def write_claim(store: ShardStore, shard: Shard) -> str:
    """A new attempt id in the shard's claim: from now on an earlier copy still alive sends nothing more."""
    attempt_id = uuid.uuid4().hex
    store.write_text(_claim_name(shard), json.dumps({"attempt": attempt_id}))
    return attempt_id


def _claimed_attempt(store: ShardStore, shard: Shard) -> str | None:
    """The attempt the shard's claim names now, or None (no claim yet, or unreadable: the heartbeat then
    tells which copy may still send)."""
    try:
        text = store.read_text(_claim_name(shard))
        holder = json.loads(text).get("attempt") if text else None
    except (OSError, ValueError, AttributeError):
        return None
    return str(holder) if holder else None


async def take_over(store: ShardStore, shard: Shard, timeout_s: float, *, poll_s: float = _POLL_S_DEFAULT) -> str:
    """Supersede whatever attempt holds the shard and return a new attempt id once no earlier copy sends.

    The copy named by the claim (or by the heartbeat: a parent killed while it waited leaves a claim naming
    an attempt never launched while the copy before it still beats) may be alive, left by a killed parent
    or by one that lost its output: launching before it stopped would have two copies sending."""
    previous = await asyncio.to_thread(_claimed_attempt, store, shard)
    attempt_id = await asyncio.to_thread(write_claim, store, shard)
    try:
        beating = _parse_beat(await asyncio.to_thread(store.read_text, _heartbeat_name(shard)))
    except OSError:
        beating = None
    waited = {a for a in (previous, beating[0] if beating and beating[1] != "stopped" else None) if a and a != "-"}
    await wait_until_stopped(store, shard, waited, timeout_s, poll_s=poll_s)
    return attempt_id


class ShardClaim:
    """One attempt's hold on its shard: heartbeats that prove it still holds the claim, and the fence every
    request passes before it leaves (the client's `fence`).

    A beat writes the heartbeat, then reads the claim: it confirms the hold only when the claim still names
    this attempt, as of the time before the write (a parent that wrote a new claim and then saw no beat of
    this attempt knows this attempt can never confirm again)."""

    def __init__(
        self,
        store: ShardStore,
        shard: Shard,
        attempt: str,
        *,
        margin_s: float,
        clock: Callable[[], float] = _clock,
    ) -> None:
        self.store, self.shard, self.attempt, self.margin_s, self._clock = store, shard, attempt, margin_s, clock
        self.confirmed_at: float | None = None
        #: The attempt that took the shard over, once a beat has seen it.
        self.superseded_by: str | None = None
        self.failures = 0
        self._count = 0

    def _beat_text(self, state: str) -> str:
        return f"{worker_name()} {self.attempt} {state} {os.environ.get('PREFECT__FLOW_RUN_ID', '-')}"

    def beat(self) -> bool:
        """One heartbeat, and the claim read after it: whether the hold is confirmed (blocking I/O)."""
        if self.superseded_by is not None:
            return False
        started = self._clock()
        self._count += 1
        self.store.write_text(_heartbeat_name(self.shard), self._beat_text(str(self._count)))
        claim = self.store.read_text(_claim_name(self.shard))
        holder = json.loads(claim).get("attempt") if claim else None
        if holder != self.attempt:
            self.superseded_by = str(holder)
            return False
        self.confirmed_at = started
        return True

    async def keep(self, interval_s: float) -> None:
        """Beat every `interval_s` until superseded; a failed beat confirms nothing, and once the last
        confirmed beat is older than the margin the fence stops every request."""
        logger = _logger()
        while self.superseded_by is None:
            try:
                await asyncio.to_thread(self.beat)
                self.failures = 0
            except Exception as error:  # a beat that fails confirms nothing: the fence acts
                self.failures += 1
                logger.warning("Shard %d: heartbeat %d failed (%s)", self.shard.index, self.failures, error)
            if self.superseded_by is not None:
                logger.warning(
                    "Shard %d: attempt %s took the shard over; this copy sends nothing more.",
                    self.shard.index, self.superseded_by,
                )  # fmt: skip
                return
            await asyncio.sleep(interval_s)

    async def confirmed(self, poll_s: float = 0.05) -> None:
        """Wait for the first beat's verdict: return once the hold is confirmed; OutputLost when superseded, or
        when no beat confirms it within the margin."""
        started = self._clock()
        while self.confirmed_at is None and self.superseded_by is None and self._clock() - started <= self.margin_s:
            await asyncio.sleep(poll_s)
        await self.fence()

    async def fence(self) -> None:
        """Raise OutputLost unless this attempt proved its hold within the margin."""
        if self.superseded_by is not None:
            raise OutputLost(
                0,
                "output_lost",
                f"shard {self.shard.index} was taken over by attempt {self.superseded_by} (this copy was taken for "
                "lost): it sends nothing more",
            )
        age = None if self.confirmed_at is None else self._clock() - self.confirmed_at
        if age is None or age > self.margin_s:
            raise OutputLost(
                0,
                "output_lost",
                f"shard {self.shard.index}: its hold was not confirmed for "
                f"{'ever' if age is None else f'{age:.0f} s'} (heartbeats failing, or this process was paused), "
                "so another copy may have taken it over: it sends nothing more",
            )

    def stopped(self) -> None:
        """Tell the parent this attempt sends nothing more (its requests in flight have ended)."""
        self.store.write_text(_heartbeat_name(self.shard), self._beat_text("stopped"))


async def _beat(store: ShardStore, shard: Shard) -> None:
    """A count that changes every HEARTBEAT_S while the shard runs, beside its results (a count, not a time:
    the parent compares it on its own clock, so machines' clocks need not agree). For a flow run started
    without an attempt id (by an older parent): no claim, no fence."""
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID", "")
    count = 0
    while True:
        count += 1
        with contextlib.suppress(Exception):  # one missed beat is not a lost worker
            await asyncio.to_thread(
                store.write_text, _heartbeat_name(shard), f"{worker_name()} - {count} {flow_run_id}"
            )
        await asyncio.sleep(HEARTBEAT_S)


@flow(name=SHARD_FLOW_NAME, flow_run_name="shard-{shard.index:05d}", validate_parameters=True)
async def run_shard_flow(
    requests_path: str,
    shard: Shard,
    output: str,
    options: RunOptions,
    settings: ClientSettings,
    client_block: str | None = None,
    credentials_block: str | None = None,
    location_id: str = "",
    budget_id: str | None = None,
    attempt_id: str = "",
) -> dict[str, Any]:
    """One shard on a worker, with a client of its own: the same steps as in one process, resuming from the
    shard's results (parts in the bucket, or a file on a shared disk), in any working directory."""
    with forward_logs():
        setup = await resolve_run(settings, options, client_block=client_block, credentials_block=credentials_block)
        settings, api_key, storage = setup.settings, setup.api_key, setup.storage
        check_shared_location(storage, output, location_id)
        if not storage.exists(requests_path):
            raise OutputDirectoryNotShared(f"worker {worker_name()} does not see the request file {requests_path}")
        store = ShardStore.for_run(output, options, storage)
        budget = open_budget(store, setup, on_worker=True, shared_budget_id=budget_id)
        claim = None
        if attempt_id:
            margin_s = claim_margin(options.shard_heartbeat_timeout_s)
            claim = ShardClaim(store, shard, attempt_id, margin_s=margin_s)
            heart = asyncio.create_task(claim.keep(min(HEARTBEAT_S, margin_s / 3)))
        else:
            heart = asyncio.create_task(_beat(store, shard))
        try:
            if claim is not None:
                await claim.confirmed()  # the hold proven (or lost) before anything is sent
            fence = claim.fence if claim is not None else None
            client = AnthropicClient(api_key, settings, budget=budget, fence=fence, limiter_url=setup.limiter_url)
            async with client:
                await client.check_limiter()
                summary = await run_shard_requests(client, requests_path, shard, store, stop=HANDOFF.stop)
        finally:
            heart.cancel()
            if claim is not None:
                with contextlib.suppress(Exception):  # the parent then waits for the heartbeat to go still
                    await asyncio.to_thread(claim.stopped)
        store.write_text(_worker_name_file(shard), json.dumps({"worker": worker_name(), "shard": shard.index}))
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
    run: DatasetRun, client_block: str | None, credentials_block: str | None, *, budget_id: str | None = None
) -> dict[str, int]:
    """Run every shard not finished yet as a child flow run on the pool (the shard loop, with `PoolExecutor`);
    the shards each worker ran."""
    from prefect.client.orchestration import get_client

    options = run.setup.options
    work_pool = options.work_pool
    assert work_pool is not None and run.plan is not None
    if run.setup.limiter_url is None:
        get_run_logger().warning(
            "--work-pool without --limiter-url: each worker process keeps its own rate limits, so together "
            "they may send more than the account allows. Give them a shared Redis with --limiter-url."
        )
    output = run.output_dir if is_url(run.output_dir) else str(local_path(run.output_dir).resolve())
    requests_path = run.requests_path if is_url(run.requests_path) else str(local_path(run.requests_path).resolve())
    parameters = {
        "requests_path": requests_path,
        "output": output,
        "options": options,
        "settings": run.setup.settings,
        "client_block": client_block,
        "credentials_block": credentials_block,
        "location_id": mark_shared_location(run.store.storage, output),
        "budget_id": budget_id,
    }
    deployment = await ensure_shard_deployment(work_pool)
    async with get_client() as client:
        pool = PoolExecutor(run, deployment, parameters, client)
        await run_shards(run, pool)
    return dict(pool.ran)


class PoolExecutor:
    """The shard loop's executor on a work pool: a shard's step runs as child flow runs of the shard
    deployment, which any worker takes and runs from its parameters (so `call`, the way this process would
    run it, is not used); one attempt after another, up to the retry policy's count, each launched once the
    one before is known to send nothing more (`take_over`)."""

    def __init__(self, run: DatasetRun, deployment: str, parameters: dict[str, Any], client: Any) -> None:
        self.run = run
        self.deployment = deployment
        self.parameters = parameters
        self.client = client
        #: Shards completed, by the worker that ran them.
        self.ran: Counter[str] = Counter()

    async def __call__(self, step: str, shard: Shard, call: Callable[[], Awaitable[T]], retry: RetryPolicy) -> T:
        from prefect.deployments.flow_runs import arun_deployment

        if step != "run-shard":
            raise ValueError(f"a work pool runs shards in real time only, not {step}")
        logger = get_run_logger()
        store, timeout_s = self.run.store, self.run.setup.options.shard_heartbeat_timeout_s
        # A copy an earlier parent left may still send: it stops before this parent's first launch.
        done = await asyncio.to_thread(store.done_summary, shard)
        attempt_id = "" if done is not None else await take_over(store, shard, timeout_s)
        for attempt in range(retry.retries + 1):
            if store.done_summary(shard) is not None:
                break
            flow_run = await arun_deployment(
                self.deployment,
                parameters={**self.parameters, "shard": shard, "attempt_id": attempt_id},
                timeout=0,
                as_subflow=True,
            )
            state = await _wait_for(self.client, flow_run.id, store, _heartbeat_name(shard), timeout_s)
            if state is not None and state.is_completed():
                worker = store.read_text(_worker_name_file(shard))
                if worker is not None:
                    self.ran[json.loads(worker)["worker"]] += 1
                break
            message = (state.message if state is not None else None) or ""
            logger.warning(
                "Shard %d on the pool ended %s (%s)%s",
                shard.index,
                state.name if state is not None else "without a state",
                message,
                "; running it again, it resumes" if attempt < retry.retries else "",
            )
            if "does not see" in message:
                raise OutputDirectoryNotShared(message)
            # Superseded first; the next copy starts once this one is known stopped or its margin is out
            # (even a still heartbeat may hide a beat landing now: a paused copy resuming).
            attempt_id = await take_over(store, shard, timeout_s)
        else:
            raise RuntimeError(
                f"shard {shard.index} did not complete on work pool {self.run.setup.options.work_pool!r}"
            )
        if self.run.progress is not None:
            self.run.progress.mark_done(shard.index, shard.line_count)
        return cast(T, store.done_summary(shard))


_POLL_S = _POLL_S_DEFAULT


async def wait_until_stopped(
    store: ShardStore, shard: Shard, attempt: str | set[str], timeout_s: float, *, poll_s: float = _POLL_S
) -> None:
    """Return once `attempt` (or each of a set) of the shard sends nothing more. Call it right after
    superseding the attempt in the claim: from then on none of its beats confirms a hold, so its fence stops it
    at the latest a margin (see claim_margin) after the call. Sooner when it wrote that it stopped, or when the
    heartbeat is not its own (it never beat: any beat it makes now fails to confirm)."""
    attempts = {attempt} if isinstance(attempt, str) else set(attempt)
    if not attempts:
        return
    deadline = _clock() + claim_margin(timeout_s)
    while _clock() <= deadline:
        try:
            parsed = _parse_beat(await asyncio.to_thread(store.read_text, _heartbeat_name(shard)))
        except OSError:  # rewritten while read (s3fs FileExpired), or the store failing: the deadline holds
            parsed = (next(iter(attempts)), "?")
        if parsed is None or parsed[0] not in attempts or parsed[1] == "stopped":
            return
        await asyncio.sleep(poll_s)


def claim_margin(heartbeat_timeout_s: float) -> float:
    """How long after its last confirmed beat a copy may still send: well within the heartbeat timeout after
    which the parent takes a still heartbeat for a lost copy."""
    return heartbeat_timeout_s / 2


async def _wait_for(client: Any, flow_run_id: Any, store: ShardStore, heartbeat: str, timeout_s: float) -> Any:
    """The flow run's final state. A running shard whose heartbeat stops for `timeout_s` (its worker or
    machine is gone: nothing will ever report its end) is marked Crashed, so that it can run again (if it is
    alive after all, its fence stops it: see ShardClaim)."""
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
        try:
            beat = await asyncio.to_thread(store.read_text, heartbeat)
        except OSError:  # rewritten while read (s3fs FileExpired), or the store failing: proves nothing
            continue
        now = asyncio.get_running_loop().time()
        if beat != last_beat or last_change is None:
            last_beat, last_change = beat, now
        elif now - last_change > timeout_s:
            crashed: Any = Crashed(
                message=f"no heartbeat from the shard's flow run for {timeout_s:.0f} s: its worker was lost"
            )
            await client.set_flow_run_state(flow_run_id, crashed, force=True)
            return crashed
