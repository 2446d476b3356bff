"""Prefect tasks: plan shards, run one shard through the engine, merge the shards into the dataset.

Tasks stay thin: the work is done by `inputs`, `engine` and `outputs`. A shard task is resumable: its
results file is appended as requests finish, and a retry (by Prefect, or a re-run of the flow) sends only
the requests that have not succeeded yet. A finished shard leaves a marker and is never run again for
the same input.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from .blocks import resolve_api_key
from .engine import FatalAPIError, ResultsWriter, RunStopped, run_requests, succeeded_requests
from .inputs import Shard, ShardPlan, iter_requests, plan_shards
from .outputs import DatasetTotals, merge_results
from .progress import RunProgress
from .schema import OutputSchema
from .settings import ClientSettings, shared_client

__all__ = ["ShardIncomplete", "merge_shards", "plan_request_shards", "run_shard"]

#: Error types that another attempt cannot fix: a shard holding only these counts as finished.
PERMANENT_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_request_error",
        "not_found_error",
        "request_too_large",
        "refusal",
        "validation_error",
        "budget_exhausted",
    }
)

#: RunProgress of the flow runs of this process, by key (tasks on another machine simply skip progress).
RUNS: dict[str, RunProgress] = {}
#: Set by the CLI on Ctrl-C: shards stop admitting requests, save what finishes, and end resumable.
SHUTDOWN = threading.Event()


class ShardIncomplete(RuntimeError):
    """Some requests of the shard failed with errors worth retrying: the task is retried and resumes."""


def shard_results_path(work_dir: str | os.PathLike[str], shard: Shard) -> Path:
    return Path(work_dir) / f"shard-{shard.index:05d}.jsonl"


def shard_marker_path(work_dir: str | os.PathLike[str], shard: Shard) -> Path:
    """Named by the shard's content digest: an edited or extended shard runs again, resuming line by line
    (each record carries its request's digest), so only new or changed requests are sent."""
    return Path(work_dir) / f"shard-{shard.index:05d}-{shard.digest}.done.json"


def mark_shard_done(work_dir: str | os.PathLike[str], shard: Shard, summary: dict[str, Any]) -> None:
    marker = shard_marker_path(work_dir, shard)
    partial = marker.with_suffix(".partial")
    partial.write_text(json.dumps(summary))
    os.replace(partial, marker)


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_request_shards(requests_path: str, lines_per_shard: int) -> ShardPlan:
    return plan_shards(requests_path, lines_per_shard)


async def _retry_unless_fatal(task: Any, task_run: Any, state: Any) -> bool:
    try:
        await state.aresult(raise_on_failure=True)
    except (FatalAPIError, RunStopped):
        return False  # a bad key or no credit: retrying cannot help; or the user asked to stop
    except Exception:
        return True
    return True


@task(
    name="run-shard",
    task_run_name="shard-{shard.index}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_unless_fatal,
    cache_policy=NO_CACHE,
)
async def run_shard(
    requests_path: str,
    shard: Shard,
    work_dir: str,
    settings: ClientSettings,
    client_block: str | None = None,
    credentials_block: str | None = None,
    progress_key: str | None = None,
) -> dict[str, Any]:
    """Send the shard's requests not yet succeeded; return a small summary of the shard."""
    logger = get_run_logger()
    marker = shard_marker_path(work_dir, shard)
    tracker = RUNS.get(progress_key or "")
    if marker.exists():
        summary = json.loads(marker.read_text())
        if tracker is not None:
            tracker.mark_done(shard.index, summary["requests"])
        logger.info("Shard %d already finished in an earlier run; not sent again.", shard.index)
        return summary
    client = shared_client(settings, await resolve_api_key(client_block, credentials_block))
    results_path = shard_results_path(work_dir, shard)
    done = succeeded_requests(results_path)
    if len(done):
        logger.info("Shard %d resumes: %d requests already succeeded.", shard.index, len(done))

    def on_progress(progress) -> None:
        if tracker is not None:
            tracker.update(shard.index, progress)

    with ResultsWriter(results_path) as writer:
        progress = await run_requests(
            client,
            iter_requests(requests_path, shard.start, shard.end, shard.first_line),
            writer=writer,
            already_succeeded=done,
            on_progress=on_progress,
            stop=SHUTDOWN,
        )
    retryable = {kind: n for kind, n in progress.errors_by_type.items() if kind not in PERMANENT_ERRORS}
    if retryable:
        raise ShardIncomplete(
            f"shard {shard.index}: {sum(retryable.values())} requests failed with retryable errors {retryable}; "
            "a retry resumes with them"
        )
    summary = {
        "shard": shard.index,
        "requests": progress.done + progress.skipped,
        "sent": progress.done,
        "failed_permanently": progress.failed,
    }
    if progress.errors_by_type.get("budget_exhausted"):
        return summary  # not done: a later run with a higher budget sends the rest
    mark_shard_done(work_dir, shard, summary)
    logger.info(
        "Shard %d done: %d sent, %d skipped, %d failed permanently.",
        shard.index,
        progress.done,
        progress.skipped,
        progress.failed,
    )
    return summary


@task(name="merge-shards", cache_policy=NO_CACHE)
def merge_shards(
    requests_path: str,
    plan: ShardPlan,
    work_dir: str,
    output_dir: str,
    original_layout_path: str | None = None,
    parquet_beside_original: bool = False,
    output_schema: dict[str, Any] | None = None,
    input_table: str | None = None,
    input_columns: list[str] | None = None,
) -> DatasetTotals:
    return merge_results(
        requests_path,
        plan.shards,
        [shard_results_path(work_dir, shard) for shard in plan.shards],
        output_dir,
        original_layout_path=original_layout_path,
        parquet_beside_original=parquet_beside_original,
        output_schema=OutputSchema(output_schema) if output_schema is not None else None,
        input_table=input_table,
        input_columns=input_columns,
    )
