"""Prefect tasks: plan the shards, run one shard, merge the shards into the dataset.

Tasks are thin: each runs one step of its run (`pipeline.DatasetRun`), handed to it as a call, so a task
takes no client or key as a parameter. `as_prefect_tasks` is the shard loop's executor in a flow run: a
shard step is resumable, so a retry (by Prefect, or a re-run of the flow) sends only the requests that have
no final answer yet.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prefect import task
from prefect.assets import add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger

from ..dataset.executor import RetryPolicy
from ..dataset.inputs import Shard, ShardPlan
from ..dataset.outputs import DatasetTotals
from ..storage import is_url, local_path

__all__ = ["as_prefect_tasks", "merge_materializing", "plan_request_shards"]

T = TypeVar("T")
logger = get_logger("prefect_anthropic")

#: How each step of a shard (see dataset.executor) is named in the Prefect UI.
STEP_RUN_NAMES = {
    "run-shard": "shard-{shard.index:05d} ({shard.lines})",
    "submit-batches": "submit-shard-{shard.index:05d}",
    "wait-for-batches": "wait-shard-{shard.index:05d}",
    "download-batch-results": "download-shard-{shard.index:05d}",
}


@task(name="plan-shards", task_run_name="plan-shards", cache_policy=NO_CACHE)
def plan_request_shards(plan: Callable[[], ShardPlan]) -> ShardPlan:
    return plan()


async def _retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    try:
        await state.aresult(raise_on_failure=True)
    except BaseException as error:
        return RetryPolicy.retryable(error)  # not a bad key, no credit, a lost output, a stop asked for
    return True


@task(cache_policy=NO_CACHE, retry_condition_fn=_retry_if_retryable)
async def shard_step(shard: Shard, call: Callable[[], Awaitable[Any]]) -> Any:
    """One step of a shard; each try (a Prefect retry) resumes where the last stopped."""
    return await call()


async def as_prefect_tasks(step: str, shard: Shard, call: Callable[[], Awaitable[T]], retry: RetryPolicy) -> T:
    """The executor of a flow run: each step of a shard is a task run, retried by Prefect by the step's policy."""
    retried = shard_step.with_options(
        name=step,
        task_run_name=STEP_RUN_NAMES[step],
        retries=retry.retries,
        retry_delay_seconds=retry.delays() or 0,
        retry_jitter_factor=retry.jitter,
    )
    result: T = await retried(shard, call)
    return result


@task(name="merge-shards", task_run_name="merge-shards", cache_policy=NO_CACHE)
def merge_shards(merge: Callable[[], DatasetTotals], extra_cost_usd: float = 0.0) -> DatasetTotals:
    return merge()


def asset_key(location: str) -> str:
    """A location as a Prefect asset key: its URL (a local path as file://)."""
    return location if is_url(location) else local_path(location).resolve().as_uri()


def merge_materializing(output: str, inputs: list[str]) -> Any:
    """The merge as the task that materializes the dataset as a Prefect asset: key the output's URL,
    upstream the input's, metadata rows, succeeded, failed, cost_usd and models. A location that is no valid
    asset key (a path with a space, say) is merged all the same, without the asset."""
    try:
        key = asset_key(output)
        upstream: list[Any] = [asset_key(location) for location in inputs]
        decorate = materialize(key, by="prefect-anthropic", asset_deps=upstream, cache_policy=NO_CACHE)
    except ValueError as exc:
        logger.warning("The dataset is not recorded as a Prefect asset: %s", exc)
        return merge_shards

    def merge_and_describe(merge: Callable[[], DatasetTotals], extra_cost_usd: float = 0.0) -> DatasetTotals:
        totals = merge()
        add_asset_metadata(
            key,
            {
                "rows": totals.rows,
                "succeeded": totals.succeeded,
                "failed": totals.failed,
                "cost_usd": round(totals.cost_usd + extra_cost_usd, 6),
                "models": dict(totals.models),
            },
        )
        return totals

    return decorate(merge_and_describe).with_options(name="merge-shards", task_run_name="merge-shards")
