"""Issue 5 benchmark: 1,000 requests over 20 distinct cached system prompts of about 3,000 tokens (50
requests each), max concurrency 50, against the emulator (300 ms latency, so requests fired together
really overlap). Warm-up on vs off: cache writes, hit rate, cost (pre-warm requests included).

    python bench/caching.py
"""

from __future__ import annotations

import asyncio
import random

from _common import MODEL
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, RequestItem, run_requests

PROMPTS = 20
PER_PROMPT = 50


def prompt(k: int) -> str:
    sentences = (f"Policy {k}.{i}: refunds within thirty days need a receipt and the original box." for i in range(160))
    return f"You are support agent #{k}. " + " ".join(sentences)


def items():
    order = [k for k in range(PROMPTS) for _ in range(PER_PROMPT)]
    random.Random(1).shuffle(order)
    for line, k in enumerate(order, start=1):
        body = {
            "model": MODEL,
            "max_tokens": 50,
            "system": [{"type": "text", "text": prompt(k), "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": f"Customer {line}: can I return my kettle?"}],
        }
        yield RequestItem(line=line, custom_id=str(line), body=body)


async def run(base_url: str, warm: bool):
    records = []
    async with AnthropicClient("bench-key", base_url=base_url, max_concurrency=50, use_caching=warm) as client:
        await run_requests(client, items(), on_record=records.append)
    return records, client.stats


def main() -> None:
    print(f"{'warm-up':8} {'rows':>5} {'writes':>6} {'rows read':>9} {'hit rate':>8} {'cost $':>8}")
    for warm in (True, False):
        with emulator_process(latency_ms=300, latency_jitter_ms=50, seed=1) as emu:
            records, stats = asyncio.run(run(emu.base_url, warm))
            ledger = emu.stats()
        writes = sum(r.cache_creation_input_tokens > 0 for r in records) + stats.prewarm_requests
        reads = sum(r.cache_read_input_tokens > 0 for r in records)
        total_in = ledger["input_tokens"] + ledger["cache_creation_input_tokens"] + ledger["cache_read_input_tokens"]
        hit = ledger["cache_read_input_tokens"] / total_in
        assert all(r.succeeded for r in records)
        mode = "on" if warm else "off"
        print(f"{mode:8} {len(records):>5} {writes:>6} {reads:>9} {hit:>8.1%} {ledger['cost_usd']:>8.4f}")


if __name__ == "__main__":
    main()
