"""Throughput with outputs on object storage (issue 20): a dataset written to s3:// runs at least 0.97 of the
same run written to a local directory.

The same request file (N requests, several shards) is run with `run_dataset` (no Prefect) into a fresh local
temporary directory and into a fresh prefix of a bucket on a real S3 API on loopback (moto's standalone
server, spoken to over HTTP by s3fs, as the tests do), interleaved (local, s3, local, s3, ...) so that drift
of the machine cancels. With the output on s3://, each shard's results are staged locally and uploaded as
immutable parts every `part_rows` (500) records or `part_seconds` (10 s), so a 60 s run of 1,000-request
shards uploads several parts per shard, and the merge reads the parts back and writes results.parquet and
results.jsonl to the bucket.

The emulator (its own process) binds on requests (default 3,000 a minute over 1-second buckets, the client is
given the same limit) and answers as Claude does: 500 ms to the first token, then 50 output tokens at 50 a
second, ~1.5 s a reply. For each run it measures

* at the emulator: requests / sending time, from the first request it admitted to the last
  (`/_emulator/stats` first_arrival_at / last_arrival_at), what the limit lets through;
* end to end: requests / wall time of `run_dataset`, from opening the output location to the summary
  written, so including the final merge (reading the parts back) and its upload;

and reports s3/local for both, per pair and as the mean over the pairs (goal: >= 0.97). It also counts the
part objects the s3 run uploaded (listed with s3fs), reads results.parquet back from each output location
(pandas) to check every row is there once and succeeded, and probes the event loop (a 10 ms sleeper) for
how long it was blocked while requests were being sent: uploads done inside the loop show up there.

    python bench/object_storage_throughput.py                  # 3,000 requests, 3,000/min, 2 pairs (~5 min)
    python bench/object_storage_throughput.py --requests 600 --rpm 6000 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from _common import MODEL
from prefect_anthropic import ClientSettings, RunOptions
from prefect_anthropic.dataset.shard_loop import run_dataset
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.testing import s3_server

KEY = "sk-ant-bench-object-storage"
TTFT_MS = 500.0
TOKENS_PER_SECOND = 50.0
MAX_TOKENS = 50  # every reply is cut here: the question is longer (the emulator echoes it)
FILLER = " ".join(f"w{i % 10}" for i in range(200))


# -- the pieces: an S3 API on loopback, a request file ------------------------------------------------------


def s3fs_filesystem():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def write_requests(path: Path, n: int) -> Path:
    """A request file in the original format, one line per request, metadata carrying the row id."""
    with open(path, "w") as handle:
        for i in range(n):
            text = f"Question {i}: what is {i} times 8? {FILLER}"
            body = {
                "model": MODEL,
                "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": text}],
                "metadata": {"row_id": i},
            }
            handle.write(json.dumps(body) + "\n")
    return path


# -- one run ------------------------------------------------------------------------------------------------


async def run_with_probe(requests: Path, out: str, settings: ClientSettings, options: RunOptions):
    """run_dataset, timed, with a probe of the event loop: a 10 ms sleeper, and when and how late it woke
    (each time it was more than 5 ms late: below that, scheduling noise)."""
    late_wakes: list[tuple[float, float]] = []  # (time.time() at waking, seconds late)
    loop = asyncio.get_running_loop()

    async def probe() -> None:
        while True:
            asked = loop.time()
            await asyncio.sleep(0.01)
            late = loop.time() - asked - 0.01
            if late > 0.005:
                late_wakes.append((time.time(), late))

    prober = asyncio.create_task(probe())
    started = time.perf_counter()
    try:
        summary = await run_dataset(str(requests), out, settings, KEY, options)
    finally:
        wall = time.perf_counter() - started
        prober.cancel()
    return summary, wall, late_wakes


def check_rows(out: str, n: int) -> bool:
    """results.parquet, read back from the output location: every row once, every row succeeded."""
    import pandas as pd

    frame = pd.read_parquet(f"{out}/results.parquet")
    lines = frame["line"]
    return len(frame) == n and lines.nunique() == n and bool((frame["status"] == "succeeded").all())


def count_parts(out: str, shard_size: int) -> tuple[int, int]:
    """(shard result parts, spending journal parts) under an s3:// output."""
    fs = s3fs_filesystem()
    path = out.removeprefix("s3://")
    shards = fs.glob(f"{path}/.shards-{shard_size}/shard-*/part-*.jsonl")
    journals = fs.glob(f"{path}/.spending/*/part-*.jsonl")
    return len(shards), len(journals)


def one_run(kind: str, out: str, requests: Path, base_url: str, args: argparse.Namespace) -> dict[str, float]:
    httpx.post(f"{base_url}/_emulator/reset", timeout=10).raise_for_status()
    settings = ClientSettings(base_url=base_url, requests_per_minute=args.rpm)
    options = RunOptions(shard_size=args.shard_size)
    summary, wall, late_wakes = asyncio.run(run_with_probe(requests, out, settings, options))
    ended = time.time()
    stats = httpx.get(f"{base_url}/_emulator/stats", timeout=10).json()
    n = args.requests
    first, last = stats["first_arrival_at"], stats["last_arrival_at"]
    sending = last - first
    # The loop blocked while requests were being sent (the merge at the end blocks it too, harmlessly).
    while_sending = [late for at, late in late_wakes if first <= at <= last]
    parts, journal_parts = count_parts(out, args.shard_size) if kind == "s3" else (0, 0)
    return {
        "emulator_rps": (n - 1) / sending if sending > 0 else float("nan"),
        "e2e_rps": n / wall,
        "sending_s": sending,
        "wall_s": wall,
        # From the last request admitted to run_dataset's return: the last reply, the merge, the summary.
        "tail_s": ended - last,
        "blocked_s": sum(while_sending),
        "blocked_max_ms": 1000 * max(while_sending, default=0.0),
        "status_429": stats["responses_by_status"].get("429", 0),
        "billed": stats["billed_requests"],
        "succeeded": summary["succeeded"],
        "parts": parts,
        "journal_parts": journal_parts,
        "rows_ok": check_rows(out, n),
    }


