"""Benchmark of issue 11: engine throughput with `--schema` against without, at unlimited rate.

The emulator (its own process, the other core) answers at once with limits off, so what is measured is the
client: applying the schema to every request, sending it (the schema makes each request larger), parsing
and validating every reply against the full schema with jsonschema. Both runs are made one after the
other against the same emulator, alternating, and the best of each is kept.

    python bench/structured_outputs.py            # 5,000 requests per run, 3 runs each
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import requests
from prefect_anthropic.api.schema import OutputSchema
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, run_requests

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 60},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags"],
}


async def run(base_url: str, n: int, schema: OutputSchema | None) -> float:
    async with AnthropicClient("bench-key", base_url=base_url, max_concurrency=100, output_schema=schema) as client:
        started = time.monotonic()
        progress = await run_requests(client, requests(n, max_tokens=400))
        elapsed = time.monotonic() - started
    assert progress.succeeded == n, progress
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    schema = OutputSchema(SCHEMA)
    plain: list[float] = []
    structured: list[float] = []
    with emulator_process() as emu:
        for _ in range(args.runs):
            plain.append(asyncio.run(run(emu.base_url, args.n, None)))
            structured.append(asyncio.run(run(emu.base_url, args.n, schema)))
    best_plain, best_structured = max(plain), max(structured)
    print(f"without schema: {best_plain:,.0f} requests/s (runs: {', '.join(f'{r:,.0f}' for r in plain)})")
    print(f"with schema:    {best_structured:,.0f} requests/s (runs: {', '.join(f'{r:,.0f}' for r in structured)})")
    print(f"ratio with/without: {best_structured / best_plain:.3f}")


if __name__ == "__main__":
    main()
