"""What the Prefect UI tells of a run: logs on the server, a final state that says what happened, artifacts
with a history per dataset, and events that automations can react to.

- Logs: the package's own log lines (`prefect_anthropic.*`) go to the Prefect server at INFO (or the level
  asked for) while a flow runs, whatever the terminal shows.
- The final state carries `300/303 succeeded, 3 failed, $0.0431, 42 s`; a run with failed rows is
  Completed with that message, or Failed with `fail_on_errors` (for automations keyed on states).
- Artifact keys are derived from the output location, so each dataset has its own history in the UI.
- Events: `prefect-anthropic.run.finished` (succeeded, failed, cost_usd...),
  `prefect-anthropic.budget.exhausted`, `prefect-anthropic.breaker.tripped`, `prefect-anthropic.rate-limited`
  (at most one a minute), each with the flow run as related resource.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..api.formatting import duration, money, number

__all__ = ["RowsFailed", "RunEvents", "artifact_keys", "final_state", "forward_logs", "state_message"]

PACKAGE_LOGGER = "prefect_anthropic"
EVENT_PREFIX = "prefect-anthropic"
_RATE_LIMITED_EVERY_S = 60.0


class RowsFailed(Exception):
    """A run with failed rows, with `fail_on_errors`: its flow run is Failed; `summary` is the run's summary."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def dataset_id(output_dir: str) -> str:
    """A short, stable name for a dataset's output location (lowercase letters, digits, dashes)."""
    location = output_dir if "://" in output_dir else str(Path(output_dir).resolve())
    name = re.sub(r"[^a-z0-9]+", "-", Path(location.rstrip("/")).name.lower()).strip("-")[:40] or "dataset"
    return f"{name}-{hashlib.sha256(location.encode()).hexdigest()[:8]}"


def artifact_keys(output_dir: str) -> dict[str, str]:
    """The artifact keys of a dataset: each dataset keeps its own history of runs in the UI."""
    base = f"anthropic-{dataset_id(output_dir)}"
    return {kind: f"{base}-{kind}" for kind in ("progress", "summary", "failures")}


def state_message(summary: dict[str, Any]) -> str:
    message = (
        f"{number(summary['succeeded'])}/{number(summary['requests'])} succeeded, {number(summary['failed'])} "
        f"failed, {money(summary['cost_usd'])}, {duration(summary['wall_time_s'])}"
    )
    return message + (", stopped by the budget" if summary.get("stopped_by_budget") else "")


def final_state(summary: dict[str, Any], fail_on_errors: bool) -> Any:
    """Completed with the summary as its result, or Failed when rows failed and `fail_on_errors`."""
    from prefect.states import Completed, Failed

    message = state_message(summary)
    if fail_on_errors and summary["failed"]:
        return Failed(message=message, data=RowsFailed(message, summary))
    return Completed(message=message, data=summary)


@contextlib.contextmanager
def forward_logs() -> Iterator[None]:
    """While a flow runs, the package's log lines at the configured level (INFO by default) reach the
    Prefect server, attached to the flow or task run that logged them; the terminal's own level is the
    console handler's (see the CLI)."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(PACKAGE_LOGGER)
    level = logging.getLevelName(os.environ.get("PREFECT_LOGGING_LEVEL", "INFO").upper())
    level = level if isinstance(level, int) else logging.INFO
    added = None
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        added = APILogHandler()
        logger.addHandler(added)
    previous = logger.level
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
        if added is not None:
            logger.removeHandler(added)


class RunEvents:
    """Prefect events of one run, with its flow run as related resource."""

    def __init__(self, output_dir: str) -> None:
        from prefect.runtime import flow_run

        self.resource = {
            "prefect.resource.id": f"{EVENT_PREFIX}.dataset.{dataset_id(output_dir)}",
            "prefect.resource.name": output_dir,
        }
        run_id = flow_run.get_id()
        self.related = (
            [{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"}]
            if run_id
            else []
        )
        self._emitted: set[str] = set()
        self._rate_limited_seen = 0
        self._rate_limited_at = -_RATE_LIMITED_EVERY_S

    def emit(self, name: str, payload: dict[str, Any], **labels: str) -> None:
        from prefect.events import emit_event

        resource = {**self.resource, **{f"{EVENT_PREFIX}.{key}": value for key, value in labels.items()}}
        emit_event(f"{EVENT_PREFIX}.{name}", resource=resource, related=self.related, payload=payload)

    def watch(self, client: Any) -> None:
        """Emit what happened to the client since the last look (called every few seconds and at the end)."""
        budget = client.budget
        if budget is not None and budget.exhausted and "budget" not in self._emitted:
            self._emitted.add("budget")
            self.emit(
                "budget.exhausted",
                {"budget_usd": budget.limit_usd, "spent_usd": round(budget.spent_usd, 6)},
            )
        from ..engine.errors import ServiceUnavailableError

        if isinstance(client.fatal_error, ServiceUnavailableError) and "breaker" not in self._emitted:
            self._emitted.add("breaker")
            self.emit("breaker.tripped", {"message": client.fatal_error.message})
        limited = client.stats.rate_limited
        now = time.monotonic()
        if limited > self._rate_limited_seen and now - self._rate_limited_at >= _RATE_LIMITED_EVERY_S:
            self.emit(
                "rate-limited",
                {
                    "rate_limited_responses": limited,
                    "limits": {cls: limits.as_dict() for cls, limits in client.limits_in_force().items()},
                },
            )
            self._rate_limited_seen, self._rate_limited_at = limited, now

    def finished(self, summary: dict[str, Any]) -> None:
        payload = {
            key: summary.get(key)
            for key in ("requests", "succeeded", "failed", "cost_usd", "wall_time_s", "requests_sent_this_run")
        }
        payload["failed_by_error_type"] = summary.get("failed_by_error_type", {})
        payload["stopped_by_budget"] = summary.get("stopped_by_budget", False)
        outcome = "failed-rows" if summary["failed"] else "all-succeeded"
        self.emit("run.finished", payload, outcome=outcome)
