"""The flow: a request file in, a dataset out (results.parquet, results.jsonl, summary.json).

input -> shards (byte ranges, planned in one pass) -> one task per shard, all awaited on the flow's event
loop so they share one rate-limited client -> shard results files -> merge -> Parquet + JSONL. Progress
and summary artifacts show in the Prefect UI.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from .batch_mode import run_shard_in_batches
from .blocks import AnthropicClientConfig, resolve_api_key
from .corrections import save_token_corrections
from .engine import AnthropicClient, FatalAPIError, RunStopped, read_records
from .engine.shared_budget import start_shared_budget
from .engine.shared_limiter import redis_url_from_block
from .fanout import run_shards_on_pool
from .formatting import duration, money, number
from .outputs import DatasetTotals
from .progress import RunProgress
from .run_lock import hold_output_directory
from .settings import ClientSettings, close_shared_clients, shared_client, with_redis_password
from .tables import PromptFunction, render_requests
from .tasks import RUNS, mark_shard_done, merge_shards, plan_request_shards, run_shard, shard_marker_path

__all__ = ["generate_dataset", "generate_dataset_from_table"]

SUMMARY_FILE = "summary.json"


def spent_in(output_dir: str) -> float:
    """Dollars the results files of an output directory record as paid (every attempt of every run)."""
    total = 0.0
    for path in sorted(Path(output_dir).glob(".shards-*/shard-*.jsonl")):
        total += sum(record.get("cost_usd") or 0.0 for record in read_records(path))
    return total


def _check_paths(requests_path: str, output_dir: str) -> None:
    source = Path(requests_path)
    if not source.is_file():
        raise FileNotFoundError(f"requests file not found: {source}")
    target = Path(output_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory is not writable: {target} ({exc.strerror or exc})") from exc


def _summary(
    totals: DatasetTotals,
    settings: ClientSettings,
    client: AnthropicClient,
    wall_time_s: float,
    sent: int,
) -> dict[str, Any]:
    input_total = totals.input_tokens + totals.cache_creation_input_tokens + totals.cache_read_input_tokens
    stats = client.stats
    cost = totals.cost_usd + stats.prewarm_cost_usd
    return {
        "requests": totals.rows,
        "succeeded": totals.succeeded,
        "failed": totals.failed,
        "failed_by_error_type": dict(totals.errors_by_type),
        "input_tokens": totals.input_tokens,
        "output_tokens": totals.output_tokens,
        "cache_creation_input_tokens": totals.cache_creation_input_tokens,
        "cache_read_input_tokens": totals.cache_read_input_tokens,
        "cache_hit_rate": round(totals.cache_read_input_tokens / input_total, 4) if input_total else 0.0,
        "estimated_input_tokens": totals.estimated_input_tokens,
        "real_input_tokens": totals.real_input_tokens_of_estimated,
        "cost_usd": round(cost, 6),
        "cost_usd_of_rows": round(totals.cost_usd, 6),
        "cost_usd_without_caching": round(totals.cost_usd_without_cache, 6),
        "saved_by_caching_usd": round(totals.cost_usd_without_cache - cost, 6),
        "cache_prewarm_requests": stats.prewarm_requests,
        "cache_prewarm_cost_usd": round(stats.prewarm_cost_usd, 6),
        "warnings": client.warnings + totals.warnings(),
        "budget_usd": settings.max_cost_usd,
        "stopped_by_budget": bool(client.budget is not None and client.budget.exhausted),
        "unpriced_models": dict(totals.unpriced_rows),
        "lines_rejected_before_sending": client.preflight.lines_rejected,
        "lines_with_dropped_params": client.preflight.lines_with_dropped_params,
        "ramp_limited_responses": stats.ramp_limited,
        **client.concurrency(),
        "streamed_requests": stats.streamed_requests,
        "validation_repairs": stats.validation_repairs,
        "wall_time_s": round(wall_time_s, 3),
        "requests_sent_this_run": sent,
        "http_requests_this_run": stats.http_requests,
        "retries": stats.retries,
        "rate_limited_responses": stats.rate_limited,
        "achieved_requests_per_minute": round(60.0 * sent / wall_time_s, 1) if wall_time_s > 0 else 0.0,
        "limits": {cls: limits.as_dict() for cls, limits in client.limits_in_force().items()},
        "shared_limiter": client.shared_limiter.summary() if client.shared_limiter is not None else None,
        "settings": settings.model_dump(),
    }


def _limit_text(value: float | None, unit: str) -> str:
    return f"{number(value)} {unit}" if value is not None else f"no {unit} limit"


def _summary_markdown(summary: dict[str, Any]) -> str:
    cost_line = f"{money(summary['cost_usd'])} (without caching {money(summary['cost_usd_without_caching'])})"
    if summary["budget_usd"] is not None:
        cost_line += f"; budget {money(summary['budget_usd'])}"
        cost_line += ", **stopped by the budget**" if summary["stopped_by_budget"] else ""
    lines = [
        "# Anthropic dataset run",
        "",
        "| | |",
        "|---|---|",
        f"| requests | {number(summary['requests'])} |",
        f"| succeeded | {number(summary['succeeded'])} |",
        f"| failed | {number(summary['failed'])} |",
        f"| input tokens | {number(summary['input_tokens'])} |",
        f"| output tokens | {number(summary['output_tokens'])} |",
        f"| cache reads | {number(summary['cache_read_input_tokens'])} (hit rate {summary['cache_hit_rate']:.1%}) |",
        f"| estimated input tokens | {number(summary['estimated_input_tokens'])} "
        f"(real {number(summary['real_input_tokens'])}) |",
        f"| cost | {cost_line} |",
        f"| wall time | {duration(summary['wall_time_s'])} |",
        f"| achieved rate | {number(summary['achieved_requests_per_minute'])} req/min |",
    ]
    for cls, limits in summary["limits"].items():
        lines.append(
            f"| limits ({cls}) | {_limit_text(limits['requests_per_minute'], 'req/min')}, "
            f"{_limit_text(limits['input_tokens_per_minute'], 'input tok/min')}, "
            f"{_limit_text(limits['output_tokens_per_minute'], 'output tok/min')} |"
        )
    if summary["warnings"]:
        lines += ["", "## Warnings", ""]
        lines += [f"- {warning}" for warning in summary["warnings"]]
    if summary["failed_by_error_type"]:
        lines += ["", "## Failures by error type", ""]
        lines += [f"- `{kind}`: {number(count)}" for kind, count in sorted(summary["failed_by_error_type"].items())]
    return "\n".join(lines) + "\n"


@flow(name="anthropic-requests-to-dataset", log_prints=True)
async def generate_dataset(
    requests_path: str,
    output_dir: str,
    settings: ClientSettings | None = None,
    client_block: str | None = None,
    credentials_block: str | None = None,
    shard_size: int = 5_000,
    max_parallel_shards: int = 4,
    original_layout_path: str | None = None,
    parquet_beside_original: bool = False,
    shard_retries: int = 3,
    shard_retry_delay_s: float = 10.0,
    mode: Literal["realtime", "batch"] = "realtime",
    batch_retry: Literal["none", "batch", "realtime"] = "none",
    batch_poll_interval_s: float = 30.0,
    input_table: str | None = None,
    input_columns: list[str] | None = None,
    work_pool: str | None = None,
    shard_heartbeat_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Send every request of a JSONL file to the Anthropic Messages API and write the dataset.

    Args:
        requests_path: JSONL file, one Messages API body (or Batches-style custom_id/params) per line.
        output_dir: Where results.parquet, results.jsonl and summary.json go; a re-run resumes from here.
        settings: Base URL, tier or explicit limits, concurrency, attempts (no secrets).
        client_block: Name of a saved AnthropicClientConfig block (its settings and key win).
        credentials_block: Name of a saved AnthropicCredentials block; else ANTHROPIC_API_KEY is used.
        shard_size: Lines per shard task.
        max_parallel_shards: Shards running at once (they share one client and its limits).
        original_layout_path: Also write the original script's JSONL layout here.
        parquet_beside_original: Write the Parquet file beside `original_layout_path` (the drop-in script).
        shard_retries: Retries of a shard task that ended with retryable failures (each resumes).
        shard_retry_delay_s: Base of the exponential backoff between shard retries, in seconds.
        mode: "realtime" (Messages API, at the rate limits) or "batch" (Message Batches API, half price).
        batch_retry: In batch mode, what to do with requests that expired or failed on the server's side:
            nothing, a follow-up batch, or the real-time API.
        batch_poll_interval_s: In batch mode, the longest wait between two polls of a batch.
        input_table: The table the request file was rendered from (one line per row, see
            `generate_dataset_from_table`): its columns are put beside the result columns.
        input_columns: Which of the table's columns to keep (default: all).
        work_pool: Run each shard as a child flow run on this Prefect work pool (any worker of the pool,
            on any machine, takes shards); the output directory and request file must be shared storage.
        shard_heartbeat_timeout_s: With a work pool, a running shard whose heartbeat stops this long is
            taken as lost with its worker, marked Crashed and run again (it resumes).
    """
    started = time.monotonic()
    if client_block:
        config: AnthropicClientConfig = await AnthropicClientConfig.aload(client_block)
        settings = config.settings()
    settings = settings or ClientSettings()
    _check_paths(requests_path, output_dir)
    # One run per output directory, whatever starts it (on any machine, with a shared limiter).
    lock_url = with_redis_password(settings.limiter_url)
    if lock_url is None and settings.limiter_block:
        lock_url = await redis_url_from_block(settings.limiter_block)
    with hold_output_directory(output_dir, lock_url):
        return await _run(
            requests_path,
            output_dir,
            settings,
            client_block,
            credentials_block,
            shard_size,
            max_parallel_shards,
            original_layout_path,
            parquet_beside_original,
            shard_retries,
            shard_retry_delay_s,
            mode,
            batch_retry,
            batch_poll_interval_s,
            started,
            input_table,
            input_columns,
            work_pool,
            shard_heartbeat_timeout_s,
        )


