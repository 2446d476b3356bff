"""Soak benchmark of the hard budget (`max_cost_usd`): under every fault, the account is never billed more
than the budget.

Each run sends a request file (~420-token prompts, max_tokens 256, claude-sonnet-4-6: about $0.005 a
request, its worst case about $0.0115) to a fresh emulator process with a budget that stops it part-way,
and then reads the emulator's own ledger of what it billed (`GET /_emulator/stats`). A run overshoots when
the ledger's `cost_usd` is above the budget (+1e-9). The scenarios, each seeded (fault rates, latency,
budget, concurrency and shard size are drawn from the seed, and the emulator's fault generator is seeded):

  faults        529 (2-10%), 500 (2-5%), connection drops after billing (2-8%), latency 50-150 ms; the
                first run is the original bug report's setup (300 requests, $0.10, 5% 529, 2% drops).
  streams       every line `"stream": true`: `error` events mid-stream (5-10%, billed) and drops.
  shard-retry   max_attempts 1, 529 at 20%: failed rows come back through shard retries (5, no delay).
  kill-resume   run_dataset in a child process, SIGKILLed 0.3-1.2 s after its first request reached the
                emulator (300 ms latency: requests in flight), then the same call again on the same output
                directory; the ledger covers both runs.
  shared        two child processes, each sending half of the lines with a SharedBudget on one budget id in
                a real redis-server (what work-pool workers do), faults on; the parent starts the budget.
  cli-block     `prefect-anthropic run --client-block NAME --max-cost-usd X` through the Prefect flow, on a
                Prefect test server (expects exit code 3).

It also checks, per run, that the dataset's spending journals (`spent_in`) are not below the ledger (the
journals must be an upper bound of what was billed) and that the budget did stop the run
(`budget_exhausted` rows). Exit status 1 when a run overshoots or fails.

    python bench/budget_soak.py            # 42 runs, ~5 minutes on 2 cores
    python bench/budget_soak.py --quick    # 12 runs
    python bench/budget_soak.py --scenarios faults,kill-resume --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from _common import MODEL
from prefect_anthropic import ClientSettings, RunOptions
from prefect_anthropic.dataset.shard_loop import run_dataset
from prefect_anthropic.dataset.shard_store import SPENDING_DIR, spent_in
from prefect_anthropic.emulator import EmulatorConfig, RunningEmulator, emulator_process
from prefect_anthropic.emulator.tokenizer import count_tokens

TOLERANCE_USD = 1e-9
MAX_TOKENS = 256
PROMPT_TOKENS = 410  # + the emulator's request and message overheads: ~420 input tokens
RUN_TIMEOUT_S = 240.0
DEFAULT_RUNS = {"faults": 12, "streams": 8, "shard-retry": 6, "kill-resume": 6, "shared": 6, "cli-block": 4}
QUICK_RUNS = {"faults": 3, "streams": 2, "shard-retry": 2, "kill-resume": 2, "shared": 2, "cli-block": 1}
#: Words of at most six letters: one emulator token each.
WORDS = [
    *("the", "a", "data", "model", "token", "budget", "cost", "shard", "retry", "stream", "river", "stone"),
    *("cloud", "light", "night", "house", "paper", "green", "quiet", "rapid", "small", "large", "north"),
    *("south", "east", "west", "apple", "bread", "chair", "table", "water", "field", "metal", "glass"),
    *("plant", "story", "music", "sound", "voice", "image", "frame", "point", "line", "curve", "angle"),
]


# -- results ----------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One run: its budget against what the emulator billed, and what the dataset says."""

    scenario: str
    seed: int
    budget_usd: float
    ledger: dict[str, Any] = field(default_factory=dict)
    succeeded: int = 0
    exhausted: int = 0
    journal_usd: float | None = None
    setup: str = ""
    note: str = ""
    error: str | None = None
    #: kill-resume: attempts the second run reserved (sent, or about to be); None elsewhere.
    resumed_attempts: int | None = None

    @property
    def ledger_usd(self) -> float:
        return float(self.ledger.get("cost_usd", 0.0))

    @property
    def ratio(self) -> float:
        return self.ledger_usd / self.budget_usd

    @property
    def overshoot(self) -> bool:
        return self.ledger_usd > self.budget_usd + TOLERANCE_USD

    @property
    def journal_below_ledger(self) -> bool:
        """The journals claim less than was billed: they are supposed to be an upper bound."""
        return self.journal_usd is not None and self.journal_usd + 1e-6 < self.ledger_usd

    @property
    def budget_stopped(self) -> bool:
        return self.exhausted > 0


