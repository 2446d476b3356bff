"""The flow: a request file in, a dataset out (results.parquet, results.jsonl, summary.json).

input -> shards (byte ranges, planned in one pass) -> one task per shard, all awaited on the flow's event
loop so they share the run's rate-limited client -> shard results files -> merge -> Parquet + JSONL. The
steps themselves are `pipeline.DatasetRun`'s; this module runs them as Prefect tasks and shows progress,
the summary and the failed lines as artifacts in the Prefect UI.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import textwrap
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import flow
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.logging import get_run_logger

from ..api.formatting import duration, money, number
from ..dataset.pipeline import DatasetRun, open_run, spent_in
from ..dataset.shard_loop import run_shards
from ..dataset.tables import SAVED_TABLE_PREFIX, PromptFunction, RequestTemplate, render_requests
from ..settings import ClientSettings, RunOptions
from ..storage import join
from .edge import resolve_run, resolve_storage
from .handoff import HANDOFF
from .observability import RunEvents, artifact_keys, final_state, forward_logs, state_message
from .tasks import as_prefect_tasks, merge_materializing, plan_request_shards

__all__ = ["generate_dataset", "generate_dataset_from_table", "spent_in"]

F = TypeVar("F", bound=Callable[..., Any])


def _limit_text(value: float | None, unit: str) -> str:
    return f"{number(value)} {unit}" if value is not None else f"no {unit} limit"


def _summary_markdown(summary: dict[str, Any]) -> str:
    cost_line = f"{money(summary['cost_usd'])} (without caching {money(summary['cost_usd_without_caching'])})"
    if summary["budget_usd"] is not None:
        cost_line += f"; budget {money(summary['budget_usd'])}"
        cost_line += ", **stopped by the budget**" if summary["stopped_by_budget"] else ""
    keys = summary.get("artifacts") or {}
    lines = [
        f"# Anthropic dataset run: {state_message(summary)}",
        "",
        "| | |",
        "|---|---|",
        f"| requests | {number(summary['requests'])} |",
        f"| sent in this run | {number(summary['requests_sent_this_run'])} |",
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
        if "failures" in keys:
            lines += ["", f"Failed lines: [{keys['failures']}](/artifacts/key/{keys['failures']})."]
    if "progress" in keys:
        lines += ["", f"This dataset's runs: [{keys['progress']}](/artifacts/key/{keys['progress']})."]
    return "\n".join(lines) + "\n"


def options_as_parameters(fn: F) -> F:
    """Give the flow one parameter per `RunOptions` field, made from its declaration (name, type, default, and
    its description in the docstring, which the Prefect UI shows): the fields are written once, in settings.py,
    and the flow takes them as `**options`."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    options = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=field.annotation)
        for name, field in RunOptions.model_fields.items()
    ]
    fn.__signature__ = inspect.Signature([*own, *options], return_annotation=dict[str, Any])  # type: ignore[attr-defined]
    described = "".join(
        textwrap.fill(f"{name}: {field.description}", 112, initial_indent=" " * 8, subsequent_indent=" " * 12) + "\n"
        for name, field in RunOptions.model_fields.items()
    )
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + described
    return fn