async def generate_dataset_from_table(
    table: Any,
    output_dir: str | os.PathLike[str],
    prompt: str | PromptFunction,
    *,
    model: str | None = None,
    max_tokens: int | None = None,
    system: str | None = None,
    id_column: str | None = None,
    columns: list[str] | None = None,
    settings: ClientSettings | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A table in, a dataset out: each row renders `prompt` into a request, and the dataset keeps the
    table's columns beside the result columns, in the table's row order.

    Args:
        table: A .csv, .parquet or .jsonl path, a pandas DataFrame or a pyarrow Table.
        prompt: A Jinja2 template of the user message (strict: an undefined column is an error), or one
            rendering a whole request body as JSON; or a function of the row returning the user message, a
            list of messages or a request body.
        model, max_tokens: Added to every request that does not set them.
        system: A Jinja2 template of the system prompt.
        id_column: The column giving each row's custom_id (default: a digest of the row).
        columns: The table's columns to keep in the outputs (default: all).
        settings, options: As for `generate_dataset` (schema, caching, batch mode, budget, ...).
    """
    source: Any = table
    if not isinstance(table, (str, os.PathLike)):
        # The merge reads the table again, a batch at a time: keep an in-memory table on disk for it.
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        source = Path(output_dir) / "input-table.parquet"
        frame = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
        pq.write_table(frame, source)
    rendered = render_requests(
        source, output_dir, prompt, model=model, max_tokens=max_tokens, system=system, id_column=id_column
    )
    result: dict[str, Any] = await generate_dataset(
        str(rendered.requests_path),
        str(output_dir),
        settings=settings,
        input_table=str(source),
        input_columns=columns,
        **options,
    )
    return result


async def _run(
    requests_path: str,
    output_dir: str,
    settings: ClientSettings,
    client_block: str | None,
    credentials_block: str | None,
    shard_size: int,
    max_parallel_shards: int,
    original_layout_path: str | None,
    parquet_beside_original: bool,
    shard_retries: int,
    shard_retry_delay_s: float,
    mode: str,
    batch_retry: str,
    batch_poll_interval_s: float,
    started: float,
    input_table: str | None,
    input_columns: list[str] | None,
    work_pool: str | None = None,
    shard_heartbeat_timeout_s: float = 60.0,
) -> dict[str, Any]:
    logger = get_run_logger()
    if work_pool and mode != "realtime":
        raise ValueError("--work-pool runs shards in real-time mode only (batch mode needs no workers)")
    if work_pool and settings.max_cost_usd is not None and not (settings.limiter_url or settings.limiter_block):
        raise ValueError(
            "--max-cost-usd with --work-pool needs --limiter-url: the budget is kept in Redis so that every "
            "worker spends from the same one"
        )
    # Fail before planning anything when there is no key (the key itself stays out of every parameter).
    client = shared_client(settings, await resolve_api_key(client_block, credentials_block))
    await client.check_limiter()  # a shared limiter that cannot be reached: stop before sending anything
    if client.budget is not None:
        # The budget is for the dataset: what earlier runs of this output directory paid counts.
        client.budget.spent_usd = spent_in(output_dir)
        logger.info(
            "Budget %s, %s spent by earlier runs.", money(client.budget.limit_usd), money(client.budget.spent_usd)
        )

    budget_id = None
    if work_pool and client.budget is not None and client.shared_limiter is not None:
        budget_id = uuid.uuid4().hex
        await start_shared_budget(client.shared_limiter, budget_id, client.budget.limit_usd, client.budget.spent_usd)

    plan = plan_request_shards(requests_path, shard_size)
    if plan.lines == 0:
        raise ValueError(f"requests file is empty: {requests_path}")
    work_dir = Path(output_dir) / f".shards-{shard_size}"
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "%s: %d lines in %d shards of up to %d; results in %s",
        requests_path,
        plan.lines,
        len(plan.shards),
        shard_size,
        output_dir,
    )

    progress_key = uuid.uuid4().hex
    tracker = RUNS[progress_key] = RunProgress(
        total_requests=plan.lines,
        limits=client.limits_in_force,
        waiting=lambda: client.waiting,
        concurrency=lambda: client.concurrency()["concurrency_final"],
    )
    artifact_id = await acreate_progress_artifact(0.0, key="anthropic-dataset-progress", description="Requests done")

    async def publish_progress() -> None:
        while True:
            await asyncio.sleep(2.0)
            await aupdate_progress_artifact(artifact_id, tracker.percent, description=tracker.describe())

    publisher = asyncio.create_task(publish_progress())
    gate = asyncio.Semaphore(max_parallel_shards)
    shard_task = run_shard.with_options(
        retries=shard_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=shard_retry_delay_s) if shard_retry_delay_s else 0,
    )

    async def one_shard(shard):
        async with gate:
            if mode == "batch" and not shard_marker_path(work_dir, shard).exists():
                left = await run_shard_in_batches(
                    requests_path, shard, str(work_dir), settings, client_block, credentials_block,
                    batch_retry=batch_retry, poll_interval_s=batch_poll_interval_s, progress_key=progress_key,
                )  # fmt: skip
                if not left and not (client.budget is not None and client.budget.exhausted):
                    mark_shard_done(work_dir, shard, {"shard": shard.index, "requests": shard.line_count})
            # Real-time mode, or what batch mode left for it: sends only the lines not yet succeeded.
            return await shard_task(
                requests_path,
                shard,
                str(work_dir),
                settings,
                client_block,
                credentials_block,
                progress_key,
                return_state=True,
            )

    shards_by_worker: dict[str, int] = {}
    try:
        if work_pool:
            shards_by_worker = await run_shards_on_pool(
                work_pool, requests_path, plan.shards, output_dir, str(work_dir), settings, client_block,
                credentials_block, max_parallel_shards=max_parallel_shards, shard_retries=shard_retries,
                budget_id=budget_id, heartbeat_timeout_s=shard_heartbeat_timeout_s,
                on_shard_done=lambda shard: tracker.mark_done(shard.index, shard.line_count),
            )  # fmt: skip
            states = []
        else:
            states = await asyncio.gather(*(one_shard(shard) for shard in plan.shards))
    finally:
        publisher.cancel()
        RUNS.pop(progress_key, None)
    save_token_corrections(client.input_estimator.learned_ratios())
    await close_shared_clients()
    for state in states:
        if state.is_failed():
            error = await state.aresult(raise_on_failure=False)
            if isinstance(error, (FatalAPIError, RunStopped)):
                raise error
            logger.warning("A shard ended with failures after its retries: %s", error)

    totals = merge_shards(
        requests_path,
        plan,
        str(work_dir),
        output_dir,
        original_layout_path,
        parquet_beside_original,
        settings.output_schema,
        input_table,
        input_columns,
    )
    sent = sum(p.done for p in tracker.shards.values())
    summary = _summary(totals, settings, client, time.monotonic() - started, sent)
    if work_pool:
        # The budget was spent by the workers' processes: their budget_exhausted rows say it stopped them.
        summary["stopped_by_budget"] |= budget_id is not None and bool(totals.errors_by_type.get("budget_exhausted"))
        summary["work_pool"] = work_pool
        summary["shards_by_worker"] = shards_by_worker
    summary_path = Path(output_dir) / SUMMARY_FILE
    partial = summary_path.with_suffix(".partial")
    partial.write_text(json.dumps(summary, indent=2))
    os.replace(partial, summary_path)
    await aupdate_progress_artifact(artifact_id, 100.0, description=tracker.describe())
    await acreate_markdown_artifact(_summary_markdown(summary), key="anthropic-dataset-summary")
    await acreate_table_artifact(
        totals.first_failures or [{"line": None, "custom_id": None, "error_type": "none", "error_message": None}],
        key="anthropic-dataset-failures",
        description=f"Failed lines: the first {number(len(totals.first_failures))} of {number(totals.failed)}",
    )
    logger.info(
        "Done: %s requests, %s succeeded, %s failed, %s, %s",
        number(summary["requests"]),
        number(summary["succeeded"]),
        number(summary["failed"]),
        money(summary["cost_usd"]),
        duration(summary["wall_time_s"]),
    )
    return summary
