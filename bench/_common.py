"""Helpers shared by the benchmarks: request generators and a resource probe."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prefect_anthropic.engine import RequestItem

MODEL = "claude-sonnet-4-6"


def requests(n: int, *, words: int = 8, max_tokens: int = 64, system: str | None = None):
    """n distinct requests, streamed (never a list: memory benchmarks rely on it)."""
    filler = " ".join(["data"] * max(0, words - 6))
    for i in range(1, n + 1):
        body = {
            "model": MODEL,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Request {i}: please answer briefly. {filler}"}],
        }
        if system is not None:
            body["system"] = system
        yield RequestItem(line=i, custom_id=f"r{i}", body=body)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
