"""Benchmarks 2 and 3 (issue 3): client overhead and memory.

With limits off and zero latency, the emulator (its own process, the other core) answers at once, so the
rate measured is what the client itself can push: requests/second and CPU microseconds per request (this
process's CPU time only). Peak RSS is measured for growing N on a streamed input: flat means memory does
not grow with the input.

    python bench/engine_overhead.py                       # 20,000 requests: rate and CPU
    python bench/engine_overhead.py --memory 100000 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mib, requests
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, ResultsWriter, run_requests


async def run(base_url: str, n: int, results: Path) -> tuple[float, float]:
    async with AnthropicClient("bench-key", base_url=base_url, max_concurrency=100) as client:
        started, cpu = time.monotonic(), time.process_time()
        with ResultsWriter(results) as writer:
            progress = await run_requests(client, requests(n), writer=writer)
        assert progress.succeeded == n
        return time.monotonic() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--memory", type=int, nargs="*", help="measure peak RSS for each N (one process each)")
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop (as the CLI can)")
    args = parser.parse_args()
    runner = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    with emulator_process() as emu, tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            import subprocess
            import sys

            for n in args.memory:
                out = subprocess.run(
                    [sys.executable, __file__, "-n", str(n)], capture_output=True, text=True, check=True
                ).stdout
                print(f"N={n:>9,}: {out.strip()}")
            return
        elapsed, cpu = runner(run(emu.base_url, args.n, Path(tmp) / "results.jsonl"))
        print(
            f"{args.n / elapsed:,.0f} requests/s, {cpu / args.n * 1e6:,.0f} CPU us/request, "
            f"peak RSS {peak_rss_mib():,.0f} MiB"
        )


if __name__ == "__main__":
    main()
