"""What the command line hands the runs of its own process: the package's one process-wide registry.

A flow run's parameters are serialized (they are shown in the UI and sent to workers), so the objects the
command line owns reach its flow runs here: the stop that Ctrl-C sets, the progress bar's listeners, and a
run opened and sending before Prefect loaded (`cli._flow_run_sending_early`), which the flow run adopts
rather than opening its output a second time. A run without Prefect is handed the same objects directly
(`DatasetRun.stop`, `progress_listeners`); the data path below reads no registry. Imports no Prefect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..dataset.pipeline import DatasetRun
from ..dataset.progress import RunProgress

__all__ = ["HANDOFF", "Handoff"]


@dataclass
class Handoff:
    #: Set on Ctrl-C: shards stop admitting requests, save what finishes, and end resumable.
    stop: threading.Event = field(default_factory=threading.Event)
    #: Called on every change of a run's progress (the command line's progress bar).
    progress_listeners: list[Callable[[RunProgress], None]] = field(default_factory=list)
    #: Runs opened and sending before their flow run existed, by output location.
    opened_early: dict[str, DatasetRun] = field(default_factory=dict)


HANDOFF = Handoff()
