"""The time a user waits: the original single-file script (bench/original_script.py, the OpenAI cookbook's
algorithm ported to Anthropic) vs our drop-in `api_request_parallel_processor.py`, with the same flags.

    python bench/dropin_vs_original.py                               # 300 requests of 10 s replies, 1,200/min
    python bench/dropin_vs_original.py --reply-s 2 --requests 60     # a quick smoke test

The emulator (its own process) limits requests to --rpm a minute over 1-second buckets (`burst_seconds=1`,
as Anthropic may enforce a per-minute limit over short intervals); every reply takes --reply-s: a 500 ms
time to first token, then `max_tokens` output tokens at 50 tokens a second, each reply cut at `max_tokens`
(the prompt is long enough). Tokens per minute are not binding (10,000,000). Each script runs as a
subprocess with a clean environment, as a new user would run it: a fake ANTHROPIC_API_KEY and no
PREFECT_API_URL (so the drop-in runs without Prefect). Before each run the emulator is reset (ledger and
rate-limit buckets).

Measured, per script: the wall time of the subprocess from launch to exit (what a user waits), as a ratio
to the bound (n - 1) / rate + reply time (the last request cannot be sent sooner, nor answered faster); the
emulator's sending time (`first_arrival_at` to `last_arrival_at` of requests admitted) as a ratio to
(n - 1) / rate; start-up (launch to the first request admitted) and wrap-up (the last reply produced,
`last_request_at`, to exit) as ratios to the bound; the script's wall time over the original's ("vs orig");
billed requests and responses by status; and whether every request has exactly one successful row in the
output file (row layouts are listed below the table, to compare the two).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from _common import MODEL
from prefect_anthropic.emulator import emulator_process

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_SECOND = 50.0
TTFT_MS = 500.0
WORDS = " ".join(f"w{i % 10}" for i in range(4_000))  # long enough that every reply is cut at max_tokens
SCRIPTS = {
    "original": ROOT / "bench" / "original_script.py",
    "drop-in": ROOT / "api_request_parallel_processor.py",
}


def max_tokens_for(reply_s: float) -> int:
    ttft_ms = min(TTFT_MS, reply_s * 500.0)
    return max(1, round((reply_s - ttft_ms / 1000) * TOKENS_PER_SECOND))


def write_requests(path: Path, n: int, max_tokens: int) -> None:
    with path.open("w") as f:
        for i in range(1, n + 1):
            body = {
                "model": MODEL,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{i} {WORDS}"}],
            }
            f.write(json.dumps(body) + "\n")


def request_number(request: dict) -> int | None:
    try:
        content = request["messages"][0]["content"]
        text = content if isinstance(content, str) else content[0]["text"]
        return int(text.split(" ", 1)[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def check_output(path: Path, n: int) -> dict[str, object]:
    """Rows, successes per request, and the shape of the rows (to compare the two layouts)."""
    ok: Counter[int] = Counter()
    rows = failed = unparsable = 0
    lengths: Counter[int] = Counter()
    response_kinds: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                unparsable += 1
                continue
            lengths[len(row)] += 1
            response = row[1] if len(row) > 1 else None
            number = request_number(row[0]) if row else None
            if isinstance(response, dict) and response.get("type") == "message" and "error" not in response:
                response_kinds["message"] += 1
                if number is not None:
                    ok[number] += 1
            else:
                failed += 1
                response_kinds[type(response).__name__] += 1
    succeeded = sum(1 for i in range(1, n + 1) if ok[i] >= 1)
    return {
        "rows": rows,
        "succeeded": succeeded,
        "missing": n - succeeded,
        "duplicates": sum(count - 1 for count in ok.values() if count > 1),
        "failed_rows": failed,
        "unparsable": unparsable,
        "row_lengths": dict(lengths),
        "response_kinds": dict(response_kinds),
        "complete": succeeded == n and failed == 0 and unparsable == 0,
    }


def run_script(name: str, base_url: str, requests_path: Path, work: Path, n: int, rpm: float) -> dict[str, object]:
    save_path = work / f"{name}_results.jsonl"
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-bench-fake-key"}
    env.pop("PREFECT_API_URL", None)
    command = [
        sys.executable,
        str(SCRIPTS[name]),
        "--requests_filepath", str(requests_path),
        "--save_filepath", str(save_path),
        "--request_url", f"{base_url}/v1/messages",
        "--max_requests_per_minute", str(int(rpm) if float(rpm).is_integer() else rpm),
        "--max_tokens_per_minute", "10000000",
    ]  # fmt: skip
    httpx.post(f"{base_url}/_emulator/reset", timeout=10).raise_for_status()
    log_path = work / f"{name}.log"
    with log_path.open("w") as log:
        launched_at, start = time.time(), time.perf_counter()
        returncode = subprocess.run(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        exited_at = time.time()
    stats = httpx.get(f"{base_url}/_emulator/stats", timeout=10).json()
    first, last = stats.get("first_arrival_at"), stats.get("last_arrival_at")
    last_billed = stats.get("last_request_at")
    return {
        "name": name,
        "returncode": returncode,
        "wall": wall,
        "sending": (last - first) if first is not None and last is not None else float("nan"),
        # Launch to the first request admitted (start-up), and the last reply produced to exit (wrap-up).
        "startup": (first - launched_at) if first is not None else float("nan"),
        "wrapup": (exited_at - last_billed) if last_billed is not None else float("nan"),
        "billed": stats["billed_requests"],
        "by_status": stats["responses_by_status"],
        "output": check_output(save_path, n),
        "log": log_path,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reply-s", type=float, default=10.0, help="How long each reply takes, in seconds.")
    parser.add_argument("--requests", type=int, default=300, help="How many requests.")
    parser.add_argument("--rpm", type=float, default=1200.0, help="The emulator's (and the scripts') requests/min.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory (outputs and logs).")
    args = parser.parse_args()

    n, rate, reply_s = args.requests, args.rpm / 60.0, args.reply_s
    max_tokens = max_tokens_for(reply_s)
    ideal_sending = (n - 1) / rate
    bound = ideal_sending + reply_s
    options = {
        "requests_per_minute": args.rpm,
        "burst_seconds": 1.0,
        "ttft_ms": min(TTFT_MS, reply_s * 500.0),
        "output_tokens_per_second": TOKENS_PER_SECOND,
    }
    work = Path(tempfile.mkdtemp(prefix="dropin_vs_original_"))
    requests_path = work / "requests.jsonl"
    write_requests(requests_path, n, max_tokens)
    print(
        f"{n} requests, replies of {reply_s:g} s (max_tokens {max_tokens}), {args.rpm:g} requests/min; "
        f"bound = (n-1)/rate + reply = {bound:.2f} s",
        flush=True,
    )

    results = []
    with emulator_process(**options) as emu:
        for name in SCRIPTS:
            results.append(run_script(name, emu.base_url, requests_path, work, n, args.rpm))
            print(f"  {name} done", flush=True)

    original_wall = next(r["wall"] for r in results if r["name"] == "original")
    print()
    header = (
        f"{'script':<10} {'wall/bound':>10} {'send/ideal':>10} {'start/bound':>11} {'end/bound':>9} "
        f"{'vs orig':>8} {'billed':>6} "
        f"{'ok':>9} {'failed':>6} {'rc':>3}  responses by status"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        out = r["output"]
        ok = f"{out['succeeded']}/{n}"
        print(
            f"{r['name']:<10} {r['wall'] / bound:>10.2f} {r['sending'] / ideal_sending:>10.2f} "
            f"{r['startup'] / bound:>11.2f} {r['wrapup'] / bound:>9.2f} "
            f"{r['wall'] / original_wall:>8.2f} {r['billed']:>6} {ok:>9} {out['failed_rows']:>6} "
            f"{r['returncode']:>3}  {r['by_status']}"
        )
    print()
    for r in results:
        out = r["output"]
        verdict = "complete" if out["complete"] else "INCOMPLETE"
        print(
            f"{r['name']}: {verdict}: {out['rows']} rows, {out['missing']} requests missing, "
            f"{out['duplicates']} duplicate successes, row lengths {out['row_lengths']}, "
            f"responses {out['response_kinds']}"
        )
        if not out["complete"] or r["returncode"]:
            print(f"  log: {r['log']}")
    if args.keep or any(not r["output"]["complete"] or r["returncode"] for r in results):
        print(f"outputs and logs kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
