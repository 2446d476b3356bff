"""Where a run keeps its work: per shard its results (append-only records), a marker once it is finished,
its batch state; and the spending journals of every client that sent for the dataset.

Beside a local output directory, these are local files (`OUTPUT/.shards-N/`). Beside an output on object
storage they live in the bucket, because the container that runs a shard may vanish and the next attempt
may run on another machine: a shard's results are written to a local staging file and uploaded as
immutable parts (`shard-00001/part-<time>-<writer>.jsonl`) every `part_rows` records or `part_seconds`
seconds (RunOptions; 500 and 10 by default), whichever comes first, and when the shard ends. A shard
that starts (again, anywhere) first downloads its parts, so it resumes: a container lost mid-shard costs
at most its requests in flight and, per shard it was running, the records of its last part not yet
uploaded, which are sent again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .engine.budget import SpendingJournal, journaled_spending
from .engine.results_file import PartUploader, ResultsWriter, download_parts, read_part_records, read_records
from .inputs import Shard
from .settings import RunOptions
from .storage import Storage, is_url, join, local_path

__all__ = ["ShardStore", "spent_in"]

_DEFAULTS = RunOptions()
SPENDING_DIR = ".spending"


class ShardStore:
    """A run's working files beside its output location (a directory or a URL)."""

    def __init__(
        self,
        output: str,
        shard_size: int,
        storage: Storage | None = None,
        *,
        part_rows: int = _DEFAULTS.part_rows,
        part_seconds: float = _DEFAULTS.part_seconds,
    ) -> None:
        self.output = output
        self.storage = storage or Storage()
        self.location = join(output, f".shards-{shard_size}")
        self.remote = is_url(output)
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        if self.remote:
            self.staging = Path(tempfile.mkdtemp(prefix="prefect-anthropic-shards-"))
        else:
            self.staging = local_path(self.location)
            self.staging.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_run(cls, output: str, options: RunOptions, storage: Storage) -> ShardStore:
        """The store of a run with these RunOptions (shard size, part size)."""
        return cls(output, options.shard_size, storage, part_rows=options.part_rows, part_seconds=options.part_seconds)

    # -- results ------------------------------------------------------------------------------------------

    def _name(self, shard: Shard) -> str:
        return f"shard-{shard.index:05d}"

    def results_path(self, shard: Shard) -> Path:
        """The shard's results file on this machine (where the output is remote: its staging copy)."""
        return self.staging / f"{self._name(shard)}.jsonl"

    def prepare(self, shard: Shard) -> Path:
        """The shard's results file, brought up to date from the bucket's parts before the shard (re)starts."""
        path = self.results_path(shard)
        if self.remote:
            download_parts(self.storage, join(self.location, self._name(shard)), path)
        return path

    def writer(self, shard: Shard) -> ResultsWriter:
        """Appends to the shard's results file (call `prepare` first); where the output is remote, uploads."""
        path = self.results_path(shard)
        uploader = None
        if self.remote:
            uploader = PartUploader(
                self.storage,
                join(self.location, self._name(shard)),
                path,
                every_rows=self.part_rows,
                every_s=self.part_seconds,
            )
        return ResultsWriter(path, uploader=uploader)

    def records(self, shard: Shard) -> Iterator[dict[str, Any]]:
        """Every record the shard wrote, on any machine, in order."""
        if self.remote:
            return read_part_records(self.storage, join(self.location, self._name(shard)))
        return read_records(self.results_path(shard))

    # -- markers and small files --------------------------------------------------------------------------

    def _small(self, name: str) -> str:
        return join(self.location, name)

    def done_summary(self, shard: Shard) -> dict[str, Any] | None:
        """The marker of a finished shard (named by the shard's content digest: an edited shard runs again)."""
        location = self._small(f"{self._name(shard)}-{shard.digest}.done.json")
        if not self.storage.exists(location):
            return None
        summary: dict[str, Any] = json.loads(self.storage.read_text(location))
        return summary

    def mark_done(self, shard: Shard, summary: dict[str, Any]) -> None:
        self.storage.write_text(self._small(f"{self._name(shard)}-{shard.digest}.done.json"), json.dumps(summary))

    def read_json(self, name: str, default: Any) -> Any:
        location = self._small(name)
        return json.loads(self.storage.read_text(location)) if self.storage.exists(location) else default

    def write_json(self, name: str, data: Any) -> None:
        self.storage.write_text(self._small(name), json.dumps(data, indent=1))

    def read_text(self, name: str) -> str | None:
        location = self._small(name)
        return self.storage.read_text(location) if self.storage.exists(location) else None

    def write_text(self, name: str, text: str) -> None:
        self.storage.write_text(self._small(name), text)

    # -- spending journals ---------------------------------------------------------------------------------

    @property
    def journal_location(self) -> str:
        return join(self.output, SPENDING_DIR)

    def new_journal(self) -> SpendingJournal:
        """A spending journal for this process (uploaded as parts, every few seconds, where the output is remote)."""
        if not self.remote:
            return SpendingJournal(local_path(self.journal_location))
        return SpendingJournal(self.staging / SPENDING_DIR, storage=self.storage, remote_dir=self.journal_location)

    def spent(self) -> float:
        return spent_in(self.output, self.storage)


def spent_in(output: str, storage: Storage | None = None) -> float:
    """Dollars the dataset at `output` paid, or may have paid, over all its runs: its spending journals; for a
    dataset written before journals, what its results files record."""
    storage = storage or Storage.from_environment()
    journaled = journaled_spending(join(output, SPENDING_DIR), storage)
    if journaled is not None:
        return journaled
    paths = [] if is_url(output) else sorted(local_path(output).glob(".shards-*/shard-*.jsonl"))
    return sum(record.get("cost_usd") or 0.0 for path in paths for record in read_records(path))