def rows_from_summary(output_dir: Path) -> tuple[int, int]:
    """(rows succeeded, rows budget_exhausted) from a dataset's summary.json."""
    summary = json.loads((output_dir / "summary.json").read_text())
    return int(summary["succeeded"]), int(summary["failed_by_error_type"].get("budget_exhausted", 0))


def rows_from_results(paths: Sequence[Path]) -> tuple[int, int, dict[str, int]]:
    """(succeeded, budget_exhausted, other errors by type) from results files: the last record of each line."""
    last: dict[int, dict[str, Any]] = {}
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(raw)
                last[int(record["line"])] = record
    errors: dict[str, int] = {}
    for record in last.values():
        if record.get("status") != "succeeded":
            kind = str(record.get("error_type"))
            errors[kind] = errors.get(kind, 0) + 1
    succeeded = sum(record.get("status") == "succeeded" for record in last.values())
    return succeeded, errors.pop("budget_exhausted", 0), errors


def unsettled_reservations(output_dir: Path) -> tuple[int, float]:
    """Reservations in the dataset's journals with no settlement (a killed process's requests in flight)."""
    count, usd = 0, 0.0
    for path in sorted((output_dir / SPENDING_DIR).glob("*.jsonl")):
        open_entries: dict[int, float] = {}
        for raw in path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(raw)
                if "r" in entry:
                    open_entries[entry["r"]] = float(entry["usd"])
                elif "s" in entry:
                    open_entries.pop(entry["s"], None)
        count += len(open_entries)
        usd += sum(open_entries.values())
    return count, usd


# -- inputs -----------------------------------------------------------------------------------------------


def prompt_text(rng: random.Random, label: str) -> str:
    """A user message of about PROMPT_TOKENS emulator tokens (short words: one token each)."""
    text = f"Item {label}: please summarise the following notes."
    while count_tokens(text) < PROMPT_TOKENS:
        text += " " + rng.choice(WORDS)
    return text


def write_requests(path: Path, n: int, seed: int, *, stream: bool = False) -> Path:
    """n distinct requests (~420 input tokens, max_tokens 256: each reply is cut at max_tokens)."""
    rng = random.Random(f"prompts:{seed}")
    with open(path, "wb") as handle:
        for i in range(1, n + 1):
            body: dict[str, Any] = {
                "model": MODEL,
                "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": prompt_text(rng, f"{seed}-{i}")}],
            }
            if stream:
                body["stream"] = True
            handle.write(orjson.dumps(body) + b"\n")
    return path


def api_key(scenario: str, seed: int) -> str:
    """A key of its own per run: no account state (limits, windows) carries over between runs."""
    return f"sk-ant-fake-soak-{scenario}-{seed}-{uuid.uuid4().hex[:6]}"


