"""Prefect tasks: plan the shards, run one shard, merge the shards into the dataset.

Tasks are thin: each does one step of its run (`pipeline.DatasetRun`, found by the run's key) and takes
only small parameters, never the client or the key. A shard task is resumable: a retry (by Prefect, or a
re-run of the flow) sends only the requests that have no final answer yet.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from .engine import FatalAPIError, RunStopped
from .inputs import Shard, ShardPlan
from .outputs import DatasetTotals
from .pipeline import RUNS

__all__ = ["merge_shards", "plan_request_shards", "run_shard"]


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
