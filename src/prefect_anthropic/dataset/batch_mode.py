"""Batch mode: a shard through Anthropic's Message Batches API (half price), in plain asyncio.

Per shard, three steps, each run by the run's executor (so as Prefect tasks in a flow): `submit_batches`
(records every batch id the moment it exists, so a restarted run polls the same batches instead of paying
for them again), `wait_for_batches` (polls with backoff, reports request_counts as progress),
`download_batch_results` (writes each result into the shard's results file, in the same schema as real-time
mode). `run_shard_in_batches` runs the rounds: failed rows can get a follow-up batch or go through the
real-time engine. The state they keep is `batch_state`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

from ..api.schema import with_output_format
from ..engine import RunStopped
from ..engine.batches import BatchAPI, batch_custom_id, batch_result_record, line_of_custom_id, plan_batches
from ..engine.budget import unbudgeted_reason, worst_case_cost
from ..engine.records import RequestItem, ResultRecord, validate_record
from ..engine.runner import done_before
from ..storage import join
from .batch_state import (
    RECORD_INFIX,
    STATE_SUFFIX,
    BatchRound,
    BatchState,
    CreatedBatch,
    Creating,
    batch_record_name,
    batch_state_name,
    read_batch_state,
)
from .executor import BATCH_STEP_RETRY, Executor, NotRetryable
from .inputs import Shard, iter_requests
from .outputs import final_records
from .pipeline import DatasetRun
from .setup import RunSetup
from .shard_store import ShardStore

__all__ = [
    "BATCH_RETRY_CHOICES",
    "BatchesOfAnotherLayout",
    "cancel_batches",
    "run_shard_in_batches",
]

logger = logging.getLogger(__name__)

BATCH_RETRY_CHOICES = ("none", "batch", "realtime")
#: Batch results worth another try: the request never ran, or failed on the server's side.
RETRYABLE_BATCH_ERRORS = frozenset(
    {"batch_expired", "api_error", "overloaded_error", "timeout_error", "validation_error"}
)


class BatchesOfAnotherLayout(NotRetryable, ValueError):
    """Batches created under another shard size for a shard's lines are not downloaded yet: submitting the
    lines again would pay for them twice."""


def _read_state(store: ShardStore, shard: Shard) -> BatchState:
    return read_batch_state(store.storage, join(store.location, batch_state_name(shard)))


def _write_state(store: ShardStore, shard: Shard, state: BatchState) -> None:
    store.write_json(batch_state_name(shard), state.to_json())


async def _record_created_batch(store: ShardStore, shard: Shard, record: dict[str, Any]) -> None:
    """Record a batch the moment it exists, in a new object of its own: it overwrites nothing, so it is
    written even by a run that lost its output (whose fenced state writes raise), and a rerun polls the batch
    instead of paying for it again. Retried a little: the state file is the fallback, then the search by time
    and size (_unrecorded_batch)."""
    data = json.dumps(record).encode("utf-8")
    location = join(store.location, batch_record_name(shard, record["id"]))
    for attempt in range(3):
        try:
            await asyncio.to_thread(store.storage.write_bytes, location, data, immutable=True)
            return
        except Exception as error:  # a storage fault: the state write comes next, and may still record it
            if attempt == 2:
                logger.warning("Could not record batch %s: %s", record["id"], error)
                return
            await asyncio.sleep(0.2 * 2**attempt)


def _batch_api(run: DatasetRun) -> BatchAPI:
    return BatchAPI.for_settings(run.setup.api_key, run.setup.settings)


def _pending_items(run: DatasetRun, shard: Shard, retry_lines: set[int] | None):
    done = run.store.answered_requests(shard, run.requests_path)  # under any layout (another --shard-size)
    for item in iter_requests(run.requests_path, shard.start, shard.end, shard.first_line, run.store.storage):
        if done_before(done, item):
            continue
        if retry_lines is not None and item.line not in retry_lines:
            continue
        yield item


async def submit_batches(run: DatasetRun, shard: Shard, retry_lines: list[int] | None = None) -> list[str]:
    """Submit the shard's unsent requests; return the ids of this round's batches (never submitted twice)."""
    client, store = run.client, run.store
    state = _read_state(store, shard)
    last = state.open_round
    if last is not None and retry_lines is None and last.creating is not None:
        # Stopped while creating a batch: it may exist at Anthropic without its id here.
        async with _batch_api(run) as api:
            found = await _unrecorded_batch(run, api, last.creating)
        last.creating = None
        if found is not None:
            last.batches.append(found)
            logger.info("Shard %d: %s was created before the stop; polling it, not paying again.", shard.index,
                        found.id)  # fmt: skip
        elif not last.batches:
            state.rounds.pop()  # it never reached Anthropic: submit the round again
        _write_state(store, shard, state)
    last = state.open_round
    if last is not None and retry_lines is None:
        ids = [batch.id for batch in last.batches]
        logger.info("Shard %d: batches %s were submitted before; polling them, not submitting again.", shard.index, ids)
        return ids
    foreign = store.unfinished_batches_of_other_layouts(shard)
    if foreign:
        raise BatchesOfAnotherLayout(
            f"shard {shard.index} ({shard.lines}): batches created by a run with another --shard-size are not "
            f"collected yet ({', '.join(f'{batch} in {layout}' for layout, batch in foreign[:5])}): they are paid "
            f"for. Run again with --shard-size {foreign[0][0].removeprefix('.shards-')} to collect them; then any "
            "size finds their answers. Nothing was submitted for this shard"
        )
    cutover = run.cutover
    if cutover is not None and (state.rounds or cutover.due()):
        # Auto mode submits a shard's requests once, and never past the cut-over: what the batches did not
        # answer goes in real time (also when a rerun finds the round downloaded).
        return []
    round_ = BatchRound()
    state.rounds.append(round_)
    budget = client.budget
    async with _batch_api(run) as api:
        pending = list(_pending_items(run, shard, set(retry_lines) if retry_lines else None))
        with store.writer(shard) as writer:
            valid = []
            for item in pending:
                if item.invalid is None and client.output_schema is not None:
                    item = dataclasses.replace(item, body=with_output_format(item.body, client.output_schema))
                checked = ResultRecord.for_invalid_line(item) if item.invalid is not None else client.preflight(item)
                if isinstance(checked, RequestItem) and budget is not None:
                    # Each request's worst case at the batch price, held until its result is downloaded.
                    info = client.models.lookup(checked.model) or checked.model
                    worst = worst_case_cost(info, checked.body, batch=True, models=client.models)
                    budget.release_batch_hold(checked.line)
                    if worst is None and budget.limit_usd is not None:
                        # This request has no bound (the others may): its row says why, the budget goes on.
                        why = f"a budget cannot be kept for it: {unbudgeted_reason(info, checked.body, client.models)}"
                        checked = budget.exhausted_record(checked, why)
                    elif not budget.hold_for_batch(checked.line, worst or 0.0):
                        checked = budget.exhausted_record(checked)
                if isinstance(checked, ResultRecord):
                    writer.write(checked)
                else:
                    valid.append(checked)
        for requests in plan_batches(valid):
            if budget is not None:
                for request in requests:
                    budget.batch_sent(line_of_custom_id(request["custom_id"]))  # may be billed from here on
                await budget.acommit()  # in the journal a rerun reads (on a bucket: written) before the create
            # One create at a time in a run, announced before it is sent: after a crash, the one batch that may
            # exist without its id here is found by its time and size (see _unrecorded_batch).
            async with run.batch_create_lock:
                since, token = datetime.now(timezone.utc).isoformat(), uuid.uuid4().hex
                round_.creating = Creating(requests=len(requests), since=since, token=token)
                _write_state(store, shard, state)
                batch = await api.create(requests)
                await _record_created_batch(
                    store,
                    shard,
                    {"id": batch["id"], "requests": len(requests), "round": len(state.rounds) - 1,
                     "token": token, "created": since},
                )  # fmt: skip
                round_.creating = None
                round_.batches.append(CreatedBatch(batch["id"], len(requests)))
                _write_state(store, shard, state)  # recorded at once: a restart polls it instead of paying again
            logger.info("Shard %d: submitted %s with %d requests.", shard.index, batch["id"], len(requests))
    if not round_.batches:
        round_.complete = True
    _write_state(store, shard, state)
    return [batch.id for batch in round_.batches]


async def _unrecorded_batch(run: DatasetRun, api: BatchAPI, creating: Creating) -> CreatedBatch | None:
    """The batch a stopped run created without recording its id: created since it announced the create, of
    its size, and not recorded by any shard of this output. None when there is none (or, with batches of
    other runs of the key looking alike, when it cannot be told apart: then it is submitted again)."""
    assert run.plan is not None
    known = {batch_id for shard in run.plan.shards for batch_id in _read_state(run.store, shard).batch_ids()}
    since = datetime.fromisoformat(creating.since) - timedelta(seconds=5)
    candidates = [
        batch
        for batch in await api.created_since(since)
        if batch["id"] not in known and sum(batch["request_counts"].values()) == creating.requests
    ]
    if len(candidates) != 1:
        if candidates:
            logger.warning(
                "%d batches of %d requests were created at the time a stopped run created one; submitting again "
                "(one of them may be paid twice).", len(candidates), creating.requests,
            )  # fmt: skip
        return None
    return CreatedBatch(candidates[0]["id"], creating.requests)


async def wait_for_batches(run: DatasetRun, shard: Shard, batch_ids: list[str]) -> list[dict[str, Any]]:
    """Poll until every batch has ended; backoff from 1 s up to the poll interval. In auto mode, once the
    cut-over is due, cancel the batches still running and wait for them to end (what they finished while
    canceling is kept)."""
    cutover = run.cutover
    poll_interval_s = run.setup.options.batch_poll_interval_s
    delay = min(1.0, poll_interval_s)
    canceled: set[str] = set()
    async with _batch_api(run) as api:
        while True:
            batches = [await api.retrieve(batch_id) for batch_id in batch_ids]
            processing = sum(b["request_counts"]["processing"] for b in batches)
            if run.progress is not None:
                run.progress.report(shard.index, processing)
            if all(b["processing_status"] == "ended" for b in batches):
                if cutover is not None:
                    cutover.remaining[shard.index] = 0
                return batches
            if cutover is not None:
                cutover.remaining[shard.index] = processing
                if cutover.due():
                    for batch in batches:
                        if batch["processing_status"] == "in_progress" and batch["id"] not in canceled:
                            await api.cancel(batch["id"])
                            canceled.add(batch["id"])
                            logger.info(
                                "Shard %d: canceled %s at the cut-over (%s); its unanswered requests go in real time.",
                                shard.index,
                                batch["id"],
                                cutover.describe(),
                            )
                    delay = min(delay, 1.0)
            if run.stop.is_set():
                raise RunStopped("stopped while batches run; they go on at Anthropic: run again to collect them")
            wait = delay
            if cutover is not None and cutover.cut_at is None:
                wait = max(0.2, min(delay, cutover.cutover_time() - time.time()))
            await asyncio.sleep(wait)
            delay = min(delay * 2, poll_interval_s)


async def download_batch_results(run: DatasetRun, shard: Shard) -> dict[str, int]:
    """Write every result of the shard's last round into its results file; count them by type."""
    client, store = run.client, run.store
    state = _read_state(store, shard)
    if not state.rounds:
        return {}  # auto mode past its cut-over: nothing went to batches
    round_ = state.rounds[-1]
    items = {
        batch_custom_id(i): i
        for i in iter_requests(run.requests_path, shard.start, shard.end, shard.first_line, run.store.storage)
    }
    counts: dict[str, int] = {}
    budget = client.budget
    store.prepare(shard)
    async with _batch_api(run) as api:
        with store.writer(shard) as writer:
            for batch in round_.batches:
                if batch.downloaded:
                    continue
                async for line in api.results(batch.id):
                    item = items.get(str(line.get("custom_id")))
                    if item is None:
                        continue
                    record = batch_result_record(item, line.get("result") or {}, client.models)
                    if client.output_schema is not None:
                        # No repair in a batch: an invalid reply is a validation_error row (--batch-retry
                        # realtime sends it again through the engine, which repairs).
                        validate_record(record, client.output_schema)
                    writer.write(record)
                    if run.progress is not None:
                        run.progress.record(record)
                    if budget is not None:
                        budget.settle_batch(item.line, record.cost_usd or 0.0)
                    kind = "succeeded" if record.succeeded else str(record.error_type)
                    counts[kind] = counts.get(kind, 0) + 1
                writer.flush()
                batch.downloaded = True
                _write_state(store, shard, state)
    round_.complete = True
    _write_state(store, shard, state)
    return counts