# -- the benchmark ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3_000, help="requests per run (default 3,000)")
    parser.add_argument("--rpm", type=float, default=3_000, help="the requests/min limit (default 3,000)")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs, local then s3 (default 2)")
    parser.add_argument("--shard-size", type=int, default=1_000, help="requests per shard (default 1,000)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-object-storage-"))
    # Learned token corrections stay out of the user's home.
    os.environ["PREFECT_ANTHROPIC_STATE_DIR"] = str(work / "state")
    requests = write_requests(work / "requests.jsonl", args.requests)
    warmup = write_requests(work / "warmup.jsonl", 50)
    emulator_options = {
        "requests_per_minute": args.rpm,
        "burst_seconds": 1.0,
        "ttft_ms": TTFT_MS,
        "output_tokens_per_second": TOKENS_PER_SECOND,
        "seed": 7,
    }
    bound = args.rpm / 60
    reply_s = TTFT_MS / 1000 + MAX_TOKENS / TOKENS_PER_SECOND
    print(
        f"{args.requests:,} requests in shards of {args.shard_size:,}, {args.rpm:,.0f} requests/min "
        f"(bound {bound:.1f}/s), ~{reply_s:.1f} s replies, part_rows {RunOptions().part_rows}, "
        f"part_seconds {RunOptions().part_seconds:g}; load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        with s3_server() as store, emulator_process(**emulator_options) as emu:
            os.environ.update(store.environment)  # s3fs here and in the runs reaches moto
            bucket = f"s3://bench-{uuid.uuid4().hex[:12]}"
            s3fs_filesystem().mkdir(bucket)
            # Untimed: imports, the s3 filesystem and its connection pool, the emulator's first requests.
            for out in (str(work / "warmup-local"), f"{bucket}/warmup"):
                one_run("local" if "://" not in out else "s3", out, warmup, emu.base_url, _warmup_args(args))
            pairs = []
            for repeat in range(1, args.repeats + 1):
                pair = {}
                for kind in ("local", "s3"):
                    out = str(work / f"local-{repeat}") if kind == "local" else f"{bucket}/run-{repeat}"
                    pair[kind] = one_run(kind, out, requests, emu.base_url, args)
                    r = pair[kind]
                    print(
                        f"  run {repeat} {kind:<5}: {r['emulator_rps']:.2f} req/s at the emulator, "
                        f"{r['e2e_rps']:.2f} end to end, loop blocked {r['blocked_s']:.2f} s while sending",
                        flush=True,
                    )
                pairs.append(pair)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"{'pair':<6} {'s3/local at emulator':>20} {'s3/local end to end':>19} | {'local of bound':>14} "
        f"{'s3 parts':>8} {'journal parts':>13} {'rows ok':>7} | {'wall s local':>12} {'wall s s3':>9} "
        f"{'tail s local':>12} {'tail s s3':>9} {'sending, loop blocked s local':>29} {'s3':>5} {'max ms s3':>9} "
        f"{'429s':>5}"
    )
    for i, pair in enumerate(pairs, 1):
        local, s3 = pair["local"], pair["s3"]
        print(
            f"{i:<6} {s3['emulator_rps'] / local['emulator_rps']:>20.4f} {s3['e2e_rps'] / local['e2e_rps']:>19.4f} | "
            f"{local['emulator_rps'] / bound:>14.3f} {s3['parts']:>8} {s3['journal_parts']:>13} "
            f"{'yes' if local['rows_ok'] and s3['rows_ok'] else 'NO':>7} | {local['wall_s']:>12.2f} "
            f"{s3['wall_s']:>9.2f} {local['tail_s']:>12.2f} {s3['tail_s']:>9.2f} {local['blocked_s']:>29.2f} "
            f"{s3['blocked_s']:>5.2f} {s3['blocked_max_ms']:>9.0f} {local['status_429'] + s3['status_429']:>5}"
        )
    emulator_ratio = statistics.fmean(p["s3"]["emulator_rps"] / p["local"]["emulator_rps"] for p in pairs)
    e2e_ratio = statistics.fmean(p["s3"]["e2e_rps"] / p["local"]["e2e_rps"] for p in pairs)
    rows_ok = all(p[kind]["rows_ok"] for p in pairs for kind in ("local", "s3"))
    print(f"{'mean':<6} {emulator_ratio:>20.4f} {e2e_ratio:>19.4f} |")
    verdict = "met" if min(emulator_ratio, e2e_ratio) >= 0.97 and rows_ok else "NOT met"
    print(f"\ngoal s3/local >= 0.97 at the emulator and end to end, every row present: {verdict}")
    return 0 if rows_ok else 1


def _warmup_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "requests": 50})


if __name__ == "__main__":
    sys.exit(main())
