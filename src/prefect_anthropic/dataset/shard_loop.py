"""The shard loop: every shard of a run, to its end, in plain asyncio.

For each shard: in batch and auto mode its batches first (they cost no rate limit, so every shard's run at
once), then real time for what has no final answer (in real-time mode, all of it), `max_parallel_shards`
shards at a time, each step handed to an executor that retries it by the run's policy (`executor`). The
same loop runs in this process (`run_dataset`) and in the Prefect flow (its executor makes each step a
task); a work pool's executor is the fan-out of child flow runs (`orchestration.fanout`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..engine import FatalAPIError, RunStopped
from ..engine.results_file import is_final
from ..settings import ClientSettings, RunOptions
from ..storage import Storage
from .auto_mode import CutOver
from .batch_mode import has_batch_state, run_shard_in_batches
from .executor import Executor, RetryPolicy, in_process
from .inputs import Shard
from .outputs import final_records
from .pipeline import DatasetRun, ShardIncomplete, open_run
from .setup import RunSetup

__all__ = ["plan_cutover", "raise_first_error", "run_dataset", "run_shards", "run_with_setup", "shard_retry_policy"]

logger = logging.getLogger(__name__)


def shard_retry_policy(options: RunOptions) -> RetryPolicy:
    return RetryPolicy(retries=options.shard_retries, delay_s=options.shard_retry_delay_s)


async def run_shards(run: DatasetRun, execute: Executor = in_process) -> None:
    """Run every shard of the (planned) run; raise what stops the run once every shard has ended."""
    options, plan, tracker = run.setup.options, run.plan, run.progress
    assert plan is not None and tracker is not None, "plan the shards first (DatasetRun.plan_shards)"
    if options.mode == "auto":
        run.cutover = plan_cutover(run)
        tracker.phase, tracker.phase_detail = run.cutover.short, run.cutover.describe
        log = logger.warning if run.cutover.late else logger.info
        log("Auto mode: %s.", run.cutover.describe())
    gate = asyncio.Semaphore(options.max_parallel_shards)
    policy = shard_retry_policy(options)
    budget = run.client.budget

    async def one(shard: Shard) -> None:
        if options.mode != "realtime" and run.store.done_summary(shard) is None:
            left = await run_shard_in_batches(run, shard, execute)
            # Auto mode leaves the shard to real time, which sends what has no answer and marks it done.
            if options.mode == "batch" and not left and not (budget is not None and budget.exhausted):
                run.store.mark_done(shard, {"shard": shard.index, "requests": shard.line_count})
        async with gate:
            try:
                # Real-time mode, or what batch mode left for it: sends only the lines not yet answered.
                await execute("run-shard", shard, lambda: run.run_shard(shard), policy)
            except ShardIncomplete as error:  # its failed rows are in the dataset as errors
                logger.warning(
                    "Shard %d (%s) ended with failures after its retries: %s", shard.index, shard.lines, error
                )

    raise_first_error(await asyncio.gather(*(one(shard) for shard in plan.shards), return_exceptions=True))


def plan_cutover(run: DatasetRun) -> CutOver:
    """Auto mode's plan: real time's need for the requests without an answer yet, against the deadline
    (DeadlineInfeasible when even real time from now would be late)."""
    from .estimate import estimate_file

    assert run.plan is not None
    options, store = run.setup.options, run.store
    remaining = {}
    resumed = False
    for shard in run.plan.shards:
        if store.done_summary(shard) is not None:
            resumed = True
            continue
        records = final_records(store.records(shard)).values()
        answered = sum(1 for record in records if is_final(record))
        remaining[shard.index] = max(0, shard.line_count - answered)
        resumed |= bool(records) or has_batch_state(store, shard)
    estimate = estimate_file(run.requests_path, run.setup.settings, storage=run.store.storage)
    return CutOver.plan(
        options.deadline or "",
        estimate,
        margin=options.deadline_margin,
        slack_s=options.deadline_slack_s,
        remaining=remaining,
        resumed=resumed,
    )


def raise_first_error(outcomes: list[Any]) -> None:
    """After every shard has ended: what stops the run (a fatal answer, a stop) first, else any error."""
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    for error in errors:
        if isinstance(error, (FatalAPIError, RunStopped)):
            raise error
    if errors:
        raise errors[0]


async def run_dataset(
    requests_path: str,
    output_dir: str,
    settings: ClientSettings,
    api_key: str,
    options: RunOptions | None = None,
    *,
    storage: Storage | None = None,
    **run_fields: Any,
) -> dict[str, Any]:
    """The whole run with plain asyncio, no Prefect, in any mode: the same steps and outputs as the flow. The
    settings, options, key and storage are taken as given (the key from ANTHROPIC_API_KEY when empty), the
    storage options and the shared limiter's URL otherwise from the environment (`RunSetup.resolve`)."""
    setup = RunSetup.resolve(settings, options, api_key=api_key, storage=storage)
    return await run_with_setup(requests_path, output_dir, setup, **run_fields)


async def run_with_setup(requests_path: str, output_dir: str, setup: RunSetup, **run_fields: Any) -> dict[str, Any]:
    """`run_dataset` with its configuration resolved already (`orchestration.edge.resolve_run`)."""
    setup.check()
    if setup.options.work_pool:
        raise ValueError("--work-pool runs shards as Prefect flow runs: it needs a Prefect server")
    async with open_run(requests_path, output_dir, setup, **run_fields) as run:
        run.plan_shards()
        await run_shards(run)
        summary = run.summary(run.merge())
        run.write_summary(summary)
        return summary
