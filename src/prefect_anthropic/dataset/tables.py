"""Dataset in, dataset out: a table and a prompt template instead of hand-written request JSONL.

A table (CSV, Parquet or JSONL of objects; in Python also a pandas DataFrame or a pyarrow Table) is read
in record batches, so memory stays flat whatever its size. Each row renders a Jinja2 template (strict: an
undefined column is an error naming the column and the row, raised before anything is sent) into the user
message, or a Python function maps the row to a prompt, a list of messages or a whole request body. The
rendered requests go to a request file in the output directory, one line per row in the table's order, and
from there through the same flow as any request file: shards, resumable tasks, merge. Resume is keyed by
the rendered request, so editing a row or the template sends only what changed. The merge puts the table's
columns back beside the result columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from jinja2 import Environment, StrictUndefined, TemplateError, UndefinedError

from ..storage import Storage, is_url, join

__all__ = [
    "TABLE_SUFFIXES",
    "PromptFunction",
    "RequestTemplate",
    "TableError",
    "iter_row_batches",
    "render_requests",
    "template_text",
]

TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl")
#: The names of the files a run writes its inputs to in the output location: rendered requests, and an in-memory
#: table saved for the merge.
RENDERED_PREFIX = "requests.from-table."
SAVED_TABLE_PREFIX = "input-table."
BATCH_ROWS = 10_000
#: A prompt: a template string, or a function of the row giving a user message, a list of messages or a body.
PromptFunction = Callable[[dict[str, Any]], "str | list[dict[str, Any]] | dict[str, Any]"]
TableSource = "str | os.PathLike[str] | pa.Table | Any"


class TableError(ValueError):
    """A table or template that cannot give requests: the message names the row and the column."""


def template_text(text_or_path: str | None, storage: Storage | None = None) -> str | None:
    """A template given inline, or the contents of the file (path or URL) it names."""
    if text_or_path is None:
        return None
    if is_url(text_or_path) and "\n" not in text_or_path:
        return (storage or Storage()).read_text(text_or_path)
    path = Path(text_or_path)
    if len(text_or_path) < 4096 and "\n" not in text_or_path and path.is_file():
        return path.read_text(encoding="utf-8")
    return text_or_path


def _jsonl_batches(path: str, handle: IO[bytes]) -> Iterator[pa.RecordBatch]:
    schema: pa.Schema | None = None
    rows: list[dict[str, Any]] = []

    def batch() -> pa.RecordBatch:
        nonlocal schema
        table = pa.Table.from_pylist(rows, schema=schema)
        schema = table.schema
        return table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=schema)

    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            # Alike in shape to storage.py's options parsing, not shared: orjson, and errors naming the line.
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise TableError(f"{path}: line {number} is not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise TableError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
            if len(rows) >= BATCH_ROWS:
                yield batch()
                rows = []
    if rows:
        yield batch()


def iter_row_batches(source: Any, storage: Storage | None = None) -> Iterator[pa.RecordBatch]:
    """The table's rows in order, a record batch at a time (a path or a URL is read as it goes)."""
    if isinstance(source, pa.Table):
        yield from source.to_batches(max_chunksize=BATCH_ROWS)
        return
    if type(source).__name__ == "DataFrame":  # pandas, without importing it here
        yield from pa.Table.from_pandas(source, preserve_index=False).to_batches(max_chunksize=BATCH_ROWS)
        return
    location = str(source)
    suffix = Path(location.split("?", 1)[0]).suffix.lower()
    if suffix not in (".parquet", ".csv", ".jsonl"):
        raise TableError(f"{location}: a table is .csv, .parquet or .jsonl, not {suffix or 'a file without suffix'}")
    storage = storage or Storage()
    if not storage.exists(location):
        raise FileNotFoundError(f"table not found: {location}")
    handle = storage.open(location, "rb")
    if suffix == ".parquet":
        with handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS)
    elif suffix == ".csv":
        with handle, pa_csv.open_csv(handle, read_options=pa_csv.ReadOptions(block_size=1 << 22)) as reader:
            yield from reader
    else:
        yield from _jsonl_batches(location, handle)


