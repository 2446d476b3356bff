"""Benchmark of issue 15: the adaptive concurrency window against a fixed one on one overloaded emulator.

The emulator (its own process) takes 20 requests at once (`--capacity 20`) and answers 529 above that,
with 200 ms of latency; the client may have 100 in flight. The same 1,000 requests are sent with the
adaptive window and with a fixed one (`--fixed-concurrency`), against a fresh ledger each time.

    python bench/adaptive_concurrency.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import httpx

from _common import requests
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, run_requests

CAPACITY = 20
LATENCY_S = 0.2


async def run(base_url: str, n: int, adaptive: bool) -> dict[str, float]:
    httpx.post(f"{base_url}/_emulator/reset")
    records = []
    async with AnthropicClient(
        "bench-key", base_url=base_url, max_concurrency=100, adaptive_concurrency=adaptive
    ) as client:
        progress = await run_requests(client, requests(n), on_record=records.append)
    stats = httpx.get(f"{base_url}/_emulator/stats").json()
    answers = sum(stats["responses_by_status"].values())
    attempts = sorted(record.attempts for record in records)
    throughput = n / (stats["last_request_at"] - stats["first_request_at"])
    return {
        "succeeded": progress.succeeded,
        "mean_attempts": statistics.mean(attempts),
        "p95_attempts": attempts[int(0.95 * len(attempts)) - 1],
        "share_529": stats["responses_by_status"].get("529", 0) / answers,
        "throughput_ratio": throughput / (CAPACITY / LATENCY_S),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1_000)
    args = parser.parse_args()
    with emulator_process(capacity=CAPACITY, latency_ms=LATENCY_S * 1000, seed=1) as emu:
        print(f"{'window':9} {'rows ok':>8} {'attempts':>9} {'p95':>4} {'529 share':>10} {'throughput/bound':>17}")
        for adaptive in (True, False):
            r = asyncio.run(run(emu.base_url, args.n, adaptive))
            print(
                f"{'adaptive' if adaptive else 'fixed':9} {r['succeeded']:>8,} {r['mean_attempts']:>9.2f} "
                f"{r['p95_attempts']:>4} {r['share_529']:>10.1%} {r['throughput_ratio']:>17.3f}"
            )


if __name__ == "__main__":
    main()