async def run_shard_in_batches(run: DatasetRun, shard: Shard, execute: Executor, *, max_rounds: int = 3) -> list[int]:
    """Run one shard through batches, each step by `execute`; return the lines whose retryable failures are
    left for real-time mode (only with batch_retry="realtime")."""
    options = run.setup.options
    auto = options.mode == "auto"
    # Auto mode: whatever the batches did not answer goes in real time (canceled requests among them).
    batch_retry = "realtime" if auto else options.batch_retry
    retry_lines: list[int] | None = None
    unsent: list[int] = []
    for _ in range(max_rounds):
        ids = await execute("submit-batches", shard, partial(submit_batches, run, shard, retry_lines), BATCH_STEP_RETRY)
        if ids:
            await execute("wait-for-batches", shard, partial(wait_for_batches, run, shard, ids), BATCH_STEP_RETRY)
        await execute("download-batch-results", shard, partial(download_batch_results, run, shard), BATCH_STEP_RETRY)
        # A round stopped between two creates (a failed create, a killed run) sent only its first batches:
        # the lines of the others have no answer. Never a retry: they are sent whatever --batch-retry says.
        unsent = _unanswered_lines(run, shard)
        retryable = _retryable_failures(run.store, shard, canceled_too=auto)
        if batch_retry == "realtime":
            return sorted({*retryable, *unsent})
        retry_lines = sorted({*unsent, *(retryable if batch_retry == "batch" else ())})
        if not retry_lines:
            return []
        if unsent:
            logger.info(
                "Shard %d: %d requests were never sent (a round stopped between two creates); sending them.",
                shard.index, len(unsent),
            )  # fmt: skip
    if unsent:
        # Not done (the caller marks a shard done only when this returns): the next run sends them.
        raise BatchRoundsExhausted(
            f"shard {shard.index}: {len(unsent)} requests still unsent after {max_rounds} batch rounds; run again "
            "to send them"
        )
    return []


