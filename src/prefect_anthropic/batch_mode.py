"""Batch mode: each shard goes to Anthropic's Message Batches API (half price), as Prefect tasks.

Per shard: `submit_batches` (records every batch id the moment it exists, so a restarted flow polls the
same batches instead of paying for them again), `wait_for_batches` (polls with backoff, reports
request_counts as progress), `download_batch_results` (writes each result into the shard's results file,
in the same schema as real-time mode). Failed rows can then get a follow-up batch or go through the
real-time engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from .blocks import resolve_api_key
from .engine import ResultsWriter, RetryPolicy, RunStopped, succeeded_requests
from .engine.batches import BatchAPI, batch_custom_id, batch_result_record, line_of_custom_id, plan_batches
from .engine.budget import worst_case_cost
from .engine.preflight import Preflight
from .engine.records import RequestItem, ResultRecord, validate_record
from .engine.runner import done_before
from .inputs import Shard, iter_requests
from .models import lookup_model
from .outputs import final_records
from .schema import OutputSchema, with_output_format
from .settings import ClientSettings, shared_client
from .tasks import RUNS, SHUTDOWN, shard_results_path

__all__ = ["BATCH_RETRY_CHOICES", "batch_state_path", "cancel_batches", "run_shard_in_batches"]

BATCH_RETRY_CHOICES = ("none", "batch", "realtime")
#: Batch results worth another try: the request never ran, or failed on the server's side.
RETRYABLE_BATCH_ERRORS = frozenset(
    {"batch_expired", "api_error", "overloaded_error", "timeout_error", "validation_error"}
)


def batch_state_path(work_dir: str | os.PathLike[str], shard: Shard) -> Path:
    return Path(work_dir) / f"shard-{shard.index:05d}-{shard.digest}.batches.json"


def _read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"rounds": []}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(state, indent=1))
    os.replace(partial, path)


async def _batch_api(settings: ClientSettings, client_block: str | None, credentials_block: str | None) -> BatchAPI:
    key = await resolve_api_key(client_block, credentials_block)
    return BatchAPI(
        key,
        base_url=settings.base_url,
        anthropic_version=settings.anthropic_version,
        retry=RetryPolicy(max_attempts=max(settings.max_attempts, 5)),
        timeout=settings.timeout_s,
    )


def _output_schema(settings: ClientSettings) -> OutputSchema | None:
    return OutputSchema(settings.output_schema) if settings.output_schema is not None else None


def _pending_items(requests_path: str, shard: Shard, results_path: Path, retry_lines: set[int] | None):
    done = succeeded_requests(results_path)
    for item in iter_requests(requests_path, shard.start, shard.end, shard.first_line):
        if done_before(done, item):
            continue
        if retry_lines is not None and item.line not in retry_lines:
            continue
        yield item


@task(name="submit-batches", task_run_name="submit-shard-{shard.index}", cache_policy=NO_CACHE, retries=2)
async def submit_batches(
    requests_path: str,
    shard: Shard,
    work_dir: str,
    settings: ClientSettings,
    client_block: str | None,
    credentials_block: str | None,
    retry_lines: list[int] | None = None,
) -> list[str]:
    """Submit the shard's unsent requests; return the ids of this round's batches (never submitted twice)."""
    logger = get_run_logger()
    state_path = batch_state_path(work_dir, shard)
    state = _read_state(state_path)
    if state["rounds"] and not state["rounds"][-1]["complete"] and retry_lines is None:
        ids = [b["id"] for b in state["rounds"][-1]["batches"]]
        logger.info("Shard %d: batches %s were submitted before; polling them, not submitting again.", shard.index, ids)
        return ids
    results_path = shard_results_path(work_dir, shard)
    round_: dict[str, Any] = {"complete": False, "batches": []}
    state["rounds"].append(round_)
    # The flow's client (same settings, same loop): its budget is the run's, its estimator the run's.
    client = shared_client(settings, await resolve_api_key(client_block, credentials_block))
    worst_by_line: dict[int, float] = {}
    async with await _batch_api(settings, client_block, credentials_block) as api:
        with ResultsWriter(results_path) as writer:
            valid = []
            preflight = Preflight(settings.anthropic_version, drop_unsupported_params=settings.drop_unsupported_params)
            schema = _output_schema(settings)
            for item in _pending_items(requests_path, shard, results_path, set(retry_lines) if retry_lines else None):
                if item.invalid is None and schema is not None:
                    item = dataclasses.replace(item, body=with_output_format(item.body, schema))
                checked = ResultRecord.for_invalid_line(item) if item.invalid is not None else preflight(item)
                if isinstance(checked, RequestItem) and client.budget is not None:
                    # Batch mode reserves per batch: each request's worst case at the batch price.
                    estimate = client.input_estimator.estimate(checked.body)
                    worst = worst_case_cost(lookup_model(checked.model) or checked.model, checked.body, estimate,
                                            batch=True)  # fmt: skip
                    if worst is None or not client.budget.reserve(worst):
                        checked = client.budget.exhausted_record(checked)
                    else:
                        worst_by_line[checked.line] = worst
                if isinstance(checked, ResultRecord):
                    writer.write(checked)
                else:
                    valid.append(checked)
        for requests in plan_batches(valid):
            batch = await api.create(requests)
            reserved = sum(worst_by_line.get(line_of_custom_id(r["custom_id"]), 0.0) for r in requests)
            if client.budget is not None:
                client.budget.holds[batch["id"]] = reserved
            round_["batches"].append({"id": batch["id"], "requests": len(requests), "downloaded": False})
            _write_state(state_path, state)  # recorded at once: a restart polls it instead of paying again
            logger.info("Shard %d: submitted %s with %d requests.", shard.index, batch["id"], len(requests))
    if not round_["batches"]:
        round_["complete"] = True
    _write_state(state_path, state)
    return [b["id"] for b in round_["batches"]]


@task(name="wait-for-batches", task_run_name="wait-shard-{shard.index}", cache_policy=NO_CACHE, retries=2)
async def wait_for_batches(
    shard: Shard,
    batch_ids: list[str],
    settings: ClientSettings,
    client_block: str | None,
    credentials_block: str | None,
    poll_interval_s: float = 30.0,
    progress_key: str | None = None,
) -> list[dict[str, Any]]:
    """Poll until every batch has ended; backoff from 1 s up to `poll_interval_s`."""
    from .engine.runner import Progress

    tracker = RUNS.get(progress_key or "")
    delay = min(1.0, poll_interval_s)
    async with await _batch_api(settings, client_block, credentials_block) as api:
        while True:
            batches = [await api.retrieve(batch_id) for batch_id in batch_ids]
            if tracker is not None:
                counts = [b["request_counts"] for b in batches]
                progress = Progress(
                    done=sum(c["succeeded"] + c["errored"] + c["canceled"] + c["expired"] for c in counts),
                    succeeded=sum(c["succeeded"] for c in counts),
                    failed=sum(c["errored"] + c["canceled"] + c["expired"] for c in counts),
                    in_flight=sum(c["processing"] for c in counts),
                )
                tracker.update(shard.index, progress)
            if all(b["processing_status"] == "ended" for b in batches):
                return batches
            if SHUTDOWN.is_set():
                raise RunStopped("stopped while batches run; they go on at Anthropic: run again to collect them")
            await asyncio.sleep(delay)
            delay = min(delay * 2, poll_interval_s)


@task(name="download-batch-results", task_run_name="download-shard-{shard.index}", cache_policy=NO_CACHE, retries=2)
async def download_batch_results(
    requests_path: str,
    shard: Shard,
    work_dir: str,
    settings: ClientSettings,
    client_block: str | None,
    credentials_block: str | None,
) -> dict[str, int]:
    """Write every result of the shard's last round into its results file; count them by type."""
    state_path = batch_state_path(work_dir, shard)
    state = _read_state(state_path)
    round_ = state["rounds"][-1]
    items = {batch_custom_id(i): i for i in iter_requests(requests_path, shard.start, shard.end, shard.first_line)}
    counts: dict[str, int] = {}
    schema = _output_schema(settings)
    budget = shared_client(settings, await resolve_api_key(client_block, credentials_block)).budget
    async with await _batch_api(settings, client_block, credentials_block) as api:
        with ResultsWriter(shard_results_path(work_dir, shard)) as writer:
            for batch in round_["batches"]:
                if batch["downloaded"]:
                    continue
                spent = 0.0
                async for line in api.results(batch["id"]):
                    item = items.get(str(line.get("custom_id")))
                    if item is None:
                        continue
                    record = batch_result_record(item, line.get("result") or {})
                    if schema is not None:
                        # No repair in a batch: an invalid reply is a validation_error row (--batch-retry
                        # realtime sends it again through the engine, which repairs).
                        validate_record(record, schema)
                    writer.write(record)
                    spent += record.cost_usd or 0.0
                    kind = "succeeded" if record.succeeded else str(record.error_type)
                    counts[kind] = counts.get(kind, 0) + 1
                writer.flush()
                if budget is not None and batch["id"] in budget.holds:
                    budget.settle(budget.holds.pop(batch["id"]), spent)
                batch["downloaded"] = True
                _write_state(state_path, state)
    round_["complete"] = True
    _write_state(state_path, state)
    return counts


