"""Prefect tasks: plan the shards, run one shard, merge the shards into the dataset.

Tasks are thin: each does one step of its run (`pipeline.DatasetRun`, found by the run's key) and takes
only small parameters, never the client or the key. A shard task is resumable: a retry (by Prefect, or a
re-run of the flow) sends only the requests that have no final answer yet.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.assets import add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger

from ..dataset.inputs import Shard, ShardPlan
from ..dataset.outputs import DatasetTotals
from ..dataset.pipeline import RUNS
from ..engine import FatalAPIError, RunStopped
from ..storage import is_url, local_path

__all__ = ["merge_materializing", "merge_shards", "plan_request_shards", "run_shard"]

logger = get_logger("prefect_anthropic")


@task(name="plan-shards", task_run_name="plan-shards", cache_policy=NO_CACHE)
def plan_request_shards(run_key: str) -> ShardPlan:
    return RUNS[run_key].plan_shards()


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
    task_run_name="shard-{shard.index:05d} ({shard.lines})",
    retries=3,
    retry_delay_seconds=[5.0, 10.0, 20.0],
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_unless_fatal,
    cache_policy=NO_CACHE,
)
async def run_shard(run_key: str, shard: Shard) -> dict[str, Any]:
    """Send the shard's requests not yet answered; return a small summary of the shard."""
    return await RUNS[run_key].run_shard(shard)


@task(name="merge-shards", task_run_name="merge-shards", cache_policy=NO_CACHE)
def merge_shards(run_key: str) -> DatasetTotals:
    return RUNS[run_key].merge()


def asset_key(location: str) -> str:
    """A location as a Prefect asset key: its URL (a local path as file://)."""
    return location if is_url(location) else local_path(location).resolve().as_uri()


def merge_materializing(run_key: str, output: str, inputs: list[str]) -> Any:
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

    def merge_and_describe(run_key: str) -> DatasetTotals:
        totals = RUNS[run_key].merge()
        cost = totals.cost_usd + RUNS[run_key].client.stats.prewarm_cost_usd
        add_asset_metadata(
            key,
            {
                "rows": totals.rows,
                "succeeded": totals.succeeded,
                "failed": totals.failed,
                "cost_usd": round(cost, 6),
                "models": dict(totals.models),
            },
        )
        return totals

    return decorate(merge_and_describe).with_options(name="merge-shards", task_run_name="merge-shards")
