"""Benchmark (issue 14): several processes on one account, with and without the Redis-shared limiter.

Every process is a separate Python process running the engine, each configured with the account's full
requests/min limit, against one emulator that enforces that limit over 1-second buckets; Redis is a real
redis-server started here. Reported, each case measured in this one run:

- aggregate throughput / the rate-limit bound (timed at the emulator, first request to last) and the share
  of responses that were 429s, shared vs not;
- uneven shards (one process given 4x the work of each other): wall time with the shared limiter vs a
  fixed `--limit-share` of 1/3 each, and the ratio;
- Redis round trips per request and each admission's round-trip time (p50, p99), from the processes;
- (--cli) several `prefect-anthropic run` commands at once on one machine, each with its own ephemeral
  Prefect server: how many started and finished.

    python bench/distributed.py            # ~2 minutes
    python bench/distributed.py --cli 4    # and 4 CLI runs at once
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

RPM = 3000  # 50 requests a second for the account
LATENCY_MS = 200.0
PROCESSES = 3


async def _worker(base_url: str, limiter_url: str | None, share: float, start: int, n: int, key: str) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import requests
    from prefect_anthropic.engine import AnthropicClient, RateLimits, run_requests

    async with AnthropicClient(
        key,
        base_url=base_url,
        limits=RateLimits(RPM * share),
        server_limit_share=share,
        max_concurrency=100,
        limiter_url=limiter_url,
    ) as client:
        await client.check_limiter()
        started = time.monotonic()
        items = [item for i, item in enumerate(requests(start + n, words=8, max_tokens=64)) if i >= start]
        progress = await run_requests(client, items)
        elapsed = time.monotonic() - started
        shared = client.shared_limiter.summary() if client.shared_limiter is not None else None
        raw = sorted(client.shared_limiter.stats.round_trip_s) if client.shared_limiter is not None else []
    return {"succeeded": progress.succeeded, "elapsed": elapsed, "shared": shared, "round_trip_s": raw}


def run_processes(base_url: str, limiter_url: str | None, work: list[int], share: float) -> tuple[float, list[dict]]:
    key = f"sk-ant-bench-{os.urandom(4).hex()}"  # a fresh account: buckets start full
    children = []
    start = 0
    for n in work:
        args = [sys.executable, __file__, "--worker", base_url, limiter_url or "", str(share), str(start), str(n), key]
        children.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
        start += n
    began = time.monotonic()
    results = [json.loads(child.communicate()[0]) for child in children]
    return time.monotonic() - began, results


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--cli", type=int, default=0, help="Also start this many CLI runs at once.")
    parser.add_argument("--requests", type=int, default=600, help="Requests per process in the even case.")
    args = parser.parse_args()
    if args.worker:
        base_url, limiter_url, share, start, n, key = args.worker
        print(json.dumps(asyncio.run(_worker(base_url, limiter_url or None, float(share), int(start), int(n), key))))
        return

    from prefect_anthropic.emulator import emulator_process
    from prefect_anthropic.testing import redis_server

    n = args.requests
    rate = RPM / 60.0
    print(f"{PROCESSES} processes, each configured with the account's {RPM} requests/min; emulator enforces it")
    print(f"{'case':52} {'req':>5} {'bound/elapsed':>13} {'429 share':>9}")
    with redis_server() as redis_url:
        for name, limiter, share, work in (
            ("even, shared limiter", redis_url, 1.0, [n] * PROCESSES),
            ("even, each process its own limiter", None, 1.0, [n] * PROCESSES),
            ("uneven (4x on one), shared limiter", redis_url, 1.0, [4 * n // 3, n // 3, n // 3]),
            ("uneven (4x on one), --limit-share 1/3 each", None, 1 / 3, [4 * n // 3, n // 3, n // 3]),
        ):
            with emulator_process(
                requests_per_minute=RPM, burst_seconds=1, latency_ms=LATENCY_MS, latency_jitter_ms=50, seed=7
            ) as emu:
                _, results = run_processes(emu.base_url, limiter, work, share)
                ledger = emu.stats()
            total = sum(work)
            assert sum(r["succeeded"] for r in results) == total, results
            # Timed at the server, first request to last, so that starting three Python processes on two
            # cores is not counted against the limiter.
            sending = ledger["last_request_at"] - ledger["first_request_at"]
            bound = (total - 1) / rate
            responses = sum(ledger["responses_by_status"].values())
            share_429 = ledger["responses_by_status"].get("429", 0) / responses
            print(f"{name:52} {total:>5} {bound / sending:>13.3f} {share_429:>9.2%}   sending {sending:.1f} s")
            if limiter:
                trips = sum(r["shared"]["round_trips"] for r in results)
                admissions = sum(r["shared"]["admissions"] for r in results)
                times = sorted(t for r in results for t in r["round_trip_s"])
                print(
                    f"{'':52} Redis round trips per request {trips / admissions:.3f}; admission round trip "
                    f"p50 {1000 * quantile(times, 0.5):.2f} ms, p99 {1000 * quantile(times, 0.99):.2f} ms"
                )
    if args.cli:
        run_cli_at_once(args.cli)


def run_cli_at_once(count: int) -> None:
    """`count` CLI runs started together, each with its own ephemeral Prefect server (no PREFECT_API_URL)."""
    from prefect_anthropic.emulator import emulator_process

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with tempfile.TemporaryDirectory() as tmp, emulator_process(latency_ms=50, seed=9) as emu:
        commands = []
        for k in range(count):
            path = Path(tmp) / f"requests-{k}.jsonl"
            body = {"model": "claude-sonnet-4-6", "max_tokens": 16}
            lines = (json.dumps({**body, "messages": [{"role": "user", "content": f"{k}-{i}"}]}) for i in range(50))
            path.write_text("\n".join(lines) + "\n")
            commands.append([sys.executable, "-m", "prefect_anthropic.cli", "run", str(path), "--output-dir",
                             str(Path(tmp) / f"out-{k}"), "--base-url", emu.base_url, "--api-key", "sk-ant-bench",
                             "--no-progress"])  # fmt: skip
        children = [subprocess.Popen(c, env=env, stderr=subprocess.PIPE, text=True) for c in commands]
        codes = [(child.wait(), child.stderr.read() if child.stderr else "") for child in children]
    ok = sum(code == 0 for code, _ in codes)
    print(f"{count} CLI runs at once, each with its own ephemeral Prefect server: {ok} of {count} finished (exit 0)")
    for code, stderr in codes:
        if code != 0:
            print(f"  exit {code}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")


if __name__ == "__main__":
    main()