def _row_id(row: dict[str, Any]) -> str:
    return (
        "row-" + hashlib.blake2b(orjson.dumps(row, default=str, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()
    )


@dataclass(frozen=True)
class RenderedTable:
    requests_path: str
    rows: int
    columns: list[str]


@dataclass(frozen=True)
class RequestTemplate:
    """How a row becomes a request: `prompt` is a Jinja2 template of the user message (strict: an undefined
    column is an error) or of a whole request body as JSON, or a function of the row returning the user
    message, a list of messages or a body; `system` a Jinja2 template of the system prompt; `model` and
    `max_tokens` go into every request that does not set them; `id_column` gives each row's custom_id
    (default: a digest of the row)."""

    prompt: str | PromptFunction
    model: str | None = None
    max_tokens: int | None = None
    system: str | None = None
    id_column: str | None = None


class _Renderer:
    def __init__(self, template: RequestTemplate) -> None:
        environment = Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
        prompt, system = template.prompt, template.system
        self.prompt = environment.from_string(prompt) if isinstance(prompt, str) else prompt
        self.system = environment.from_string(system) if system is not None else None
        self.model = template.model
        self.max_tokens = template.max_tokens

    def _render(self, template: Any, row: dict[str, Any], index: int, what: str) -> str:
        try:
            return template.render(**row, row=row, index=index)
        except UndefinedError as exc:
            raise TableError(
                f"row {index + 1}: the {what} uses a column the table does not have ({exc.message}); columns: "
                f"{', '.join(row)}"
            ) from None
        except TemplateError as exc:
            raise TableError(f"row {index + 1}: the {what} cannot be rendered: {exc}") from None

    def body(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        if callable(self.prompt):
            produced: Any = self.prompt(row)
        else:
            produced = self._render(self.prompt, row, index, "template")
            if produced.lstrip().startswith("{"):
                # A template may render a whole request body as JSON (multi-turn, tools, ...).
                try:
                    candidate = json.loads(produced)
                except ValueError:
                    candidate = None
                if isinstance(candidate, dict) and "messages" in candidate:
                    produced = candidate
        if isinstance(produced, dict):
            body = dict(produced)
        elif isinstance(produced, list):
            body = {"messages": produced}
        else:
            body = {"messages": [{"role": "user", "content": str(produced)}]}
        if self.system is not None and "system" not in body:
            body["system"] = self._render(self.system, row, index, "system template")
        if self.model is not None:
            body.setdefault("model", self.model)
        if self.max_tokens is not None:
            body.setdefault("max_tokens", self.max_tokens)
        return body


def render_requests(
    table: Any, output_dir: str | os.PathLike[str], template: RequestTemplate, *, storage: Storage | None = None
) -> RenderedTable:
    """Render every row into a request file of this run's own in the output location (written whole before
    anything is sent, so a template error stops the run with nothing paid). Rows keep the table's order, one
    line each. The file is new (`requests.from-table.<id>.jsonl`), so rendering never touches a file another
    run is reading; the run that then holds the output removes the renders of runs that no longer run."""
    storage = storage or Storage()
    target = join(str(output_dir), f"{RENDERED_PREFIX}{uuid.uuid4().hex[:12]}.jsonl")
    renderer, id_column = _Renderer(template), template.id_column
    rows = 0
    columns: list[str] = []
    with storage.atomic_writer(target) as handle:
        for batch in iter_row_batches(table, storage):
            columns = columns or batch.schema.names
            if id_column is not None and id_column not in batch.schema.names:
                raise TableError(f"--id-column {id_column!r} is not a column of the table ({', '.join(columns)})")
            for row in batch.to_pylist():
                body = renderer.body(row, rows)
                custom_id = str(row[id_column]) if id_column is not None else _row_id(row)
                handle.write(orjson.dumps({"custom_id": custom_id, "params": body}, default=str) + b"\n")
                rows += 1
    return RenderedTable(target, rows, list(columns))


def _name(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def is_run_input(location: str, output_dir: str) -> bool:
    """Whether `location` is an input a run wrote into `output_dir` (rendered requests, a saved table)."""
    return join(str(output_dir), _name(location)) == str(location) and _name(location).startswith(
        (RENDERED_PREFIX, SAVED_TABLE_PREFIX)
    )


def remove_stale_run_inputs(output_dir: str, keep: Sequence[str | None], storage: Storage) -> None:
    """Remove the inputs written into `output_dir` by runs that no longer run (called by the run that holds
    the output: any other run that rendered meanwhile is refused the output, and removes its own)."""
    kept = {_name(location) for location in keep if location}
    for prefix in (RENDERED_PREFIX, SAVED_TABLE_PREFIX):
        for location in storage.list(str(output_dir), f"{prefix}*"):
            if _name(location) not in kept:
                storage.remove(location)


def input_column_names(table_columns: Sequence[str], result_columns: Sequence[str]) -> dict[str, str]:
    """Table column -> its name in the output: `input_<name>` where it collides with a result column."""
    taken = set(result_columns)
    return {name: f"input_{name}" if name in taken else name for name in table_columns}


class InputColumns:
    """The table's columns, row by row in the table's order, to put beside the result columns."""

    def __init__(
        self,
        source: Any,
        columns: Sequence[str] | None,
        result_columns: Sequence[str],
        storage: Storage | None = None,
    ) -> None:
        batches = iter_row_batches(source, storage)
        first = next(batches, None)
        schema = first.schema if first is not None else pa.schema([])
        names = list(columns) if columns else list(schema.names)
        missing = [name for name in names if name not in schema.names]
        if missing:
            raise TableError(f"--columns {', '.join(missing)}: not columns of the table ({', '.join(schema.names)})")
        self.renamed = input_column_names(names, result_columns)
        self.fields = [schema.field(name).with_name(self.renamed[name]) for name in names]
        self._rows = self._iter(first, batches, names)

    def _iter(
        self, first: pa.RecordBatch | None, batches: Iterator[pa.RecordBatch], names: list[str]
    ) -> Iterator[dict[str, Any]]:
        if first is None:
            return
        yield from self._rows_of(first, names)
        for batch in batches:
            yield from self._rows_of(batch, names)

    def _rows_of(self, batch: pa.RecordBatch, names: list[str]) -> Iterator[dict[str, Any]]:
        for row in batch.select(names).to_pylist():
            yield {self.renamed[name]: value for name, value in row.items()}

    def next_row(self) -> dict[str, Any]:
        row = next(self._rows, None)
        if row is None:
            raise TableError("the table has fewer rows than the request file made from it: render it again")
        return row
