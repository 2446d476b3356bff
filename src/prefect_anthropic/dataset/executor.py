"""How a shard's steps are run: the retry policy, declared once, and the executor that applies it.

The shard loop (`shard_loop.run_shards`) decides what each shard does (batches, then real time) and hands
every step to an executor: in this process (`in_process`, a plain loop over the policy's delays), as
Prefect tasks (`orchestration.tasks.as_prefect_tasks`, whose task runs retry by the same policy and show
each try in the UI), or as child flow runs on a work pool (`orchestration.fanout.PoolExecutor`). A step is
a coroutine function of nothing: it can be called again, and each call resumes where the last one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..engine import FatalAPIError, RunStopped
from .inputs import Shard

__all__ = ["BATCH_STEP_RETRY", "Executor", "NotRetryable", "RetryPolicy", "in_process"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


class NotRetryable(Exception):
    """Another try cannot help (what the user must do is in the message)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Tries after the first, and the backoff between them: `delay_s`, doubled each try, jittered by
    +/- jitter/2 of itself."""

    retries: int
    delay_s: float
    jitter: float = 0.5

    def delays(self) -> list[float]:
        return [self.delay_s * 2**n for n in range(self.retries)]

    @staticmethod
    def retryable(error: BaseException) -> bool:
        """A fatal answer (a bad key, no credit, a lost output), a stop asked for, or an error that says what to
        do first end the shard at once; anything else is tried again (each try resumes)."""
        return isinstance(error, Exception) and not isinstance(error, (FatalAPIError, RunStopped, NotRetryable))

    async def run(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        delays = self.delays()
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except Exception as error:
                if attempt == self.retries or not self.retryable(error):
                    raise
                delay = delays[attempt] * (1 + self.jitter * (random.random() - 0.5))
                logger.info("Retrying %s in %.1f s: %s", what, delay, error)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


#: Submitting, polling and downloading batches: each step finds where the last try stopped.
BATCH_STEP_RETRY = RetryPolicy(retries=2, delay_s=1.0)


class Executor(Protocol):
    """Runs one step of a shard (named as Prefect shows it: run-shard, submit-batches, wait-for-batches,
    download-batch-results), trying again by `retry`."""

    async def __call__(self, step: str, shard: Shard, call: Callable[[], Awaitable[T]], retry: RetryPolicy) -> T: ...


async def in_process(step: str, shard: Shard, call: Callable[[], Awaitable[T]], retry: RetryPolicy) -> T:
    return await retry.run(call, f"{step} of shard {shard.index}")
