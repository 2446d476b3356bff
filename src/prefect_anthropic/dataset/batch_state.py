"""What a shard sent to the Message Batches API, as typed values, and where it is kept.

A shard's batch state (`shard-NNNNN-<digest>.batches.json` in the shard store) lists its rounds; each round
the batches it created, and whether their results are downloaded. A batch is also recorded, the moment it
exists, in an object of its own beside the state (`...batch.<id>.json`): that write replaces nothing, so it
lands even for a run that lost its output, and every reader merges those records into the state
(`read_batch_state`). A batch created (so paid for) is never forgotten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..storage import Storage
from .inputs import Shard

__all__ = ["BatchRound", "BatchState", "CreatedBatch", "Creating", "batch_state_name", "read_batch_state"]

STATE_SUFFIX = ".batches.json"
RECORD_INFIX = ".batch."


def batch_state_name(shard: Shard) -> str:
    return f"shard-{shard.index:05d}-{shard.digest}{STATE_SUFFIX}"


def batch_record_name(shard: Shard, batch_id: str) -> str:
    """Where one created batch's id is recorded, beside the shard's batch state (a name no other batch has)."""
    return f"{batch_state_name(shard).removesuffix(STATE_SUFFIX)}{RECORD_INFIX}{batch_id}.json"


@dataclass
class CreatedBatch:
    id: str
    requests: int
    downloaded: bool = False


@dataclass
class Creating:
    """A create announced before it was sent: after a crash, the batch it may have made is found by these."""

    requests: int
    since: str
    token: str


@dataclass
class BatchRound:
    complete: bool = False
    batches: list[CreatedBatch] = field(default_factory=list)
    creating: Creating | None = None


@dataclass
class BatchState:
    rounds: list[BatchRound] = field(default_factory=list)

    @property
    def open_round(self) -> BatchRound | None:
        """The last round, while its results are not all collected."""
        return self.rounds[-1] if self.rounds and not self.rounds[-1].complete else None

    def unfinished(self) -> list[str]:
        """Batches of rounds not collected yet (and "a batch being created" for an announced create)."""
        found: list[str] = []
        for round_ in self.rounds:
            if not round_.complete:
                found += [batch.id for batch in round_.batches if not batch.downloaded]
                found += ["a batch being created"] if round_.creating is not None else []
        return found

    def batch_ids(self) -> list[str]:
        return [batch.id for round_ in self.rounds for batch in round_.batches]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchState:
        return cls(
            [
                BatchRound(
                    complete=bool(round_.get("complete")),
                    batches=[
                        CreatedBatch(b["id"], b["requests"], bool(b.get("downloaded"))) for b in round_["batches"]
                    ],
                    creating=Creating(**round_["creating"]) if round_.get("creating") else None,
                )
                for round_ in data.get("rounds", [])
            ]
        )

    def to_json(self) -> dict[str, Any]:
        rounds = []
        for round_ in self.rounds:
            data: dict[str, Any] = {
                "complete": round_.complete,
                "batches": [{"id": b.id, "requests": b.requests, "downloaded": b.downloaded} for b in round_.batches],
            }
            if round_.creating is not None:
                data["creating"] = {
                    "requests": round_.creating.requests,
                    "since": round_.creating.since,
                    "token": round_.creating.token,
                }
            rounds.append(data)
        return {"rounds": rounds}


def _batch_records(storage: Storage, state_location: str) -> list[dict[str, Any]]:
    """The records of the batches created for the shard whose batch state is at `state_location`."""
    directory, _, name = str(state_location).rpartition("/")  # a URL, or a POSIX path as Storage.list gives
    pattern = f"{name.removesuffix(STATE_SUFFIX)}{RECORD_INFIX}*.json"
    return [json.loads(storage.read_text(location)) for location in storage.list(directory, pattern)]


def read_batch_state(storage: Storage, state_location: str) -> BatchState:
    """A shard's batch state: its state file, with every batch created for it that the file does not name
    (its fenced write failed, or the file was lost) added to the round that created it, not downloaded yet.

    Every reader goes through here, so that a batch created (and so paid for) is never forgotten."""
    exists = storage.exists(state_location)
    state = BatchState.from_json(json.loads(storage.read_text(state_location)) if exists else {})
    known = set(state.batch_ids())
    for record in sorted(_batch_records(storage, state_location), key=lambda r: (r["round"], r.get("created", ""))):
        while len(state.rounds) <= record["round"]:
            state.rounds.append(BatchRound())
        round_ = state.rounds[record["round"]]
        if round_.creating is not None and round_.creating.token == record.get("token"):
            round_.creating = None  # the create it announced is this batch: nothing to look for
        if record["id"] not in known:
            known.add(record["id"])
            round_.batches.append(CreatedBatch(record["id"], record["requests"]))
            round_.complete = False  # its results were never collected
    return state
