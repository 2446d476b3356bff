"""Throughput against the limits whatever the replies (issue 19): a matrix of reply times x background 529s x
the limit that binds, plus a gateway that takes 20 in flight, with the default window and a fixed one.

The client is given the account's limits, as a user gives them (`--requests-per-minute`,
`--output-tokens-per-minute`); the gateway cells have none. Replies take as long as Claude's: a time to
first token plus output tokens at 50 tokens a second (the
emulator's `--ttft-ms` and `--output-tokens-per-second`); every request's reply is cut at `max_tokens`, so
its length, and its time, are known. The emulator (its own process) enforces the limit over 1-second
buckets. Throughput is timed at the emulator, from the first request it admitted to the last; the bound
is the rate the binding limit allows (20 requests a second) or, for a gateway, 20 / reply time.

    python bench/throughput_matrix.py            # every cell, default and --fixed-concurrency (~25 min)
    python bench/throughput_matrix.py --quick    # the 2 s and 10 s rows only
    python bench/throughput_matrix.py --scale    # 2,000 and 5,000 in flight (30 s replies), with peak RSS
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from dataclasses import dataclass

import httpx

from _common import MODEL
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, RequestItem, run_requests

TOKENS_PER_SECOND = 50.0
RATE = 20.0  # requests a second the binding limit allows
WORDS = " ".join(f"w{i % 10}" for i in range(4_000))  # long enough that every reply is cut at max_tokens


@dataclass(frozen=True)
class Cell:
    reply_s: float
    share_529: float = 0.0
    bound_by: str = "requests"  # "requests", "output" or "gateway-503" / "capacity-529"
    requests: int = 300
    rate: float = RATE  # requests a second the binding limit allows

    @property
    def ttft_ms(self) -> float:
        return min(500.0, self.reply_s * 500.0)

    @property
    def max_tokens(self) -> int:
        return max(1, round((self.reply_s - self.ttft_ms / 1000) * TOKENS_PER_SECOND))

    def emulator_options(self) -> dict[str, object]:
        options: dict[str, object] = {
            "ttft_ms": self.ttft_ms,
            "output_tokens_per_second": TOKENS_PER_SECOND,
            "error_rate_529": self.share_529,
            "burst_seconds": 1.0,
            "seed": 7,
        }
        if self.bound_by == "requests":
            options["requests_per_minute"] = self.rate * 60
        elif self.bound_by == "output":
            options["requests_per_minute"] = 2 * self.rate * 60
            options["output_tokens_per_minute"] = self.rate * 60 * self.max_tokens
        else:
            options["capacity"] = 20
            options["capacity_status"] = 503 if self.bound_by == "gateway-503" else 529
        return options

    def client_limits(self) -> dict[str, float]:
        """The account's limits, as a user gives them (--requests-per-minute, --output-tokens-per-minute)."""
        options = self.emulator_options()
        return {
            name: float(options[name])  # type: ignore[arg-type]
            for name in ("requests_per_minute", "output_tokens_per_minute")
            if name in options
        }

    def bound(self) -> float:
        """Requests a second the limit (or 20 in flight at the gateway) allows."""
        return 20 / self.reply_s if self.bound_by in ("gateway-503", "capacity-529") else self.rate

    def label(self) -> str:
        return f"{self.reply_s:>4g} s  529 {self.share_529:>3.0%}  {self.bound_by:<12}"


def items(cell: Cell) -> list[RequestItem]:
    body = {"model": MODEL, "max_tokens": cell.max_tokens}
    return [
        RequestItem(line=i, custom_id=str(i), body={**body, "messages": [{"role": "user", "content": f"{i} {WORDS}"}]})
        for i in range(1, cell.requests + 1)
    ]


async def measure(base_url: str, cell: Cell, fixed: bool) -> dict[str, float]:
    httpx.post(f"{base_url}/_emulator/reset")
    records = []
    options: dict[str, object] = {**cell.client_limits()}
    if fixed:
        options.update(adaptive_concurrency=False, max_concurrency=400)
    cpu = time.process_time()
    async with AnthropicClient("bench-key", base_url=base_url, **options) as client:
        await run_requests(client, items(cell), on_record=records.append)
    cpu = time.process_time() - cpu
    stats = httpx.get(f"{base_url}/_emulator/stats").json()
    by_status = stats["responses_by_status"]
    answers = sum(by_status.values())
    attempts = sorted(record.attempts for record in records)
    sending = stats["last_arrival_at"] - stats["first_arrival_at"]
    return {
        "ratio": (cell.requests - 1) / sending / cell.bound() if sending > 0 else float("nan"),
        "share_429": by_status.get("429", 0) / answers,
        "share_overload": (by_status.get("529", 0) + by_status.get("503", 0)) / answers,
        "p95_attempts": attempts[int(0.95 * len(attempts)) - 1],
        "peak_in_flight": stats["max_in_flight"],
        "failed": sum(not record.succeeded for record in records),
        "cpu_ms_per_request": 1000 * cpu / cell.requests,
    }


def cells(quick: bool, scale: bool) -> list[Cell]:
    if scale:
        # 4,000 requests a minute of 30 s replies needs 2,000 in flight; the Scale tier's 10,000, 5,000.
        return [
            Cell(30.0, 0.0, "requests", requests=1_600, rate=4_000 / 60),
            Cell(30.0, 0.0, "requests", requests=3_400, rate=10_000 / 60),
        ]
    replies = (2.0, 10.0) if quick else (0.2, 2.0, 10.0, 30.0)
    shares, bounds = (0.0, 0.02, 0.05), ("requests", "output")
    matrix = [Cell(reply, share, bound) for reply in replies for share in shares for bound in bounds]
    return [*matrix, Cell(2.0, 0.0, "gateway-503", requests=400), Cell(2.0, 0.0, "capacity-529", requests=400)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--default-only", action="store_true")
    args = parser.parse_args()
    print(f"{'cell':<30} {'window':<8} {'of bound':>8} {'429s':>6} {'overload':>8} {'p95 att':>7} "
          f"{'peak':>5} {'failed':>6} {'cpu ms/req':>10} {'RSS MiB':>7}")  # fmt: skip
    for cell in cells(args.quick, args.scale):
        with emulator_process(**cell.emulator_options()) as emu:
            for fixed in (False,) if args.default_only or args.scale else (False, True):
                r = asyncio.run(measure(emu.base_url, cell, fixed))
                print(
                    f"{cell.label():<30} {'fixed' if fixed else 'default':<8} {r['ratio']:>8.3f} "
                    f"{r['share_429']:>6.2%} {r['share_overload']:>8.2%} {r['p95_attempts']:>7} "
                    f"{r['peak_in_flight']:>5} {r['failed']:>6} {r['cpu_ms_per_request']:>10.2f} "
                    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>7.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