async def run_shard_in_batches(
    requests_path: str,
    shard: Shard,
    work_dir: str,
    settings: ClientSettings,
    client_block: str | None,
    credentials_block: str | None,
    *,
    batch_retry: str = "none",
    max_rounds: int = 3,
    poll_interval_s: float = 30.0,
    progress_key: str | None = None,
) -> list[int]:
    """Run one shard through batches; return the lines whose retryable failures are left for real-time mode
    (only with batch_retry="realtime")."""
    retry_lines: list[int] | None = None
    for _ in range(max_rounds):
        ids = await submit_batches(
            requests_path, shard, work_dir, settings, client_block, credentials_block, retry_lines
        )
        if ids:
            await wait_for_batches(shard, ids, settings, client_block, credentials_block, poll_interval_s, progress_key)
        await download_batch_results(requests_path, shard, work_dir, settings, client_block, credentials_block)
        retryable = _retryable_failures(shard, work_dir)
        if not retryable or batch_retry == "none":
            return []
        if batch_retry == "realtime":
            return retryable
        retry_lines = retryable
    return []


def _retryable_failures(shard: Shard, work_dir: str) -> list[int]:
    records = final_records(shard_results_path(work_dir, shard))
    return sorted(
        line
        for (line, _digest), record in records.items()
        if record["status"] != "succeeded" and record.get("error_type") in RETRYABLE_BATCH_ERRORS
    )


async def cancel_batches(
    output_dir: str | os.PathLike[str],
    settings: ClientSettings,
    client_block: str | None = None,
    credentials_block: str | None = None,
) -> list[str]:
    """Cancel every batch of an output directory that has not ended; return their ids."""
    canceled = []
    async with await _batch_api(settings, client_block, credentials_block) as api:
        for path in sorted(Path(output_dir).glob(".shards-*/*.batches.json")):
            for round_ in _read_state(path)["rounds"]:
                for batch in round_["batches"]:
                    if (await api.retrieve(batch["id"]))["processing_status"] == "in_progress":
                        await api.cancel(batch["id"])
                        canceled.append(batch["id"])
    return canceled
