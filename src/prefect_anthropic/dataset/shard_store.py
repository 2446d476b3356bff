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

Results are found by request, not by layout: a run whose shards are cut otherwise (another `--shard-size`)
brings, when it prepares a shard, the final answers other layouts (`.shards-M/`) hold for the shard's lines
into the shard's own results (`copy_of` names where they came from), so nothing paid for is sent again, and
skip, progress and merge need no other place to look. Each shard of another layout is read once per run.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from ..engine.budget import SpendingJournal, journaled_spending
from ..engine.results_file import (
    PartUploader,
    ResultsWriter,
    download_parts,
    is_final,
    read_part_records,
    read_records,
)
from ..settings import RunOptions
from ..storage import Storage, is_url, join, local_path
from .batch_state import BatchState
from .inputs import Shard, iter_requests

__all__ = ["ShardStore", "spent_in"]

_DEFAULTS = RunOptions()
logger = logging.getLogger("prefect_anthropic")
SPENDING_DIR = ".spending"
#: The field a record copied from another layout carries: that layout's folder (the request was paid there).
COPY_OF = "copy_of"
_LAYOUT = re.compile(r"\.shards-(\d+)$")
_BATCH_STATE = re.compile(r"shard-(\d+)-[^/]*\.batches\.json$")
#: A final record of another layout, ready to copy: (succeeded, the record as JSON with COPY_OF).
_Copy = tuple[bool, bytes]


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
        self.shard_size = shard_size
        self.layout = f".shards-{shard_size}"
        self.location = join(output, self.layout)
        self.remote = is_url(output)
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        if self.remote:
            self.staging = Path(tempfile.mkdtemp(prefix="prefect-anthropic-shards-"))
        else:
            self.staging = local_path(self.location)
            self.staging.mkdir(parents=True, exist_ok=True)
        self._other_layouts: list[tuple[str, int]] | None = None
        self._read: OrderedDict[tuple[str, int], dict[tuple[int, str], _Copy]] = OrderedDict()
        self._read_lock = threading.Lock()
        self._other_batches: list[tuple[str, int, int, list[str]]] | None = None

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
        """The shard's results file, brought up to date before the shard (re)starts: from the bucket's parts, and
        with the final answers that other layouts of the dataset hold for its lines (see `adopt`)."""
        path = self.results_path(shard)
        if self.remote:
            download_parts(self.storage, join(self.location, self._name(shard)), path)
        self.adopt(shard, path)
        return path

    def answered_requests(self, shard: Shard, requests_path: str) -> dict[int, str]:
        """Prepare the shard; its lines that have a final answer, with the request digest answered.

        A line answered for several digests (the input was edited, and answers came from several layouts) is
        resolved against the input as it is now: its line counts as answered only for the request it holds."""
        answered: dict[int, set[str]] = {}
        for record in read_records(self.prepare(shard)):
            if is_final(record):
                answered.setdefault(int(record["line"]), set()).add(record.get("request_digest") or "")
        done = {line: next(iter(digests)) for line, digests in answered.items() if len(digests) == 1}
        several = {line: digests for line, digests in answered.items() if len(digests) > 1}
        if several:
            for item in iter_requests(requests_path, shard.start, shard.end, shard.first_line, self.storage):
                digests = several.get(item.line)
                if digests is not None and (item.digest in digests or "" in digests):
                    done[item.line] = item.digest if item.digest in digests else ""
        return done

    # -- answers written under other layouts ---------------------------------------------------------------

    def other_layouts(self) -> list[tuple[str, int]]:
        """The other layouts at the output (folder name, shard size), looked up once per run (the output is held:
        no other run adds one meanwhile)."""
        if self._other_layouts is None:
            found = []
            for location in self.storage.list(self.output, ".shards-*"):
                match = _LAYOUT.search(str(location).rstrip("/"))
                if match is not None and int(match.group(1)) != self.shard_size and int(match.group(1)) > 0:
                    found.append((f".shards-{match.group(1)}", int(match.group(1))))
            self._other_layouts = sorted(found, key=lambda layout: layout[1])
        return self._other_layouts

    def adopt(self, shard: Shard, path: Path) -> int:
        """Copy into the shard's results file (`path`, prepared) the final answers of other layouts for the
        shard's lines that it does not hold yet (same line and request digest); the number copied. Where the
        output is remote, the copies are uploaded as a part of the shard's too. Copies of copies are fine: each
        answer is copied into a layout at most once, whatever runs alternate."""
        layouts = self.other_layouts()
        if not layouts or shard.line_count <= 0:
            return 0
        first, last = shard.first_line, shard.first_line + shard.line_count - 1
        held = {
            (int(record["line"]), record.get("request_digest") or "")
            for record in read_records(path)
            if is_final(record)
        }
        found: dict[tuple[int, str], _Copy] = {}
        for layout, size in layouts:
            for index in range((first - 1) // size, (last - 1) // size + 1):
                for key, copy in self._finals_of(layout, size, index).items():
                    if first <= key[0] <= last and key not in held:
                        previous = found.get(key)
                        if previous is None or (copy[0] and not previous[0]):
                            found[key] = copy
        if not found:
            return 0
        uploader = None
        if self.remote:
            remote_dir = join(self.location, self._name(shard))
            uploader = PartUploader(self.storage, remote_dir, path, every_rows=len(found) + 1, every_s=float("inf"))
        with ResultsWriter(path, uploader=uploader) as writer:
            for _key, (_succeeded, raw) in sorted(found.items()):
                writer.write(orjson.loads(raw))
        logger.info(
            "Shard %d (%s): %d answers found under another --shard-size (%s); not sent again.",
            shard.index,
            shard.lines,
            len(found),
            ", ".join(layout for layout, _size in layouts),
        )
        return len(found)

    def unfinished_batches_of_other_layouts(self, shard: Shard) -> list[tuple[str, str]]:
        """Batches created under other layouts for the shard's lines whose results were not collected yet, as
        (layout, batch id or "a batch being created"): they are paid, and their answers land in that layout's
        shards only when a run with its shard size downloads them. The states are read once per run."""
        if self._other_batches is None:
            self._other_batches = []
            for layout, size in self.other_layouts():
                for location in self.storage.list(join(self.output, layout), "shard-*.batches.json"):
                    match = _BATCH_STATE.search(str(location))
                    if match is None:
                        continue
                    unfinished = BatchState.from_json(json.loads(self.storage.read_text(location))).unfinished()
                    if unfinished:
                        index = int(match.group(1))
                        self._other_batches.append((layout, index * size + 1, (index + 1) * size, unfinished))
        first, last = shard.first_line, shard.first_line + shard.line_count - 1
        return [
            (layout, batch)
            for layout, start, end, batches in self._other_batches
            if start <= last and end >= first
            for batch in batches
        ]

    def _finals_of(self, layout: str, size: int, index: int) -> dict[tuple[int, str], _Copy]:
        """The final records of shard `index` of another layout, by (line, digest), as copies (serialized:
        compact while kept). Read once while the shards of this run that overlap it prepare: shards prepare
        about in order, so two per layout stay read."""
        key = (layout, index)
        with self._read_lock:
            if key in self._read:
                self._read.move_to_end(key)
                return self._read[key]
            finals: dict[tuple[int, str], _Copy] = {}
            for record in self._records_of_layout(layout, index):
                if not is_final(record):
                    continue
                line_key = (int(record["line"]), record.get("request_digest") or "")
                succeeded = record.get("status") == "succeeded"
                previous = finals.get(line_key)
                if previous is None or (succeeded and not previous[0]):
                    record[COPY_OF] = record.get(COPY_OF) or layout
                    finals[line_key] = (succeeded, orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY))
            self._read[key] = finals
            while len(self._read) > 2 * len(self.other_layouts()):
                self._read.popitem(last=False)
            return finals

    def _records_of_layout(self, layout: str, index: int) -> Iterable[dict[str, Any]]:
        name = f"shard-{index:05d}"
        if self.remote:
            return read_part_records(self.storage, join(self.output, layout, name))
        return read_records(local_path(join(self.output, layout)) / f"{name}.jsonl")

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
        """A spending journal for this process: a file, or where the output is remote, parts in the bucket, each
        reservation written there before its request is sent."""
        if not self.remote:
            return SpendingJournal(local_path(self.journal_location))
        return SpendingJournal(storage=self.storage, remote_dir=self.journal_location)

    def spent(self) -> float:
        return spent_in(self.output, self.storage)


def spent_in(output: str, storage: Storage | None = None) -> float:
    """Dollars the dataset at `output` paid, or may have paid, over all its runs: its spending journals; for a
    dataset written before journals, what its results files record."""
    storage = storage or Storage()
    journaled = journaled_spending(join(output, SPENDING_DIR), storage)
    if journaled is not None:
        return journaled
    paths = [] if is_url(output) else sorted(local_path(output).glob(".shards-*/shard-*.jsonl"))
    return sum(
        record.get("cost_usd") or 0.0
        for path in paths
        for record in read_records(path)
        if COPY_OF not in record  # paid once, under the layout it was copied from
    )
