"""Merging shard results into the dataset: results.parquet and results.jsonl, one row per request, in
input order, errors included; optionally the original script's JSONL layout.

The merge walks the input again, shard by shard, so every request gets exactly one row (its last success,
else its last error) even where a shard file holds retried attempts. Files are streamed (a shard's
records at a time) and written under temporary names, then renamed: a crash never leaves a half-written
final file.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..api.models import Usage, cost_usd
from ..api.schema import OutputSchema
from ..engine.records import AnswerTotals, message_columns
from ..storage import Storage, join, local_path
from .inputs import Shard, iter_requests
from .tables import InputColumns

__all__ = ["PARQUET_SCHEMA", "DatasetTotals", "final_records", "merge_results", "parquet_schema"]

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("line", pa.int64(), nullable=False),
        pa.field("custom_id", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("model", pa.string()),
        pa.field("stop_reason", pa.string()),
        pa.field("input_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("cache_creation_input_tokens", pa.int64()),
        pa.field("cache_read_input_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("attempts", pa.int32()),
        pa.field("latency_s", pa.float64()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("request_id", pa.string()),
        pa.field("estimated_input_tokens", pa.int64()),
        pa.field("thinking_tokens", pa.int64()),
        pa.field("service_tier", pa.string()),
        pa.field("mode", pa.string()),  # "realtime" or "batch": how the request was answered (and priced)
        pa.field("speed", pa.string()),
        pa.field("inference_geo", pa.string()),
        pa.field("refusal_category", pa.string()),
        pa.field("thinking", pa.string()),
        pa.field("tool_calls", pa.string()),  # JSON text: [{"name": ..., "input": {...}}, ...]
        pa.field("content", pa.string()),  # JSON text: the reply's content blocks
        pa.field("validation_error", pa.string()),
        pa.field("metadata", pa.string()),  # JSON text: any shape, readable by every engine
    ]
)
_COLUMNS = PARQUET_SCHEMA.names
MAX_LISTED_FAILURES = 1_000
_FAILURE_COLUMNS = ("line", "custom_id", "error_type", "error_message")


def parquet_schema(output_schema: OutputSchema | None = None) -> pa.Schema:
    """The dataset's columns; with a structured-output schema, `parsed` too, typed by that schema."""
    if output_schema is None:
        return PARQUET_SCHEMA
    return PARQUET_SCHEMA.append(pa.field("parsed", output_schema.arrow_type))


@dataclass
class DatasetTotals(AnswerTotals):
    """The dataset's rows counted, and the tokens and dollars of its answers (`AnswerTotals`)."""

    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    errors_by_type: Counter[str] = field(default_factory=Counter)
    #: What the same responses would have cost with every input token at the base input price.
    cost_usd_without_cache: float = 0.0
    #: Answered rows the model table could not price (cost_usd null), by model: left out of the costs.
    unpriced_rows: Counter[str] = field(default_factory=Counter)
    #: The first failed rows (line, custom_id, error_type, error_message), for the failures artifact.
    first_failures: list[dict[str, Any]] = field(default_factory=list)
    #: Rows by the model that answered them (or was asked).
    models: Counter[str] = field(default_factory=Counter)
    #: Succeeded rows by how they were answered: "realtime" or "batch" (half price).
    succeeded_by_mode: Counter[str] = field(default_factory=Counter)

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if row["model"]:
            self.models[row["model"]] += 1
        if row["status"] == "succeeded" and row["cost_usd"] is None:
            self.unpriced_rows[row["model"] or "(no model)"] += 1
        if row["status"] != "succeeded" and row["cost_usd"]:
            self.cost_usd += row["cost_usd"]  # an errored answer that was paid for, such as a late refusal
        if row["status"] == "succeeded":
            self.succeeded += 1
            self.succeeded_by_mode[row["mode"] or "realtime"] += 1
            usage = Usage.of_counts(row)
            self.add_answer(usage, row["cost_usd"], row["estimated_input_tokens"])
            uncached = Usage(input_tokens=usage.total_input_tokens, output_tokens=usage.output_tokens)
            self.cost_usd_without_cache += cost_usd(row["model"], uncached, batch=row["mode"] == "batch") or 0.0
        else:
            self.failed += 1
            self.errors_by_type[row["error_type"] or "unknown"] += 1
            if len(self.first_failures) < MAX_LISTED_FAILURES:
                self.first_failures.append(
                    {key: row[key] for key in ("line", "custom_id", "error_type", "error_message")}
                )

    def warnings(self) -> list[str]:
        return [
            f"No price for {model}: its {rows:,} rows have cost_usd null and are left out of the cost. Add the "
            "model's prices with --models-file (the format of prefect_anthropic/api/models.toml)."
            for model, rows in sorted(self.unpriced_rows.items())
        ]


