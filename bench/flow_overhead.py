"""Issue 4 benchmarks: the Prefect flow against the engine alone on the same input, and flow peak RSS.

Both run against one emulator process (limits off, latency 0), on a request file of N lines. Reported:
flow throughput / engine throughput (Prefect's overhead as a ratio: ephemeral server start-up, task runs,
the merge to Parquet/JSONL), and peak RSS of the process that runs the flow.

    python bench/flow_overhead.py -n 20000
    python bench/flow_overhead.py -n 1000000 --flow-only     # peak RSS of a 10^6-request flow run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MODEL, peak_rss_mib
from prefect_anthropic.emulator import emulator_process


def write_file(path: Path, n: int) -> None:
    with open(path, "w") as handle:
        for i in range(n):
            body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": f"Request {i}: hi"}]}
            handle.write(json.dumps({**body, "metadata": {"i": i}}) + "\n")


def run_engine(base_url: str, path: Path, out: Path) -> float:
    from prefect_anthropic.dataset.inputs import iter_requests
    from prefect_anthropic.engine import AnthropicClient, ResultsWriter, run_requests

    async def go() -> None:
        async with AnthropicClient("bench-key", base_url=base_url, max_concurrency=100) as client:
            with ResultsWriter(out) as writer:
                await run_requests(client, iter_requests(path), writer=writer)

    started = time.monotonic()
    asyncio.run(go())
    return time.monotonic() - started


def run_flow_process(base_url: str, path: Path, out: Path) -> tuple[float, str]:
    code = (
        "import sys, time, resource; sys.path.insert(0, 'bench')\n"
        "from prefect_anthropic.cli import run_flow\n"
        "from prefect_anthropic.settings import ClientSettings, RunOptions\n"
        "t = time.monotonic()\n"
        f"rc = run_flow({str(path)!r}, {str(out)!r}, ClientSettings(base_url={base_url!r}, max_concurrency=100),"
        " RunOptions(shard_size=5000), show_progress=False, with_prefect=True)\n"
        "print('RESULT', rc, time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    env = {**os.environ, "ANTHROPIC_API_KEY": "bench-key", "PREFECT_LOGGING_LEVEL": "WARNING"}
    out_text = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    _, rc, elapsed, rss = out_text.strip().splitlines()[-1].split()
    assert rc == "0", out_text
    return float(elapsed), f"{float(rss):,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--flow-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, emulator_process() as emu:
        path = Path(tmp) / "requests.jsonl"
        write_file(path, args.n)
        flow_elapsed, flow_rss = run_flow_process(emu.base_url, path, Path(tmp) / "flow-out")
        rate = args.n / flow_elapsed
        print(f"flow:   N={args.n:,} in {flow_elapsed:.1f} s ({rate:,.0f} requests/s), peak RSS {flow_rss}")
        if args.flow_only:
            return
        emu.reset()
        engine_elapsed = run_engine(emu.base_url, path, Path(tmp) / "engine.jsonl")
        print(
            f"engine: N={args.n:,} in {engine_elapsed:.1f} s ({args.n / engine_elapsed:,.0f} requests/s), "
            f"peak RSS {peak_rss_mib():,.0f} MiB"
        )
        print(f"flow throughput / engine throughput = {engine_elapsed / flow_elapsed:.2f}")


if __name__ == "__main__":
    main()
