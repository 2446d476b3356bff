"""A dataset run, step by step and free of Prefect: input -> shards -> client -> shard results -> merge.

`open_run` takes the output directory (one run at a time), opens the run's client and budget, and yields a
`DatasetRun` that does each step: plan the shards, run a shard (resumable), merge the shards into
results.parquet and results.jsonl, write the summary. The shard loop (`shard_loop.run_shards`) runs every
shard through these steps, in this process (`shard_loop.run_dataset`) or as Prefect tasks (the flow).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..api.schema import OutputSchema
from ..engine import AnthropicClient, run_requests
from ..engine.budget import Budget
from ..engine.corrections import save_token_corrections
from ..engine.records import RequestItem, ResultRecord
from ..storage import Storage, is_url, join, local_path
from .auto_mode import CutOver
from .inputs import Shard, ShardPlan, iter_requests, plan_shards
from .outputs import DatasetTotals, merge_results
from .progress import RunProgress
from .run_lock import OutputDirectoryLocked, hold_output_location
from .setup import RunSetup
from .shard_store import ShardStore, spent_in
from .tables import is_run_input, remove_stale_run_inputs

__all__ = [
    "DatasetRun",
    "ShardIncomplete",
    "open_run",
    "run_shard_requests",
    "spent_in",
]

logger = logging.getLogger("prefect_anthropic")

SUMMARY_FILE = "summary.json"

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


class ShardIncomplete(RuntimeError):
    """Some requests of the shard failed with errors worth retrying: the shard is retried and resumes."""


def check_input(requests_path: str, storage: Storage) -> None:
    """The input exists (checked once the output is held: another run's render is removed by the holder)."""
    if not storage.exists(requests_path):
        raise FileNotFoundError(f"requests file not found: {requests_path}")


def check_output(output_dir: str, storage: Storage) -> None:
    """The output location takes writes, before anything is sent."""
    probe = join(output_dir, f".write-test-{uuid.uuid4().hex}")
    try:
        storage.makedirs(output_dir)
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except OSError as exc:
        kind = "location" if is_url(output_dir) else "directory"
        raise PermissionError(f"output {kind} is not writable: {output_dir} ({exc.strerror or exc})") from exc


async def run_shard_requests(
    client: AnthropicClient,
    requests_path: str,
    shard: Shard,
    store: ShardStore,
    *,
    progress: RunProgress | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Send the shard's requests that have no final answer yet; a small summary of the shard.

    Raises ShardIncomplete when requests failed with errors worth retrying (a retry resumes with them).
    """
    finished = store.done_summary(shard)
    if finished is not None:
        if progress is not None:
            progress.mark_done(shard.index, finished["requests"])
        logger.info("Shard %d already finished in an earlier run; not sent again.", shard.index)
        return finished
    # Answers already paid for, under this layout or any other (another --shard-size): never sent again.
    done = store.answered_requests(shard, requests_path)
    if len(done):
        logger.info("Shard %d resumes: %d requests already answered.", shard.index, len(done))

    def on_record(record: ResultRecord) -> None:
        if progress is not None:
            progress.record(record)

    def on_skip(item: RequestItem) -> None:
        if progress is not None:
            progress.skipped(item.line)

    with store.writer(shard) as writer:
        outcome = await run_requests(
            client,
            iter_requests(requests_path, shard.start, shard.end, shard.first_line, store.storage),
            writer=writer,
            already_succeeded=done,
            on_record=on_record,
            on_skip=on_skip,
            on_progress=(lambda p: progress.report(shard.index, p.in_flight)) if progress is not None else None,
            stop=stop,
        )
    retryable = {kind: n for kind, n in outcome.errors_by_type.items() if kind not in PERMANENT_ERRORS}
    if retryable:
        raise ShardIncomplete(
            f"shard {shard.index}: {sum(retryable.values())} requests failed with retryable errors {retryable}; "
            "a retry resumes with them"
        )
    summary = {
        "shard": shard.index,
        "requests": outcome.done + outcome.skipped,
        "sent": outcome.done,
        "failed_permanently": outcome.failed,
    }
    if outcome.errors_by_type.get("budget_exhausted"):
        return summary  # not done: a later run with a higher budget sends the rest
    store.mark_done(shard, summary)
    logger.info(
        "Shard %d done: %d answered, %d skipped, %d failed permanently.",
        shard.index,
        outcome.done,
        outcome.skipped,
        outcome.failed,
    )
    return summary


@dataclass
class DatasetRun:
    """One run of a request file into a dataset: its options, client and progress, and its steps."""

    requests_path: str
    output_dir: str
    client: AnthropicClient
    store: ShardStore
    #: What the run was resolved from: its settings and options, key and shared limiter's URL (not printed).
    setup: RunSetup = field(repr=False)
    input_table: str | None = None
    input_columns: list[str] | None = None
    original_layout_path: str | None = None
    parquet_beside_original: bool = False
    started: float = field(default_factory=time.monotonic)
    plan: ShardPlan | None = None
    progress: RunProgress | None = None
    #: Auto mode: when the batches give way to real time.
    cutover: CutOver | None = None
    #: Set on Ctrl-C: shards stop admitting requests, save what finishes, and end resumable.
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    #: Told of every change of the run's progress (a progress bar).
    progress_listeners: list[Callable[[RunProgress], None]] = field(default_factory=list, repr=False)
    #: Batch creates go one at a time (see batch_mode.submit_batches).
    batch_create_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    #: Shards started before the tasks that run them existed (`start_sending`), by index.
    _started_early: dict[int, asyncio.Task[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def plan_shards(self) -> ShardPlan:
        if self.plan is not None:  # planned when the run started sending early
            return self.plan
        plan = self.plan = plan_shards(self.requests_path, self.setup.options.shard_size, self.store.storage)
        if plan.lines == 0:
            raise ValueError(f"requests file is empty: {self.requests_path}")
        client = self.client
        self.progress = RunProgress(
            total_requests=plan.lines,
            limits=client.limits_in_force,
            waiting=lambda: client.waiting,
            concurrency=lambda: client.concurrency()["concurrency_final"],
            extra_cost_usd=lambda: client.stats.prewarm_cost_usd,
            listeners=self.progress_listeners,
        )
        logger.info(
            "%s: %d lines in %d shards of up to %d; results in %s",
            self.requests_path,
            plan.lines,
            len(plan.shards),
            self.setup.options.shard_size,
            self.output_dir,
        )
        return plan

    async def run_shard(self, shard: Shard) -> dict[str, Any]:
        started = self._started_early.pop(shard.index, None)
        if started is not None:  # the shard's first try, under way since the run started sending
            return await started
        return await self._send(shard)

    async def _send(self, shard: Shard) -> dict[str, Any]:
        return await run_shard_requests(
            self.client, self.requests_path, shard, self.store, progress=self.progress, stop=self.stop
        )

    def start_sending(self) -> None:
        """Start the first shards now, as many as run at once, before the tasks that run them exist (a flow
        run whose Prefect is still loading): each shard's first `run_shard` then takes over its own."""
        for shard in self.plan_shards().shards[: self.setup.options.max_parallel_shards]:
            self._started_early[shard.index] = asyncio.create_task(self._send(shard))

    async def stop_sending_early(self) -> None:
        """Shards started early that no task took over (the flow run never got to them): they stop admitting,
        save the requests in flight, and end; a run of the same command resumes them."""
        if self._started_early:
            self.stop.set()
            await asyncio.gather(*self._started_early.values(), return_exceptions=True)
            self._started_early.clear()

    def merge(self) -> DatasetTotals:
        assert self.plan is not None
        schema = self.setup.settings.output_schema
        return merge_results(
            self.requests_path,
            self.plan.shards,
            self.store.records,
            self.output_dir,
            storage=self.store.storage,
            original_layout_path=self.original_layout_path,
            parquet_beside_original=self.parquet_beside_original,
            output_schema=OutputSchema(schema) if schema is not None else None,
            input_table=self.input_table,
            input_columns=self.input_columns,
        )

    def summary(self, totals: DatasetTotals) -> dict[str, Any]:
        client, progress = self.client, self.progress
        assert progress is not None
        wall_time_s = time.monotonic() - self.started
        input_total = totals.input_tokens + totals.cache_creation_input_tokens + totals.cache_read_input_tokens
        stats = client.stats
        cost = totals.cost_usd + stats.prewarm_cost_usd
        budget = client.budget
        sent = progress.sent
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
            "cost_usd_this_run": round(progress.cost_usd, 6),
            "cache_prewarm_requests": stats.prewarm_requests,
            "cache_prewarm_cost_usd": round(stats.prewarm_cost_usd, 6),
            "warnings": client.warnings + totals.warnings(),
            "budget_usd": budget.limit_usd if budget is not None else None,
            "spent_usd_by_dataset": round(budget.spent_usd, 6) if budget is not None else None,
            "stopped_by_budget": bool(budget is not None and budget.exhausted),
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
            "succeeded_by_mode": dict(totals.succeeded_by_mode),
            **(self.cutover.summary() if self.cutover is not None else {}),
            "settings": self.setup.settings.model_dump(),
            "options": self.setup.options.model_dump(),
        }

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.store.storage.write_text(join(self.output_dir, SUMMARY_FILE), json.dumps(summary, indent=2))


@contextlib.asynccontextmanager
async def open_run(
    requests_path: str,
    output_dir: str,
    setup: RunSetup,
    **run_fields: Any,
) -> AsyncIterator[DatasetRun]:
    """Hold the output directory, open the run's client (with the dataset's budget and spending journal),
    and yield the run; the client is closed and the learned token corrections are kept at the end."""
    settings, options, storage = setup.settings, setup.options, setup.storage
    check_output(output_dir, storage)
    check_input_outside_outputs(requests_path, output_dir, run_fields)
    own_inputs = [p for p in (requests_path, run_fields.get("input_table")) if p and is_run_input(p, output_dir)]
    held = contextlib.ExitStack()
    try:
        hold = held.enter_context(hold_output_location(output_dir, storage, setup.limiter_url))
    except OutputDirectoryLocked:
        for location in own_inputs:  # rendered for this run, which does not run: never left behind
            with contextlib.suppress(OSError):
                storage.remove(location)
        raise
    with held, _fenced(storage, hold.check):
        check_input(requests_path, storage)
        remove_stale_run_inputs(output_dir, own_inputs, storage)
        store = ShardStore.for_run(output_dir, options, storage)
        budget = open_budget(store, setup)
        if budget.limit_usd is not None:
            logger.info("Budget $%.4f, $%.4f spent by earlier runs.", budget.limit_usd, budget.spent_usd)
        client = AnthropicClient(
            setup.api_key, settings, budget=budget, fence=hold.ensure, limiter_url=setup.limiter_url
        )
        async with client:
            await client.check_limiter()  # a shared limiter that cannot be reached: stop before sending
            run = DatasetRun(requests_path, output_dir, client, store, setup, **run_fields)
            try:
                yield run
            finally:
                save_token_corrections(client.input_estimator.learned_ratios())


def open_budget(
    store: ShardStore, setup: RunSetup, *, on_worker: bool = False, shared_budget_id: str | None = None
) -> Budget:
    """A dataset run's budget, the one place it is made: journaled in the shard store, with what earlier runs
    of the dataset paid (or may have: a killed run's requests in flight) spent already. `on_worker`: a
    work-pool shard's, spending from the budget its parent keeps in Redis (`shared_budget_id`, given when the
    run has a limit), which every worker's process spends from; the parent read the earlier spending."""
    settings, journal = setup.settings, store.new_journal()
    if not on_worker:
        return Budget(settings.max_cost_usd, spent_usd=store.spent(), journal=journal)
    if shared_budget_id is None or settings.max_cost_usd is None:
        return Budget(None, journal=journal)
    from ..engine.shared_budget import SharedBudget  # Redis's client: loaded where a worker spends from it

    if setup.limiter_url is None:
        raise ValueError("a shared budget needs the shared limiter's Redis (--limiter-url or --limiter-block)")
    return SharedBudget.connect(setup.limiter_url, setup.api_key, shared_budget_id, settings.max_cost_usd, journal)


@contextlib.contextmanager
def _fenced(storage: Storage, check: Callable[[], None]) -> Iterator[None]:
    """Writes that replace something in the output (merged outputs, markers, the summary) check the run's hold
    first: a run that lost its output never clobbers the run that took it over."""
    previous, storage.fence = storage.fence, check
    try:
        yield
    finally:
        storage.fence = previous


#: What a run writes in its output location: an input there would be overwritten by the run's own results.
OUTPUT_FILES = ("results.parquet", "results.jsonl", SUMMARY_FILE)


def check_input_outside_outputs(requests_path: str, output_dir: str, run_fields: dict[str, Any]) -> None:
    """Refuse an input (request file or table) that is one of the files the run writes, or inside its working
    folders: the run would overwrite what it reads (last night's results.parquet as tonight's table)."""
    written = {_normalized(join(output_dir, name)) for name in OUTPUT_FILES}
    layout = run_fields.get("original_layout_path")
    if layout:
        written.add(_normalized(layout))
    working = [_normalized(join(output_dir, name)) + "/" for name in (".shards-", ".spending", ".batches")]
    for name, location in (("the request file", requests_path), ("the input table", run_fields.get("input_table"))):
        if not location:
            continue
        path = _normalized(location)
        if path in written or any(path.startswith(folder.rstrip("/")) for folder in working):
            raise ValueError(
                f"{name} {location} is one of the files this run writes in {output_dir}: it would be overwritten. "
                "Copy it elsewhere (or choose another --output-dir) and run again; nothing was sent"
            )


def _normalized(location: str) -> str:
    text = str(location)
    if is_url(text):
        return text.rstrip("/")
    return str(local_path(text).absolute().resolve())