#: Set by --verbose: the emulator processes keep their stderr (their start line, their errors).
VERBOSE = False


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """fd 2 points at /dev/null while a child is spawned (it inherits that), then comes back."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def emulator(**options: Any) -> Iterator[RunningEmulator]:
    """A fresh emulator process (a run's own fault generator and ledger), quiet unless --verbose."""
    with contextlib.ExitStack() as stack:
        with contextlib.nullcontext() if VERBOSE else _stderr_to_devnull():
            emu = stack.enter_context(emulator_process(EmulatorConfig(port=0), **options))
        emu.reset()
        yield emu


def pct(rate: float) -> str:
    return f"{100 * rate:.1f}%".replace(".0%", "%")


def describe(**values: object) -> str:
    """`name=value ...` for the setup column (rates are passed already formatted with `pct`)."""
    return " ".join(f"{name}={round(value) if isinstance(value, float) else value}" for name, value in values.items())


# -- runs in this process ---------------------------------------------------------------------------------


def dataset_run(requests_path: Path, output_dir: Path, settings: ClientSettings, key: str, options: RunOptions) -> None:
    """`run_dataset` in this process (a new event loop), bounded in time."""
    run = run_dataset(str(requests_path), str(output_dir), settings, key, options)
    asyncio.run(asyncio.wait_for(run, RUN_TIMEOUT_S))


def finish(result: RunResult, emu: RunningEmulator, output_dir: Path, *, rows: bool = True) -> RunResult:
    """Read the ledger, the journals and (unless the run failed) the dataset's rows into the result."""
    result.ledger = emu.stats()
    result.journal_usd = spent_in(output_dir) if (output_dir / SPENDING_DIR).is_dir() else None
    if rows and result.error is None and (output_dir / "summary.json").exists():
        result.succeeded, result.exhausted = rows_from_summary(output_dir)
    return result


def plain_run(
    scenario: str,
    seed: int,
    work: Path,
    *,
    lines: int,
    budget: float,
    stream: bool,
    emulator_options: dict[str, Any],
    settings: dict[str, Any],
    options: dict[str, Any],
    setup: str,
) -> RunResult:
    """One `run_dataset` call in this process against a fresh emulator."""
    run_dir = work / f"{scenario}-{seed}"
    run_dir.mkdir()
    requests_path = write_requests(run_dir / "requests.jsonl", lines, seed, stream=stream)
    output_dir = run_dir / "out"
    result = RunResult(scenario, seed, budget, setup=setup)
    with emulator(seed=seed, **emulator_options) as emu:
        client_settings = ClientSettings(base_url=emu.base_url, max_cost_usd=budget, **settings)
        try:
            dataset_run(requests_path, output_dir, client_settings, api_key(scenario, seed), RunOptions(**options))
        except Exception as error:  # reported, and the ledger is still checked
            result.error = f"{type(error).__name__}: {error}"
        return finish(result, emu, output_dir)


def scenario_faults(seed: int, work: Path) -> RunResult:
    """Non-streamed requests under 529s, 500s, 429s, drops after billing, timeouts and latency."""
    rng = random.Random(f"faults:{seed}")
    if seed == 0:  # the original report: 300 x ~420 tokens, max_tokens 256, $0.10, 5% 529, 2% drops, 100 ms
        lines, budget, concurrency, shard = 300, 0.10, 50, 5000
        faults = {"error_rate_529": 0.05, "drop_rate": 0.02, "latency_ms": 100.0}
        setup = describe(n=lines, e529="5%", drop="2%", lat=100, conc=concurrency, note="the bug report's setup")
        timeout_s = 600.0
    else:
        lines = rng.choice([150, 200, 300])
        budget = round(rng.uniform(0.03, 0.15), 4)
        e529, e500, e429 = rng.uniform(0.02, 0.10), rng.uniform(0.02, 0.05), rng.uniform(0.0, 0.03)
        drop, latency, stall = rng.uniform(0.02, 0.08), rng.uniform(50, 150), rng.uniform(0.0, 0.03)
        concurrency, shard = rng.choice([4, 8, 16, 32, 50]), rng.choice([20, 50, 100, 5000])
        # A stalled reply comes after 1.5 s, past the client's 1 s timeout: sent, billed, never read.
        faults = {"error_rate_529": e529, "error_rate_500": e500, "error_rate_429": e429, "drop_rate": drop,
                  "stall_rate": stall, "stall_s": 1.5, "fault_retry_after_s": 0.5, "latency_ms": latency,
                  "latency_jitter_ms": latency / 3}  # fmt: skip
        timeout_s = 1.0
        setup = describe(
            n=lines, e529=pct(e529), e500=pct(e500), e429=pct(e429), drop=pct(drop), stall=pct(stall),
            lat=latency, conc=concurrency, shard=shard,
        )  # fmt: skip
    return plain_run(
        "faults",
        seed,
        work,
        lines=lines,
        budget=budget,
        stream=False,
        emulator_options=faults,
        settings={"max_concurrency": concurrency, "timeout_s": timeout_s},
        options={"shard_size": shard, "shard_retries": 2, "shard_retry_delay_s": 0.0},
        setup=setup,
    )


def scenario_streams(seed: int, work: Path) -> RunResult:
    """Every request streamed: error events mid-stream (billed) and drops mid-stream."""
    rng = random.Random(f"streams:{seed}")
    lines, budget = rng.choice([150, 200]), round(rng.uniform(0.03, 0.15), 4)
    stream_error, drop, e529 = rng.uniform(0.05, 0.10), rng.uniform(0.02, 0.06), rng.uniform(0.0, 0.05)
    latency, concurrency = rng.uniform(50, 150), rng.choice([4, 8, 16, 32])
    return plain_run(
        "streams",
        seed,
        work,
        lines=lines,
        budget=budget,
        stream=True,
        emulator_options={
            "stream_error_rate": stream_error,
            "drop_rate": drop,
            "error_rate_529": e529,
            "latency_ms": latency,
            "latency_jitter_ms": latency / 3,
        },
        settings={"max_concurrency": concurrency},
        options={"shard_size": 50, "shard_retries": 2, "shard_retry_delay_s": 0.0},
        setup=describe(n=lines, serr=pct(stream_error), drop=pct(drop), e529=pct(e529), lat=latency, conc=concurrency),
    )


def scenario_shard_retry(seed: int, work: Path) -> RunResult:
    """One attempt per request, 20% 529s: what fails comes back through shard retries."""
    rng = random.Random(f"shard-retry:{seed}")
    lines, budget = rng.choice([100, 150]), round(rng.uniform(0.03, 0.15), 4)
    drop, shard, concurrency = rng.uniform(0.0, 0.04), rng.choice([5, 10, 20]), rng.choice([4, 8, 16])
    return plain_run(
        "shard-retry",
        seed,
        work,
        lines=lines,
        budget=budget,
        stream=False,
        emulator_options={"error_rate_529": 0.20, "drop_rate": drop, "latency_ms": 60.0, "latency_jitter_ms": 30.0},
        settings={"max_attempts": 1, "max_concurrency": concurrency},
        options={"shard_size": shard, "shard_retries": 5, "shard_retry_delay_s": 0.0, "max_parallel_shards": 4},
        setup=describe(n=lines, e529="20%", drop=pct(drop), attempts=1, shard=shard, conc=concurrency),
    )


# -- runs in child processes ------------------------------------------------------------------------------


def child_command(kind: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]


async def child_dataset(spec: dict[str, Any]) -> dict[str, Any]:
    """A child's whole `run_dataset` (the kill-resume scenario kills it part-way)."""
    settings, options = ClientSettings(**spec["settings"]), RunOptions(**spec["options"])
    summary = await run_dataset(spec["requests"], spec["output_dir"], settings, spec["key"], options)
    return {"succeeded": summary["succeeded"], "stopped_by_budget": summary["stopped_by_budget"]}


async def child_shard(spec: dict[str, Any]) -> dict[str, Any]:
    """One shard of the file with a budget shared through Redis, as `fanout.run_shard_flow` runs it on a
    work-pool worker (without Prefect)."""
    from prefect_anthropic.dataset.inputs import plan_shards
    from prefect_anthropic.dataset.pipeline import ShardIncomplete, run_shard_requests
    from prefect_anthropic.dataset.shard_store import ShardStore
    from prefect_anthropic.engine import AnthropicClient
    from prefect_anthropic.engine.shared_budget import SharedBudget
    from prefect_anthropic.storage import Storage

    settings = ClientSettings(**spec["settings"])
    output_dir = Path(spec["output_dir"])
    shard = plan_shards(spec["requests"], spec["shard_size"]).shards[spec["shard"]]
    store = ShardStore.for_run(str(output_dir), RunOptions(shard_size=spec["shard_size"]), Storage())
    assert settings.redis_url is not None
    budget = SharedBudget.connect(
        settings.redis_url, spec["key"], spec["budget_id"], spec["limit"], store.new_journal()
    )
    outcome: dict[str, Any] = {"shard": spec["shard"]}
    async with AnthropicClient(spec["key"], settings, budget=budget) as client:
        await client.check_limiter()
        try:
            outcome["summary"] = await run_shard_requests(client, spec["requests"], shard, store)
        except ShardIncomplete as error:
            outcome["incomplete"] = str(error)
    return outcome


def run_child(kind: str, spec: dict[str, Any]) -> None:
    """Entry point of a child process: run, then print one RESULT line of JSON."""
    runner = {"dataset": child_dataset, "shard": child_shard}[kind]
    result = asyncio.run(asyncio.wait_for(runner(spec), RUN_TIMEOUT_S))
    print("RESULT " + json.dumps(result), flush=True)


def spawn_child(kind: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(child_command(kind, spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_child(
    child: subprocess.Popen[str], timeout_s: float = RUN_TIMEOUT_S
) -> tuple[int, dict[str, Any] | None, str]:
    """(exit code, its RESULT, the tail of its stderr); a child past its time is killed."""
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    result = None
    for line in (out or "").splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    tail = " | ".join((err or "").strip().splitlines()[-3:])
    return child.returncode, result, tail


def scenario_kill_resume(seed: int, work: Path) -> RunResult:
    """A run SIGKILLed with requests in flight, then run again on the same output directory and budget."""
    rng = random.Random(f"kill-resume:{seed}")
    # Above the others: the killed run's unsettled reservations count at their worst case, and the second run
    # can only send with what they leave.
    lines, budget = 150, round(rng.uniform(0.12, 0.20), 4)
    concurrency, parallel = rng.choice([2, 3, 4]), rng.choice([1, 2, 4])
    kill_after, e529, drop = rng.uniform(0.3, 1.2), rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.04)
    run_dir = work / f"kill-resume-{seed}"
    run_dir.mkdir()
    requests_path = write_requests(run_dir / "requests.jsonl", lines, seed)
    output_dir = run_dir / "out"
    setup = describe(
        n=lines, e529=pct(e529), drop=pct(drop), lat=300, conc=concurrency, shards=f"{parallel}x25",
        kill=f"{kill_after:.2f}s",
    )  # fmt: skip
    result = RunResult("kill-resume", seed, budget, setup=setup)
    key = api_key("kill-resume", seed)
    options = {"shard_size": 25, "max_parallel_shards": parallel, "shard_retries": 2, "shard_retry_delay_s": 0.0}
    latency = {"latency_ms": 300.0, "latency_jitter_ms": 100.0}
    with emulator(seed=seed, error_rate_529=e529, drop_rate=drop, **latency) as emu:
        settings = {"base_url": emu.base_url, "max_cost_usd": budget, "max_concurrency": concurrency}
        spec = {"requests": str(requests_path), "output_dir": str(output_dir), "settings": settings, "key": key,
                "options": options}  # fmt: skip
        child = spawn_child("dataset", spec)
        # Killed a little after its first request reached the emulator (its start-up takes ~2 s on 2 cores).
        deadline = time.monotonic() + 60
        while emu.stats()["requests_total"] == 0 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(kill_after)
        finished_before_kill = child.poll() is not None
        if not finished_before_kill:
            os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        billed_at_kill = emu.stats()["billed_requests"]
        time.sleep(0.5)  # the killed run's requests in flight end (and are billed) at the emulator
        billed_in_flight = emu.stats()["billed_requests"] - billed_at_kill
        unsettled, held = unsettled_reservations(output_dir)
        journals_before = set((output_dir / SPENDING_DIR).glob("*.jsonl"))
        journal_at_kill = spent_in(output_dir)
        try:
            dataset_run(requests_path, output_dir, ClientSettings(**settings), key, RunOptions(**options))
        except Exception as error:
            result.error = f"{type(error).__name__}: {error}"
        resumed = sum(
            raw.startswith(b'{"r"')
            for path in set((output_dir / SPENDING_DIR).glob("*.jsonl")) - journals_before
            for raw in path.read_bytes().splitlines()
        )
        result.resumed_attempts = resumed
        result.note = "finished before the kill (not killed); " if finished_before_kill else ""
        result.note += (
            f"killed run: {billed_at_kill} billed, {unsettled} attempts unsettled (${held:.4f} held) of which "
            f"{billed_in_flight} billed after the kill, journal ${journal_at_kill:.4f}; second run: {resumed} attempts"
        )
        return finish(result, emu, output_dir)


async def start_budget(redis_url: str, key: str, budget_id: str, limit_usd: float) -> None:
    from prefect_anthropic.engine.shared_budget import start_shared_budget
    from prefect_anthropic.engine.shared_limiter import SharedLimiter

    shared = SharedLimiter(redis_url, key)
    try:
        await start_shared_budget(shared, budget_id, limit_usd, 0.0)
    finally:
        await shared.aclose()


def scenario_shared(seed: int, work: Path, redis_url: str) -> RunResult:
    """Two processes, one budget in Redis: each sends its own half of the lines."""
    rng = random.Random(f"shared:{seed}")
    lines, budget = 200, round(rng.uniform(0.04, 0.15), 4)
    e529, e500, drop = rng.uniform(0.02, 0.08), rng.uniform(0.0, 0.04), rng.uniform(0.02, 0.06)
    latency, concurrency = rng.uniform(50, 150), (rng.choice([4, 8, 16]), rng.choice([4, 8, 16]))
    run_dir = work / f"shared-{seed}"
    run_dir.mkdir()
    requests_path = write_requests(run_dir / "requests.jsonl", lines, seed)
    output_dir = run_dir / "out"
    output_dir.mkdir(parents=True)
    setup = describe(
        n=lines, e529=pct(e529), e500=pct(e500), drop=pct(drop), lat=latency, conc=f"{concurrency[0]}+{concurrency[1]}"
    )
    result = RunResult("shared", seed, budget, setup=setup)
    key, budget_id = api_key("shared", seed), uuid.uuid4().hex
    faults = {"error_rate_529": e529, "error_rate_500": e500, "drop_rate": drop, "latency_ms": latency,
              "latency_jitter_ms": latency / 3}  # fmt: skip
    with emulator(seed=seed, **faults) as emu:
        asyncio.run(start_budget(redis_url, key, budget_id, budget))  # what the flow does before the shards
        children = []
        for index in (0, 1):
            settings = {"base_url": emu.base_url, "max_cost_usd": budget, "limiter_url": redis_url,
                        "max_concurrency": concurrency[index]}  # fmt: skip
            spec = {"requests": str(requests_path), "output_dir": str(output_dir),
                    "settings": settings, "key": key, "budget_id": budget_id, "limit": budget,
                    "shard_size": lines // 2, "shard": index}  # fmt: skip
            children.append(spawn_child("shard", spec))
        outcomes = [wait_child(child) for child in children]
        failures = [f"child {i} exit {code}: {tail}" for i, (code, _, tail) in enumerate(outcomes) if code != 0]
        if failures:
            result.error = "; ".join(failures)
        finish(result, emu, output_dir, rows=False)
    result.succeeded, result.exhausted, errors = rows_from_results(sorted(output_dir.glob(".shards-*/shard-*.jsonl")))
    incomplete = sum(1 for _, outcome, _ in outcomes if outcome is not None and "incomplete" in outcome)
    notes = [f"other error rows {errors}"] if errors else []
    notes += [f"{incomplete} shard(s) ended with retryable failures"] if incomplete else []
    result.note = "; ".join(notes)
    return result


def scenario_cli_block(seed: int, work: Path) -> RunResult:
    """`prefect-anthropic run --client-block NAME --max-cost-usd X` through the flow (a Prefect server must be
    in force: see `soak`). Odd seeds: the block has no budget; even seeds: the block holds twice X, and the
    command line's X must win."""
    from prefect_anthropic import AnthropicClientConfig, AnthropicCredentials, cli

    rng = random.Random(f"cli-block:{seed}")
    lines, budget = 150, round(rng.uniform(0.03, 0.10), 4)
    e529, drop, shard = rng.uniform(0.02, 0.08), rng.uniform(0.02, 0.05), rng.choice([25, 50, 5000])
    block_budget = 2 * budget if seed % 2 == 0 else None
    run_dir = work / f"cli-block-{seed}"
    run_dir.mkdir()
    requests_path = write_requests(run_dir / "requests.jsonl", lines, seed)
    output_dir = run_dir / "out"
    setup = describe(
        n=lines, e529=pct(e529), drop=pct(drop), lat=100, conc=8, shard=shard,
        block_budget="none" if block_budget is None else f"${block_budget:.4f}",
    )  # fmt: skip
    result = RunResult("cli-block", seed, budget, setup=setup)
    with emulator(seed=seed, latency_ms=100.0, latency_jitter_ms=30.0, error_rate_529=e529, drop_rate=drop) as emu:
        name = f"budget-soak-{seed}"
        credentials = AnthropicCredentials(api_key=api_key("cli-block", seed), base_url=emu.base_url)
        block = AnthropicClientConfig(credentials=credentials, max_concurrency=8, max_cost_usd=block_budget)
        block.save(name, overwrite=True)
        argv = ["run", str(requests_path), "--output-dir", str(output_dir), "--client-block", name,
                "--max-cost-usd", f"{budget}", "--shard-size", str(shard), "--shard-retry-delay", "0",
                "--no-progress"]  # fmt: skip
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            code = cli.main(argv)
        result.note = f"exit code {code}"
        if code != cli.EXIT_BUDGET:
            tail = " | ".join(said.getvalue().strip().splitlines()[-3:])
            result.error = f"exit code {code}, expected {cli.EXIT_BUDGET} (stopped by the budget): {tail}"
        return finish(result, emu, output_dir)


# -- the soak ---------------------------------------------------------------------------------------------

IN_PROCESS: dict[str, Callable[[int, Path], RunResult]] = {
    "faults": scenario_faults,
    "streams": scenario_streams,
    "shard-retry": scenario_shard_retry,
    "kill-resume": scenario_kill_resume,
}


def soak(runs: dict[str, int], first_seed: int, work: Path, report: Callable[[RunResult], None]) -> list[RunResult]:
    """Every scenario's runs, in order; `report` sees each result as it comes."""
    results: list[RunResult] = []

    def record(result: RunResult) -> None:
        results.append(result)
        report(result)

    for scenario, function in IN_PROCESS.items():
        # The faults scenario starts at seed 0, the bug report's own setup.
        start = first_seed - 1 if scenario == "faults" and first_seed == 1 else first_seed
        for seed in range(start, start + runs.get(scenario, 0)):
            record(function(seed, work))
    if runs.get("shared"):
        from prefect_anthropic.testing import redis_server

        with redis_server() as redis_url:
            for seed in range(first_seed, first_seed + runs["shared"]):
                record(scenario_shared(seed, work, redis_url))
    if runs.get("cli-block"):
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            for seed in range(first_seed, first_seed + runs["cli-block"]):
                record(scenario_cli_block(seed, work))
    return results


COLUMNS = ("scenario", "seed", "budget", "ledger", "ratio", "ok", "exhausted", "journal", "billed", "dup", "notes")


def flags(result: RunResult) -> list[str]:
    found = []
    if result.overshoot:
        found.append("OVERSHOOT")
    if result.journal_below_ledger:
        found.append("JOURNAL BELOW LEDGER")
    if not result.budget_stopped:
        found.append("the budget did not stop the run")
    if result.error:
        found.append(f"ERROR {result.error[:200]}")
    return found


def row(result: RunResult) -> list[str]:
    """A run's cells: ok = rows succeeded, exhausted = budget_exhausted rows, journal = `spent_in`, billed
    and dup = the ledger's billed requests and requests billed again with the same body."""
    return [
        result.scenario,
        str(result.seed),
        f"${result.budget_usd:.4f}",
        f"${result.ledger_usd:.6f}",
        f"{result.ratio:.4f}",
        str(result.succeeded),
        str(result.exhausted),
        f"${result.journal_usd:.4f}" if result.journal_usd is not None else "-",
        str(result.ledger.get("billed_requests", 0)),
        str(result.ledger.get("duplicate_billed_requests", 0)),
        "; ".join(part for part in (result.setup, result.note, *flags(result)) if part),
    ]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned, the last free."""
    widths = [max(len(cells[i]) for cells in (headers, *rows)) for i in range(len(headers) - 1)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cells[0].ljust(widths[0]),
            *(cell.rjust(width) for cell, width in zip(cells[1:-1], widths[1:], strict=True)),
        ]
        return "  ".join([*padded, cells[-1]]).rstrip()

    for cells in (headers, *rows):
        print(line(cells))


def progress_line(result: RunResult) -> None:
    """One line as each run ends (the aligned table of every run comes at the end)."""
    cells = row(result)
    named = "  ".join(f"{name}={cell}" for name, cell in zip(COLUMNS[:-1], cells[:-1], strict=True))
    print(named, "", cells[-1], flush=True)


def print_summary(results: list[RunResult], elapsed_s: float) -> int:
    """The per-scenario table and the totals; the exit status (1 on any overshoot or failed run)."""
    per: list[list[str]] = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        group = [r for r in results if r.scenario == scenario]
        top = max(group, key=lambda r: r.ratio)
        per.append([
            scenario, str(len(group)), str(sum(r.overshoot for r in group)), f"{top.ratio:.4f}", str(top.seed),
            f"{sum(r.ratio for r in group) / len(group):.4f}", str(sum(r.budget_stopped for r in group)),
            str(sum(r.journal_below_ledger for r in group)), str(sum(bool(r.error) for r in group)),
        ])  # fmt: skip
    print("\nper scenario:")
    headers = ("scenario", "runs", "overshoots", "worst ratio", "at seed", "mean ratio", "budget stopped",
               "journal<ledger", "errors")  # fmt: skip
    print_table(headers, per)
    overshoots = [r for r in results if r.overshoot]
    errors = [r for r in results if r.error]
    worst = max(results, key=lambda r: r.ratio)
    print()
    print(f"runs: {len(results)}")
    print(f"overshoots (ledger cost_usd > budget + {TOLERANCE_USD:g}): {len(overshoots)}")
    print(
        f"worst ledger/budget ratio: {worst.ratio:.4f} "
        f"({worst.scenario} seed {worst.seed}: ${worst.ledger_usd:.6f} billed of ${worst.budget_usd:.4f})"
    )
    print(f"runs the budget stopped part-way: {sum(r.budget_stopped for r in results)} of {len(results)}")
    print(f"runs whose journals claim less than the ledger billed: {sum(r.journal_below_ledger for r in results)}")
    resumes = [r.resumed_attempts for r in results if r.resumed_attempts is not None]
    if resumes:
        print(f"kill-resume second runs that could send anything: {sum(n > 0 for n in resumes)} of {len(resumes)}")
    print(f"runs with errors: {len(errors)}")
    print(f"elapsed: {elapsed_s:.0f} s")
    for r in overshoots:
        print(f"OVERSHOOT {r.scenario} seed {r.seed} ({r.setup}): billed ${r.ledger_usd:.6f} > ${r.budget_usd:.4f}")
        print(f"  ledger {json.dumps(r.ledger)}")
    return 1 if overshoots or errors else 0


def parse_runs(args: argparse.Namespace) -> dict[str, int]:
    runs = dict(QUICK_RUNS if args.quick else DEFAULT_RUNS)
    if args.scenarios:
        chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        unknown = set(chosen) - set(DEFAULT_RUNS)
        if unknown:
            raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(DEFAULT_RUNS)}")
        runs = {name: count for name, count in runs.items() if name in chosen}
    if args.runs is not None:
        runs = {name: args.runs for name in runs}
    return runs


def quiet_logs(verbose: bool) -> None:
    """The package's warnings (retries, shards ending with failures) are expected here: errors only."""
    if not verbose:
        for name in ("prefect_anthropic", "prefect", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer runs per scenario (12 in all).")
    parser.add_argument("--scenarios", help=f"Comma-separated subset of: {', '.join(DEFAULT_RUNS)}.")
    parser.add_argument("--runs", type=int, help="Runs per chosen scenario (instead of the defaults).")
    parser.add_argument("--first-seed", type=int, default=1, help="First seed of every scenario (default 1).")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (its path is printed).")
    parser.add_argument("--verbose", action="store_true", help="Log lines of the package, Prefect and emulators.")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    VERBOSE = args.verbose
    quiet_logs(args.verbose)
    if args.child:
        run_child(args.child[0], json.loads(args.child[1]))
        return
    runs = parse_runs(args)
    work = Path(tempfile.mkdtemp(prefix="budget-soak-"))
    # Learned token corrections stay out of the user's home; children inherit the environment.
    os.environ["PREFECT_ANTHROPIC_STATE_DIR"] = str(work / "state")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    plan = ", ".join(f"{name} {count}" for name, count in runs.items())
    print(f"budget soak: {sum(runs.values())} runs ({plan}); work directory {work}", flush=True)
    started = time.monotonic()
    try:
        results = soak(runs, args.first_seed, work, progress_line)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    print("\nall runs (ok: rows succeeded; exhausted: budget_exhausted rows; journal: spent_in; billed, dup: ledger):")
    print_table(COLUMNS, [row(r) for r in results])
    sys.exit(print_summary(results, elapsed))


if __name__ == "__main__":
    main()