class BatchRoundsExhausted(RuntimeError):
    """A shard's batch rounds ended with requests never sent: the shard is not done."""


def _unanswered_lines(run: DatasetRun, shard: Shard) -> list[int]:
    """The shard's lines without any record for the request they hold now (never sent, or sent in a batch
    whose results never came)."""
    answered: dict[int, set[str]] = {}
    for line, digest in final_records(run.store.records(shard)):
        answered.setdefault(line, set()).add(digest)
    return [
        item.line
        for item in iter_requests(run.requests_path, shard.start, shard.end, shard.first_line, run.store.storage)
        if not (digests := answered.get(item.line)) or not (item.digest in digests or "" in digests or not item.digest)
    ]


def _retryable_failures(store: ShardStore, shard: Shard, *, canceled_too: bool = False) -> list[int]:
    kinds = RETRYABLE_BATCH_ERRORS | {"batch_canceled"} if canceled_too else RETRYABLE_BATCH_ERRORS
    records = final_records(store.records(shard))
    return sorted(
        line
        for (line, _digest), record in records.items()
        if record["status"] != "succeeded" and record.get("error_type") in kinds
    )


def has_batch_state(store: ShardStore, shard: Shard) -> bool:
    return store.read_text(batch_state_name(shard)) is not None


async def cancel_batches(output_dir: str, setup: RunSetup) -> list[str]:
    """Cancel every batch of an output location that has not ended; return their ids."""
    storage = setup.storage
    ids: dict[str, None] = {}  # every batch any state or record names, in order, once
    for location in storage.list(str(output_dir), f".shards-*/*{STATE_SUFFIX}"):
        ids.update(dict.fromkeys(read_batch_state(storage, location).batch_ids()))
    for location in storage.list(str(output_dir), f".shards-*/*{RECORD_INFIX}*.json"):
        ids.update({json.loads(storage.read_text(location))["id"]: None})  # also where the state file was lost
    canceled = []
    async with BatchAPI.for_settings(setup.api_key, setup.settings) as api:
        for batch_id in ids:
            if (await api.retrieve(batch_id))["processing_status"] == "in_progress":
                await api.cancel(batch_id)
                canceled.append(batch_id)
    return canceled
