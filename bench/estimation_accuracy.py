"""Benchmark 4 (issue 3): how close the input-token estimate gets to the server's count.

tiktoken's cl100k is corrected per model from each response's usage. Reported: mean absolute error of
estimated vs real input tokens over the responses after the first 50 (target <= 5%), and over the first 50.

    python bench/estimation_accuracy.py
"""

from __future__ import annotations

import asyncio
import random

from _common import MODEL
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.engine import AnthropicClient, RequestItem, run_requests

TOPICS = ["a refund for a late parcel", "the battery life of a phone", "a hotel stay in Lisbon", "a broken zipper",
          "a chemistry lesson plan", "quarterly revenue of 1,234,567 dollars", "a recipe for lentil soup"]  # fmt: skip


def items(n: int):
    rng = random.Random(5)
    for i in range(1, n + 1):
        words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(2, 40)))
        text = f"Customer message #{i}: I am writing about {words}. Please classify the intent and reply politely."
        body = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": text}]}
        yield RequestItem(line=i, custom_id=str(i), body=body)


async def run(base_url: str) -> list:
    records = []
    async with AnthropicClient("bench-key", base_url=base_url, max_concurrency=1) as client:
        await run_requests(client, items(400), on_record=records.append)
    return sorted(records, key=lambda r: r.line)


def main() -> None:
    with emulator_process() as emu:
        records = asyncio.run(run(emu.base_url))

    def mae(rs) -> float:
        return sum(abs(r.estimated_input_tokens - r.input_tokens) / r.input_tokens for r in rs) / len(rs)

    print(f"MAE first 50 responses: {mae(records[:50]):.1%}; after the first 50: {mae(records[50:]):.1%}")


if __name__ == "__main__":
    main()
