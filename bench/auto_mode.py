"""Half price by a deadline (issue 22): `run --mode auto --deadline` against the emulator, as a user runs it.

Two cases, each with 300 requests at 600 requests/min (replies ~2.5 s: 0.5 s to the first token, 100 tokens at
50 tokens/s), each run as the CLI in its own process (ephemeral Prefect server included):

- fast batches (`--batch-delay-s 5`): every row from a batch; the ledger's cost / the same run in real time
  (must be 0.50);
- slow batches (`--batch-delay-s 3600`, `--deadline 3m`): the run cuts over and ends before the deadline with
  every row; rows by mode, billed requests / rows (must be 1: nothing paid twice), cost / the all-real-time
  cost, and the time used / the time allowed.

    python bench/auto_mode.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

from _common import MODEL
from prefect_anthropic.emulator import emulator_process

REQUESTS = 300
RPM = 600
KEY = "sk-ant-bench-auto"


def write_requests(path: Path) -> Path:
    with path.open("w") as handle:
        for i in range(REQUESTS):
            body = {
                "model": MODEL,
                "max_tokens": 100,
                "messages": [{"role": "user", "content": f"Question {i}: " + " ".join(["word"] * 300)}],
            }
            handle.write(json.dumps(body) + "\n")
    return path


def run(requests: Path, out: Path, base_url: str, *extra: str) -> tuple[float, int]:
    command = [
        sys.executable, "-m", "prefect_anthropic.cli", "run", str(requests), "--output-dir", str(out),
        "--base-url", base_url, "--no-progress", "--requests-per-minute", str(RPM), *extra,
    ]  # fmt: skip
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY}
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
    return started, result.returncode


def main() -> None:
    emulator = {"requests_per_minute": RPM, "ttft_ms": 500, "output_tokens_per_second": 50, "burst_seconds": 1}
    with tempfile.TemporaryDirectory() as tmp:
        requests = write_requests(Path(tmp) / "requests.jsonl")
        with emulator_process(**emulator, seed=1) as emu:
            run(requests, Path(tmp) / "realtime", emu.base_url)
            realtime_cost = emu.stats()["cost_usd"]
        print(f"{'case':<34} {'rows':>5} {'batch':>6} {'realtime':>8} {'billed/rows':>11} {'cost/realtime':>13} "
              f"{'time/allowed':>12}")  # fmt: skip
        for case, batch_delay_s, deadline_s in (
            ("fast batches, deadline 10m", 5, 600),
            ("slow batches, deadline 3m", 3600, 180),
        ):
            with emulator_process(**emulator, batch_delay_s=batch_delay_s, seed=1) as emu:
                out = Path(tmp) / f"auto-{batch_delay_s}"
                started, code = run(requests, out, emu.base_url, "--mode", "auto", "--deadline", f"{deadline_s}s",
                                    "--batch-poll-interval", "2")  # fmt: skip
                used = time.time() - started
                stats = httpx.get(f"{emu.base_url}/_emulator/stats").json()
            frame = pd.read_parquet(out / "results.parquet")
            modes = frame["mode"].value_counts().to_dict()
            complete = len(frame) == REQUESTS and frame["line"].is_unique and (frame["status"] == "succeeded").all()
            print(
                f"{case:<34} {len(frame):>5} {modes.get('batch', 0):>6} {modes.get('realtime', 0):>8} "
                f"{stats['billed_requests'] / len(frame):>11.3f} {stats['cost_usd'] / realtime_cost:>13.3f} "
                f"{used / deadline_s:>12.3f}  exit {code}, complete {complete}, "
                f"duplicates billed {stats['duplicate_billed_requests']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
