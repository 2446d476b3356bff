"""Benchmark 1 (issue 3): achieved throughput against the physical bound, per limiting resource.

bound = max(N / RPM, input tokens / ITPM, output tokens / OTPM) + one mean latency, with the token sums
taken from the emulator's ledger (the server's own counts). Reported: bound / elapsed (1.0 = at the limit)
and the share of requests answered 429. The emulator runs in its own process and enforces the limits
with a 1-second burst (the strictest reading of "a per-minute limit may be enforced over shorter
intervals").

    python bench/engine_throughput.py            # all cases, ~3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import requests
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, RateLimits, run_requests

LATENCY_MS = 200.0

CASES = {
    # name: (server limits, client limits factor, request shape)
    "request-bound": ({"requests_per_minute": 3000}, 1.0, {"words": 8, "max_tokens": 64}, 1500),
    "input-token-bound": ({"input_tokens_per_minute": 300_000, "requests_per_minute": 100_000}, 1.0,
                          {"words": 300, "max_tokens": 64}, 1000),
    "output-bound (max_tokens 4096, real ~60)": ({"output_tokens_per_minute": 60_000}, 1.0,
                                                 {"words": 50, "max_tokens": 4096}, 1000),
    "request-bound, configured 2x the server": ({"requests_per_minute": 3000}, 2.0,
                                                {"words": 8, "max_tokens": 64}, 1500),
}  # fmt: skip


def client_limits(server: dict, factor: float) -> RateLimits:
    return RateLimits(
        server.get("requests_per_minute", 0) * factor or None,
        server.get("input_tokens_per_minute", 0) * factor or None,
        server.get("output_tokens_per_minute", 0) * factor or None,
    )


async def run_case(base_url: str, limits: RateLimits, shape: dict, n: int):
    async with AnthropicClient("bench-key", base_url=base_url, limits=limits, max_concurrency=200) as client:
        started = time.monotonic()
        progress = await run_requests(client, requests(n, **shape))
        return time.monotonic() - started, progress


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=list(CASES), action="append")
    args = parser.parse_args()
    print(f"{'case':45} {'N':>6} {'bound s':>8} {'elapsed s':>9} {'bound/elapsed':>13} {'429 share':>9}")
    for name in args.case or CASES:
        server, factor, shape, n = CASES[name]
        with emulator_process(latency_ms=LATENCY_MS, latency_jitter_ms=100, burst_seconds=1, seed=1, **server) as emu:
            elapsed, progress = asyncio.run(run_case(emu.base_url, client_limits(server, factor), shape, n))
            ledger = emu.stats()
        input_tokens = ledger["input_tokens"] + ledger["cache_creation_input_tokens"]
        minutes = [n / server.get("requests_per_minute", float("inf"))]
        minutes.append(input_tokens / server.get("input_tokens_per_minute", float("inf")))
        minutes.append(ledger["output_tokens"] / server.get("output_tokens_per_minute", float("inf")))
        bound = 60.0 * max(minutes) + LATENCY_MS / 1000.0
        assert progress.succeeded == n, progress
        share_429 = ledger["responses_by_status"].get("429", 0) / n
        print(f"{name:45} {n:>6} {bound:>8.1f} {elapsed:>9.1f} {bound / elapsed:>13.3f} {share_429:>9.2%}")


if __name__ == "__main__":
    main()