def final_records(records: Iterable[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """Each request's record that counts, by (line, request digest): its last success, else its last error."""
    final: dict[tuple[int, str], dict[str, Any]] = {}
    for record in records:
        key = (int(record["line"]), record.get("request_digest") or "")
        previous = final.get(key)
        if previous is None or record.get("status") == "succeeded" or previous.get("status") != "succeeded":
            final[key] = record
    return final


def _row(record: dict[str, Any], output_schema: OutputSchema | None) -> dict[str, Any]:
    row = {name: record.get(name) for name in _COLUMNS}
    row["mode"] = record.get("mode") or "realtime"  # records written before the column existed
    row.update(message_columns(record.get("response")))
    metadata = record.get("metadata")
    row["metadata"] = None if metadata is None else orjson.dumps(metadata).decode()
    if output_schema is not None:
        row["parsed"] = record.get("parsed") if record.get("status") == "succeeded" else None
    return row


def _missing(line: int, custom_id: str, metadata: Any) -> dict[str, Any]:
    return {
        "line": line,
        "custom_id": custom_id,
        "status": "errored",
        "error_type": "not_processed",
        "error_message": f"line {line}: no result was recorded for this request",
        "metadata": metadata,
        "attempts": 0,
    }


def _original_layout_row(body: dict[str, Any], record: dict[str, Any], metadata: Any) -> bytes:
    """The original script's line: [request, response(, metadata)]; a failure lists its errors instead."""
    if record.get("status") == "succeeded" and record.get("response") is not None:
        answer: Any = record["response"]
    else:
        answer = record.get("errors") or [record.get("error_message")]
    row = [body, answer] if metadata is None else [body, answer, metadata]
    return orjson.dumps(row) + b"\n"


def merge_results(
    requests_path: str,
    shards: Iterable[Shard],
    records_of: Callable[[Shard], Iterable[dict[str, Any]]],
    output_dir: str,
    *,
    storage: Storage | None = None,
    original_layout_path: str | None = None,
    parquet_beside_original: bool = False,
    output_schema: OutputSchema | None = None,
    input_table: str | None = None,
    input_columns: Sequence[str] | None = None,
) -> DatasetTotals:
    """Write results.jsonl and results.parquet at `output_dir`, a path or a URL (or, for the drop-in script,
    the original layout at `original_layout_path` with the Parquet file beside it). `records_of(shard)` gives
    the records a shard wrote. With `input_table` (the table the request file was rendered from, one line
    per row), the table's columns come first in every row, `input_<name>` where a name is a result column's.
    Each file is written whole or not at all (see `Storage.atomic_writer`)."""
    storage = storage or Storage()
    if original_layout_path is not None and parquet_beside_original:
        original = local_path(original_layout_path)
        targets = {"parquet": str(original.with_suffix(".parquet")), "original": str(original)}
    else:
        targets = {"parquet": join(output_dir, "results.parquet"), "jsonl": join(output_dir, "results.jsonl")}
        if original_layout_path is not None:
            targets["original"] = original_layout_path
    totals = DatasetTotals()
    schema = parquet_schema(output_schema)
    inputs = InputColumns(input_table, input_columns, schema.names, storage) if input_table is not None else None
    if inputs is not None:
        schema = pa.schema([*inputs.fields, *schema])
    with contextlib.ExitStack() as files:
        handles = {kind: files.enter_context(storage.atomic_writer(target)) for kind, target in targets.items()}
        jsonl, original_file = handles.get("jsonl"), handles.get("original")
        writer = pq.ParquetWriter(handles["parquet"], schema, compression="zstd")
        try:
            for shard in shards:
                records = final_records(records_of(shard))
                rows = []
                for item in iter_requests(requests_path, shard.start, shard.end, shard.first_line, storage):
                    record = records.get((item.line, item.digest)) or _missing(item.line, item.custom_id, item.metadata)
                    row = _row(record, output_schema)
                    totals.add(row)
                    if inputs is not None:
                        row = {**inputs.next_row(), **row}
                    if jsonl is not None:
                        jsonl.write(orjson.dumps({**row, "metadata": record.get("metadata")}, default=str) + b"\n")
                    if output_schema is not None:
                        row["parsed"] = output_schema.column_value(row["parsed"])
                    rows.append(row)
                    if original_file is not None:
                        original_file.write(_original_layout_row(item.body, record, item.metadata))
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        finally:
            writer.close()
    return totals
