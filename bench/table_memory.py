"""Benchmark of issue 13: a large Parquet table is read in record batches, so memory stays flat.

For each N, a Parquet table of N rows (five columns, a few hundred bytes a row) is written, then a fresh
process renders every row through a Jinja2 template into the request file (`render_requests`) and streams
the table's columns back row by row as the merge does (`InputColumns`). Its peak RSS is printed: flat from
10^5 to 10^6 rows means memory does not grow with the table.

    python bench/table_memory.py 100000 1000000
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mib

TEMPLATE = "Write a product description for {{ name }} ({{ category }}, {{ price }} EUR). Notes: {{ notes }}"


def write_table(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("sku", pa.string()), ("name", pa.string()), ("category", pa.string()),
                        ("price", pa.float64()), ("notes", pa.string())])  # fmt: skip
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 50_000):
            count = min(50_000, rows - start)
            writer.write_table(
                pa.table(
                    {
                        "sku": [f"P-{i:08d}" for i in range(start, start + count)],
                        "name": [f"Product number {i}" for i in range(start, start + count)],
                        "category": [("footwear", "apparel", "outdoor")[i % 3] for i in range(start, start + count)],
                        "price": [float(i % 500) + 0.5 for i in range(start, start + count)],
                        "notes": ["lightweight, durable, tested on long trails " * 3] * count,
                    },
                    schema=schema,
                )
            )


def measure(table: str, out: str) -> None:
    from prefect_anthropic.dataset.tables import InputColumns, RequestTemplate, render_requests

    started = time.monotonic()
    rendered = render_requests(table, out, RequestTemplate(TEMPLATE, model="claude-haiku-5-5", max_tokens=200))
    columns = InputColumns(table, None, ["line", "text"])
    for _ in range(rendered.rows):
        columns.next_row()
    elapsed = time.monotonic() - started
    print(f"{rendered.rows:,} rows rendered and streamed back in {elapsed:,.1f} s, peak RSS {peak_rss_mib():,.0f} MiB")


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2], sys.argv[3])
        return
    for rows in [int(n) for n in sys.argv[1:]] or [100_000, 1_000_000]:
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "table.parquet"
            write_table(table, rows)
            result = subprocess.run([sys.executable, __file__, "--measure", str(table), str(Path(tmp) / "out")],
                                    capture_output=True, text=True, check=True)  # fmt: skip
            print(f"N={rows:>9,}: {result.stdout.strip()}")


if __name__ == "__main__":
    main()