@flow(name="anthropic-requests-to-dataset", log_prints=True)
@options_as_parameters
async def generate_dataset(
    requests_path: str,
    output_dir: str,
    settings: ClientSettings | None = None,
    client_block: str | None = None,
    credentials_block: str | None = None,
    original_layout_path: str | None = None,
    parquet_beside_original: bool = False,
    input_table: str | None = None,
    input_columns: list[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Send every request of a JSONL file to the Anthropic Messages API and write the dataset.

    Args:
        requests_path: JSONL file, one Messages API body (or Batches-style custom_id/params) per line.
        output_dir: Where results.parquet, results.jsonl and summary.json go; a re-run resumes from here.
        settings: How requests are sent (no secrets); the fields set here are laid over the client block's.
        client_block: Name of a saved AnthropicClientConfig block (its settings and key).
        credentials_block: Name of a saved AnthropicCredentials block; else ANTHROPIC_API_KEY is used.
        original_layout_path: Also write the original script's JSONL layout here.
        parquet_beside_original: Write the Parquet file beside `original_layout_path` (the drop-in script).
        input_table: The table the request file was rendered from (one line per row, see
            `generate_dataset_from_table`): its columns are put beside the result columns.
        input_columns: Which of the table's columns to keep (default: all).
    """
    run_options = RunOptions(**options)
    setup = await resolve_run(settings, run_options, client_block=client_block, credentials_block=credentials_block)
    setup.check()
    run_fields = {
        "input_table": input_table,
        "input_columns": input_columns,
        "original_layout_path": original_layout_path,
        "parquet_beside_original": parquet_beside_original,
    }
    with forward_logs():
        early = HANDOFF.opened_early.pop(output_dir, None)
        if early is not None:  # opened and sending since before Prefect loaded: its opener closes it
            summary = await _run(early, client_block, credentials_block)
        else:
            async with open_run(
                requests_path, output_dir, setup, stop=HANDOFF.stop, progress_listeners=HANDOFF.progress_listeners,
                **run_fields,
            ) as run:  # fmt: skip
                summary = await _run(run, client_block, credentials_block)
    # Completed (or, with fail_on_errors and failed rows, Failed) with a message saying what happened.
    return final_state(summary, run_options.fail_on_errors)


async def _run(run: DatasetRun, client_block: str | None, credentials_block: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    options = run.setup.options
    plan_request_shards(run.plan_shards)
    tracker = run.progress
    assert tracker is not None
    keys = artifact_keys(run.output_dir)
    events = RunEvents(run.output_dir)

    async def create_progress() -> Any:
        return await acreate_progress_artifact(0.0, key=keys["progress"], description=tracker.describe())

    # Created beside the first requests, not before them: one API round trip less before the first send.
    progress_artifact = asyncio.create_task(create_progress())

    async def publish_progress() -> None:
        artifact_id = await asyncio.shield(progress_artifact)  # cancelling the publisher keeps the artifact
        while True:
            await asyncio.sleep(2.0)
            events.watch(run.client)
            await aupdate_progress_artifact(artifact_id, tracker.percent, description=tracker.describe())

    publisher = asyncio.create_task(publish_progress())
    shards_by_worker: dict[str, int] = {}
    budget_id = None
    try:
        if options.work_pool:
            from .fanout import run_shards_on_pool

            budget_id = await _start_shared_budget(run)
            shards_by_worker = await run_shards_on_pool(run, client_block, credentials_block, budget_id=budget_id)
        else:
            await run_shards(run, as_prefect_tasks)
    finally:
        publisher.cancel()
        events.watch(run.client)

    inputs = [run.input_table] if run.input_table is not None else [run.requests_path]
    totals = merge_materializing(run.output_dir, inputs)(run.merge, run.client.stats.prewarm_cost_usd)
    summary = run.summary(totals)
    summary["artifacts"] = keys
    if options.work_pool:
        # The budget was spent by the workers' processes: their budget_exhausted rows say it stopped them.
        summary["stopped_by_budget"] |= budget_id is not None and bool(totals.errors_by_type.get("budget_exhausted"))
        summary["work_pool"] = options.work_pool
        summary["shards_by_worker"] = shards_by_worker
    run.write_summary(summary)
    await aupdate_progress_artifact(await progress_artifact, 100.0, description=tracker.describe())
    await acreate_markdown_artifact(_summary_markdown(summary), key=keys["summary"], description=state_message(summary))
    await acreate_table_artifact(
        totals.first_failures or [{"line": None, "custom_id": None, "error_type": "none", "error_message": None}],
        key=keys["failures"],
        description=f"Failed lines: the first {number(len(totals.first_failures))} of {number(totals.failed)}",
    )
    events.finished(summary)
    logger.info("Done: %s", state_message(summary))
    return summary


async def _start_shared_budget(run: DatasetRun) -> str | None:
    """With a work pool and a budget: the run's budget in Redis, for every worker's process to spend from."""
    from ..engine.shared_budget import start_shared_budget

    budget, shared = run.client.budget, run.client.shared_limiter
    if budget is None or budget.limit_usd is None or shared is None:
        return None
    budget_id = uuid.uuid4().hex
    await start_shared_budget(shared, budget_id, budget.limit_usd, budget.spent_usd)
    return budget_id


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
    storage = await resolve_storage(options.get("storage_block"))
    source: Any = table
    if not isinstance(table, (str, os.PathLike)):
        # The merge reads the table again, a batch at a time: keep an in-memory table beside the output for it.
        source = join(str(output_dir), f"{SAVED_TABLE_PREFIX}{uuid.uuid4().hex[:12]}.parquet")
        import pyarrow as pa
        import pyarrow.parquet as pq

        frame = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
        with storage.atomic_writer(source) as handle:
            pq.write_table(frame, handle)
    template = RequestTemplate(prompt, model=model, max_tokens=max_tokens, system=system, id_column=id_column)
    rendered = render_requests(source, output_dir, template, storage=storage)
    result: dict[str, Any] = await generate_dataset(
        str(rendered.requests_path),
        str(output_dir),
        settings=settings,
        input_table=str(source),
        input_columns=columns,
        **options,
    )
    return result
