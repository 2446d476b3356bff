"""Chaos benchmark (issue 25): nothing paid twice, nothing lost, on every store, through pauses, kills and races.

Every run is real: `prefect-anthropic run` command-line processes (each in its own process group) against one
emulator process (replies of seconds: time to first token and output speed; a background 3% of 529s), one
Prefect server started here (PREFECT_API_URL: no run starts an ephemeral one), moto's S3 server, and where
prefect_anthropic.testing has them, fake-gcs-server and Azurite; Redis is a real redis-server. Everything
listens on 127.0.0.1, and every process started here is stopped at exit.

Scenarios (each run seeded: sizes, instants and durations come from `--seed`):

  pause-resume   SIGSTOP a run for 40-46 s (longer than the lease's 30 s), start a second run on the same
                 output ~30 s into the pause, then SIGCONT the first once the second sends or gave up (at most
                 75 s): stores local, s3, gs, az.
  kill-budget    kill -9 a run with --max-cost-usd at a random instant (replies of ~11 s: requests in flight),
                 then the same command again: s3, gs.
  templates      two runs of --template over one CSV table on one output, 1 s apart (local, s3).
  shard-size     a run interrupted (kill -9 or Ctrl-C) or complete, then another with another --shard-size.
  store-outage   the S3 endpoint unreachable for 20 s mid-run (a TCP proxy in front of moto refuses, or
                 accepts and forwards nothing), with a budget (its journal is written to the bucket).
  redis-restart  a run with --limiter-url whose redis-server is stopped mid-run and started again, empty.
  worker-lost    a Prefect work pool with two process workers on one s3:// output; one worker and its flow
                 runs are killed -9 mid-shard; the shard must be finished by the other.

After the faults, when no run finished (exit 0, 1 or 3), the same command once more (a user's rerun).
A run is a violation when any of these fails:

  rows once      every input line exactly once in results.parquet (read back with pyarrow), succeeded or a
                 legitimate error row (budget_exhausted; a retryable error after every attempt);
  paid twice     requests billed more than once (the emulator's per-request ledger, GET /_emulator/requests)
                 at most the requests in flight at the fault: admitted before it and billed after it (billed
                 up to GRACE_S before it counts too: its reply or its upload was on its way); for a fault that
                 lasts (an outage, a Redis restart) in flight at any moment of it; a race has no fault: 0;
  budget         the ledger at most --max-cost-usd, where one is set;
  exit codes     0, 1 (only with failed rows), 2 or 3; a run that lost its lease to another exits 2; no run hangs.

    python bench/chaos.py                                   # 60 runs, ~20 minutes on 2 cores
    python bench/chaos.py --runs 1                          # one run of each scenario and store
    python bench/chaos.py --scenarios pause-resume --stores s3,local --runs 2 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prefect_anthropic import testing
from prefect_anthropic.emulator import EmulatorConfig, emulator_process
from prefect_anthropic.storage import Storage

MODEL = "claude-sonnet-4-6"
#: Prices of MODEL per token (input, output): the budgets are drawn as shares of what a dataset costs.
PRICE_IN, PRICE_OUT = 3e-6, 15e-6
LEASE_TTL_S = 30.0
#: The longest pause: B's start-up under load can take ~15 s.
MAX_PAUSE_S = 75.0
GRACE_S = 0.5
RUN_TIMEOUT_S = 300.0
TTFT_MS, OUTPUT_TOKENS_PER_S, BACKGROUND_529 = 800.0, 20.0, 0.03
#: Error rows that are a legitimate final state of a line (anything else, `not_processed` first, is not).
LEGITIMATE_ERRORS = {"budget_exhausted", "overloaded_error", "rate_limit_error", "api_error", "timeout_error"}
BUCKET_STORES = ("s3", "gs", "az")
#: Runs per (scenario, store) by default: 60 in all with the four stores.
SCENARIOS: dict[str, tuple[tuple[str, ...], int]] = {
    "pause-resume": (("s3", "gs", "az", "local"), 4),
    "kill-budget": (("s3", "gs"), 5),
    "templates": (("local", "s3"), 4),
    "shard-size": (("local", "s3"), 4),
    "store-outage": (("s3",), 6),
    "redis-restart": (("local", "s3"), 3),
    "worker-lost": (("s3",), 6),
}
#: Seconds a run takes with 4 at a time on 2 cores (for the schedule only).
ESTIMATED_S = {"pause-resume": 95, "kill-budget": 45, "templates": 35, "shard-size": 50, "store-outage": 70,
               "redis-restart": 45, "worker-lost": 160}  # fmt: skip
WORDS = ["the", "data", "model", "token", "cost", "shard", "retry", "stream", "river", "stone", "cloud", "light"]

BIN = Path(sys.executable).parent
CLI = str(BIN / "prefect-anthropic") if (BIN / "prefect-anthropic").exists() else "prefect-anthropic"


# -- processes --------------------------------------------------------------------------------------------


class Processes:
    """Every process this bench starts, each in a session of its own: signalled as a group (a run and any
    child of it), and all stopped at exit, stopped ones first continued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: list[subprocess.Popen[bytes]] = []
        self.closed = False
        #: Prefect worker names: the flow runs a worker starts carry PREFECT__WORKER_NAME, in whatever group.
        self.worker_names: set[str] = set()

    def start(self, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        if self.closed:  # a scenario thread still going after the bench was stopped starts nothing
            raise RuntimeError("the bench is stopping")
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        with self._lock:
            self._started.append(process)
        return process

    @staticmethod
    def signal(process: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    def kill_worker(self, process: subprocess.Popen, name: str) -> int:
        """What losing a machine does to a worker: it and the flow runs it started die at once."""
        self.signal(process, signal.SIGKILL)
        return 1 + kill_by_environment({name})

    def stop_all(self) -> None:
        with self._lock:
            self.closed = True
            alive = [p for p in self._started if p.poll() is None]
        for process in alive:
            self.signal(process, signal.SIGCONT)
            self.signal(process, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                self.signal(process, signal.SIGKILL)
                process.wait()
        kill_by_environment(self.worker_names)


def kill_by_environment(names: set[str]) -> int:
    """SIGKILL the processes whose environment names one of our Prefect workers (the flow runs it started)."""
    if not names:
        return 0
    marks = {f"PREFECT__WORKER_NAME={name}".encode() for name in names}
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = set(handle.read().split(b"\0"))
        except OSError:
            continue
        if environ & marks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
    return killed


@contextlib.contextmanager
def stderr_to_devnull() -> Iterator[None]:
    """fd 2 points at /dev/null while a service is spawned (it inherits that), then comes back."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# -- stores -----------------------------------------------------------------------------------------------


@dataclass
class Store:
    """Where a run's output goes: a local directory or a bucket of an emulated object store."""

    name: str
    root: str
    #: The endpoint's port, for a proxy in front of it (s3 only).
    port: int | None = None

    def location(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    @property
    def is_bucket(self) -> bool:
        return self.name in BUCKET_STORES


def make_bucket(protocol: str) -> str:
    """A fresh bucket (container) on the store the environment points at: its URL."""
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    fs, _ = Storage.from_environment().filesystem(f"{protocol}://{name}")
    fs.mkdir(name)
    return f"{protocol}://{name}"


# -- the emulator's ledger --------------------------------------------------------------------------------


class Ledger:
    """The emulator's per-request record of what it billed, by API key (each run has its own)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def of(self, key: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.base_url}/_emulator/requests", params={"key": key}, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def sending(self, key: str) -> bool:
        state = self.of(key)
        return state["in_flight"] > 0 or bool(state["requests"])

    def billed(self, key: str) -> int:
        return sum(len(r["billed"]) for r in self.of(key)["requests"])

    def wait_idle(self, keys: list[str], timeout_s: float = 120.0) -> bool:
        """Until no request of these keys is in flight (a killed run's replies still finish, billed)."""
        deadline = time.monotonic() + timeout_s
        while any(self.of(key)["in_flight"] for key in keys):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True


# -- one scenario run -------------------------------------------------------------------------------------


@dataclass
class CliRun:
    label: str
    key: str
    process: subprocess.Popen
    log: Path
    argv: list[str]
    env: dict[str, str]
    killed: bool = False
    hung: bool = False

    @property
    def exit(self) -> str:
        if self.hung:
            return "hung"
        if self.killed:
            return "k"
        code = self.process.poll()
        return "running" if code is None else str(code)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def said(self) -> str:
        """What it said last: its `error: ...` line if any, else its last line that is not a Prefect log line."""
        lines = [line.strip() for line in self.text().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("error:", "interrupted:"))]
        own = [line for line in lines if not re.match(r"\d\d:\d\d:\d\d\.\d+ \| ", line)]
        chosen = errors or own or lines
        return chosen[-1][:160] if chosen else ""


@dataclass
class Fault:
    """A fault injected into the runs of `keys`, from t0 to t1 (wall clock; t0 == t1 for an instant)."""

    what: str
    keys: list[str]
    t0: float
    t1: float


@dataclass
class Outcome:
    scenario: str
    store: str
    seed: int
    rows: int = 0
    once: int = 0
    paid_twice: int = 0
    allowed: int = 0
    ledger_usd: float = 0.0
    budget_usd: float | None = None
    exits: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def violation(self) -> bool:
        return bool(self.problems)


class Context:
    """One seeded run of one scenario on one store: its inputs, runs, faults and verdict."""

    def __init__(self, bench: Bench, scenario: str, store: Store, seed: int) -> None:
        self.bench, self.scenario, self.store, self.seed = bench, scenario, store, seed
        self.rng = random.Random(f"{scenario}:{store.name}:{seed}")
        self.uid = uuid.uuid4().hex[:8]
        self.work = bench.work / f"{scenario}-{store.name}-{seed}-{self.uid}"
        self.work.mkdir(parents=True)
        self.runs: list[CliRun] = []
        self.faults: list[Fault] = []
        self.extra_keys: list[str] = []
        self.budget: float | None = None
        self.outcome = Outcome(scenario, store.name, seed)

    # inputs
    def prompt(self, i: int, max_tokens: int) -> str:
        """Longer than max_tokens (one token a word): every reply is cut at max_tokens, so its time and cost
        are known in advance."""
        words = [self.rng.choice(WORDS) for _ in range(max_tokens + 8)]
        return f"Item {self.uid} {i}: " + " ".join(words)

    def write_requests(self, n: int, max_tokens: int) -> Path:
        path = self.work / "requests.jsonl"
        with open(path, "w") as handle:
            for i in range(1, n + 1):
                body = {"model": MODEL, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": self.prompt(i, max_tokens)}]}  # fmt: skip
                handle.write(json.dumps(body) + "\n")
        return path

    def write_table(self, n: int, max_tokens: int) -> Path:
        path = self.work / "table.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "text"])
            for i in range(1, n + 1):
                writer.writerow([f"row-{i}", self.prompt(i, max_tokens)])
        return path

    def cost(self, n: int, max_tokens: int) -> float:
        """What n requests cost, each cut at max_tokens (input: the prompt and the API's overheads)."""
        return n * ((max_tokens + 25) * PRICE_IN + max_tokens * PRICE_OUT)

    def output(self) -> str:
        name = f"out-{self.scenario}-{self.seed}-{self.uid}"
        return str(self.work / name) if self.store.name == "local" else self.store.location(name)

    def args(self, source: str | Path, output: str, *, concurrency: int, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [CLI, "run", str(source), "--output-dir", output, "--base-url", self.bench.emulator_url,
                "--max-concurrency", str(concurrency), "--shard-retry-delay", "1", "--no-progress", *extra]  # fmt: skip
        if self.store.is_bucket:
            # A result is in the bucket once answered: what the bound on paid twice assumes.
            argv += ["--part-rows", "1", "--part-seconds", "1"]
        if self.budget is not None:
            argv += ["--max-cost-usd", f"{self.budget:.6f}"]
        return argv

    # runs
    def key(self, label: str) -> str:
        return f"sk-ant-chaos-{self.uid}-{label}"

    def start(self, label: str, argv: list[str], env: dict[str, str] | None = None) -> CliRun:
        key = self.key(label)
        environment = {**self.bench.env, **(env or {}), "ANTHROPIC_API_KEY": key}
        log = self.work / f"run-{label}.log"
        process = self.bench.processes.start(argv, env=environment, log=log, cwd=self.work)
        run = CliRun(label, key, process, log, argv, env or {})
        self.runs.append(run)
        return run

    def wait_sending(self, run: CliRun, timeout_s: float = 120.0) -> bool:
        """Until the emulator has a request of this run (in flight or billed); False if it ended first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.bench.ledger.sending(run.key):
                return True
            if run.process.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def fault(self, what: str, keys: list[str], duration: Callable[[], None] | None = None) -> Fault:
        """Record a fault on `keys`; `duration` (if any) is the fault's body, timed as its window."""
        t0 = time.time()
        if duration is not None:
            duration()
        fault = Fault(what, keys, t0, time.time())
        self.faults.append(fault)
        return fault

    def kill(self, run: CliRun) -> None:
        if run.process.poll() is None:
            run.killed = True
            self.bench.processes.signal(run.process, signal.SIGKILL)
            run.process.wait()

    def wait(self, run: CliRun, timeout_s: float = RUN_TIMEOUT_S) -> None:
        try:
            run.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            run.hung = True
            self.bench.processes.signal(run.process, signal.SIGKILL)
            run.process.wait()

    def note(self, text: str) -> None:
        self.outcome.notes.append(text)

    def problem(self, text: str) -> None:
        self.outcome.problems.append(text)

    # the verdict
    def rows(self, output: str, n: int) -> tuple[int, str | None]:
        """(lines exactly once with a legitimate status, what is wrong if not all)."""
        import pyarrow.parquet as pq

        path = f"{output}/results.parquet"
        try:
            fs, inner = Storage.from_environment().filesystem(path)
            with contextlib.suppress(AttributeError):
                fs.invalidate_cache()
            with fs.open(inner, "rb") as handle:
                records = pq.read_table(handle, columns=["line", "status", "error_type"]).to_pylist()
        except (OSError, ValueError) as error:
            return 0, f"no results.parquet ({type(error).__name__})"
        counts = Counter(int(r["line"]) for r in records)
        bad = Counter(
            str(r["error_type"])
            for r in records
            if r["status"] != "succeeded" and r["error_type"] not in LEGITIMATE_ERRORS
        )
        good = {int(r["line"]) for r in records if r["status"] == "succeeded" or r["error_type"] in LEGITIMATE_ERRORS}
        once = sum(1 for line in range(1, n + 1) if counts[line] == 1 and line in good)
        if once == n and len(records) == n:
            return once, None
        missing = sum(1 for line in range(1, n + 1) if counts[line] == 0)
        twice = sum(1 for count in counts.values() if count > 1)
        foreign = sum(1 for line in counts if not 1 <= line <= n)
        parts = [f"{missing} missing" if missing else "", f"{twice} duplicated" if twice else "",
                 f"{foreign} foreign" if foreign else "",
                 ", ".join(f"{count} {kind}" for kind, count in bad.items())]  # fmt: skip
        return once, ", ".join(part for part in parts if part)

    def finish(self, output: str, n: int, *, rerun: tuple[list[str], dict[str, str]] | None = None) -> Outcome:
        """Wait for every run, rerun once if none finished, then judge rows, payments, budget and exit codes."""
        outcome = self.outcome
        for run in self.runs:
            self.wait(run)
        finished = [run for run in self.runs if run.exit in ("0", "1", "3")]
        if not finished and rerun is not None:
            argv, env = rerun
            self.note("rerun")
            self.wait(self.start("R", argv, env))
        keys = [run.key for run in self.runs] + self.extra_keys
        if not self.bench.ledger.wait_idle(keys):
            self.problem("requests still in flight at the emulator 120 s after the runs ended")
        outcome.rows = n
        outcome.once, wrong = self.rows(output, n)
        if wrong:
            outcome.problems.insert(0, f"rows: {wrong}")
        billings: dict[str, list[tuple[str, list[float]]]] = {}
        for key in keys:
            for request in self.bench.ledger.of(key)["requests"]:
                for billing in request["billed"]:
                    billings.setdefault(request["digest"], []).append((key, billing))
        outcome.paid_twice = sum(len(b) - 1 for b in billings.values())
        outcome.ledger_usd = sum(billing[2] for b in billings.values() for _, billing in b)
        outcome.allowed = sum(
            1
            for fault in self.faults
            for b in billings.values()
            for key, (admitted_at, billed_at, _) in b
            if key in fault.keys and admitted_at <= fault.t1 and billed_at >= fault.t0 - GRACE_S
        )
        if outcome.paid_twice > outcome.allowed:
            outcome.problems.append(f"paid twice {outcome.paid_twice} > {outcome.allowed} in flight at the faults")
        outcome.budget_usd = self.budget
        if self.budget is not None and outcome.ledger_usd > self.budget + 1e-9:
            outcome.problems.append(f"ledger ${outcome.ledger_usd:.4f} > budget ${self.budget:.4f}")
        failed_rows = wrong is not None or outcome.once < n
        for run in self.runs:
            if run.hung:
                outcome.problems.append(f"{run.label} hung (killed after {RUN_TIMEOUT_S:.0f} s): {run.said()}")
            elif run.exit == "1" and not failed_rows:
                outcome.problems.append(f"{run.label} exit 1 (rows failed), yet no row failed in the end: {run.said()}")
            elif run.exit not in ("0", "1", "2", "3", "k", "130"):
                outcome.problems.append(f"{run.label} exit {run.exit}: {run.said()}")
            if run.exit not in ("0", "k") and "Traceback (most recent call last)" in run.text():
                self.note(f"{run.label} traceback")
            if run.exit == "2" and "in use by another run" not in run.text():
                self.note(f"{run.label}: {run.said()}")
        outcome.exits = " ".join(f"{run.label}:{run.exit}" for run in self.runs)
        return outcome


# -- scenarios --------------------------------------------------------------------------------------------


def pause_resume(ctx: Context) -> Outcome:
    """SIGSTOP past the lease, a second run on the same output, SIGCONT: the first must stop (exit 2)."""
    n, max_tokens = ctx.rng.randint(30, 50), 40
    pause_s, second_at = ctx.rng.uniform(40, 46), ctx.rng.uniform(LEASE_TTL_S - 2, LEASE_TTL_S + 2)
    requests, output = ctx.write_requests(n, max_tokens), ctx.output()
    argv = ctx.args(requests, output, concurrency=4)
    first = ctx.start("A", argv)
    second = None
    if ctx.wait_sending(first):
        time.sleep(ctx.rng.uniform(0.5, 4.0))
        fault = ctx.fault("SIGSTOP", [first.key])
        ctx.bench.processes.signal(first.process, signal.SIGSTOP)
        time.sleep(max(0.0, fault.t0 + second_at - time.time()))
        second = ctx.start("B", argv)
        # Continued once B has taken over and is sending, or has given up (under load its start-up can take
        # longer than the rest of the pause): the pause is then longer than drawn, never shorter.
        while time.time() < fault.t0 + MAX_PAUSE_S:
            drawn_pause_over = time.time() >= fault.t0 + pause_s
            if drawn_pause_over and (second.process.poll() is not None or ctx.bench.ledger.sending(second.key)):
                break
            time.sleep(0.2)
        ctx.bench.processes.signal(first.process, signal.SIGCONT)
        ctx.note(f"paused {time.time() - fault.t0:.0f} s, B at +{second_at:.0f} s")
    else:
        ctx.note("A ended before sending")
    outcome = ctx.finish(output, n, rerun=(argv, {}))
    if second is not None and ctx.store.is_bucket and ctx.bench.ledger.billed(second.key) and first.exit != "2":
        outcome.problems.append(f"A lost its lease to B (B sent) and exited {first.exit}, not 2: {first.said()}")
    return outcome


def kill_budget(ctx: Context) -> Outcome:
    """kill -9 at a random instant with a budget, then the same command: the ledger stays within it."""
    n, max_tokens = ctx.rng.randint(24, 36), 200  # replies of ~11 s
    ctx.budget = round(ctx.rng.uniform(0.35, 0.75) * ctx.cost(n, max_tokens), 4)
    requests, output = ctx.write_requests(n, max_tokens), ctx.output()
    argv = ctx.args(requests, output, concurrency=8)
    first = ctx.start("A", argv)
    if ctx.wait_sending(first):
        after = ctx.rng.uniform(0.5, 10.0)
        time.sleep(after)
        ctx.fault("kill -9", [first.key])
        ctx.kill(first)
        ctx.note(f"killed at +{after:.1f} s")
    ctx.wait(first)
    second = ctx.start("B", argv)
    outcome = ctx.finish(output, n, rerun=(argv, {}))
    if second.exit not in ("0", "3"):
        outcome.problems.append(f"B exit {second.exit}, not 0 or 3: {second.said()}")
    return outcome


def templates(ctx: Context) -> Outcome:
    """Two runs of --template over one table on one output, 1 s apart: the same command, or (half the seeds)
    another template, whose rendered requests differ line for line. Nothing paid twice, no row lost."""
    n, max_tokens = ctx.rng.randint(20, 40), 40
    table, output = ctx.write_table(n, max_tokens), ctx.output()
    common = ("--model", MODEL, "--max-tokens", str(max_tokens), "--id-column", "id")
    argv = ctx.args(table, output, concurrency=4, extra=("--template", "{{ text }}", *common))
    other = ctx.rng.random() < 0.5
    second = ctx.args(table, output, concurrency=4, extra=("--template", "Again: {{ text }}", *common))
    ctx.start("A", argv)
    time.sleep(1.0)
    ctx.start("B", second if other else argv)
    ctx.note("B: another template" if other else "B: the same command")
    return ctx.finish(output, n, rerun=(argv, {}))


def shard_size(ctx: Context) -> Outcome:
    """A run interrupted (kill -9 or Ctrl-C) or complete, then one with another --shard-size."""
    n, max_tokens = ctx.rng.randint(20, 40), 40
    first_size, second_size = ctx.rng.sample([5, 10, 20, 25], 2)
    how = ctx.rng.choice(["kill -9", "Ctrl-C", "complete"])
    requests, output = ctx.write_requests(n, max_tokens), ctx.output()
    argv = ctx.args(requests, output, concurrency=4)
    first = ctx.start("A", [*argv, "--shard-size", str(first_size)])
    if how != "complete" and ctx.wait_sending(first):
        time.sleep(ctx.rng.uniform(1.0, 6.0))
        ctx.fault(how, [first.key])
        if how == "kill -9":
            ctx.kill(first)
        else:
            ctx.bench.processes.signal(first.process, signal.SIGINT)
    ctx.wait(first)
    ctx.note(f"{how}, shards {first_size} then {second_size}")
    second_argv = [*argv, "--shard-size", str(second_size)]
    ctx.start("B", second_argv)
    return ctx.finish(output, n, rerun=(second_argv, {}))


def store_outage(ctx: Context) -> Outcome:
    """The S3 endpoint unreachable for 20 s mid-run (a proxy in front of moto), with a budget's journal there."""
    assert ctx.store.port is not None
    n, max_tokens = ctx.rng.randint(30, 40), 40
    ctx.budget = round(3 * ctx.cost(n, max_tokens), 4)  # not binding: its journal must be written all the same
    mode: Literal["refuse", "blackhole"] = ctx.rng.choice(["refuse", "blackhole"])
    requests, output = ctx.write_requests(n, max_tokens), ctx.output()
    argv = ctx.args(requests, output, concurrency=3)
    with testing.tcp_relay(ctx.store.port) as proxy:
        env = {"AWS_ENDPOINT_URL": f"http://{proxy.netloc}"}
        first = ctx.start("A", argv, env)
        if ctx.wait_sending(first):
            time.sleep(ctx.rng.uniform(1.0, 4.0))

            def outage() -> None:
                proxy.cut(mode)
                time.sleep(20)
                proxy.restore()

            ctx.fault(f"store {mode}", [first.key], outage)
            ctx.note(f"20 s {mode}")
        return ctx.finish(output, n, rerun=(argv, env))


def redis_restart(ctx: Context) -> Outcome:
    """A run with --limiter-url whose Redis is stopped mid-run and started again, empty."""
    n, max_tokens = ctx.rng.randint(30, 50), 40
    if ctx.seed % 2:
        ctx.budget = round(ctx.rng.uniform(0.5, 0.85) * ctx.cost(n, max_tokens), 4)
    requests, output = ctx.write_requests(n, max_tokens), ctx.output()
    port = testing.free_port()
    with contextlib.ExitStack() as redis:
        url = redis.enter_context(testing.redis_server(port=port))
        argv = ctx.args(requests, output, concurrency=4, extra=("--limiter-url", url))
        first = ctx.start("A", argv)
        if ctx.wait_sending(first):
            time.sleep(ctx.rng.uniform(1.0, 5.0))
            down_s = ctx.rng.uniform(1.0, 5.0)

            def restart() -> None:
                redis.close()
                time.sleep(down_s)
                redis.enter_context(testing.redis_server(port=port))

            ctx.fault("redis restart", [first.key], restart)
            ctx.note(f"Redis down {down_s:.1f} s")
        return ctx.finish(output, n, rerun=(argv, {}))


def worker_lost(ctx: Context) -> Outcome:
    """Two process workers of a Prefect work pool on one s3:// output; one is killed -9 with its flow runs
    mid-shard. Each worker has its own API key: its requests in flight at the kill are the bound."""
    bench = ctx.bench
    n, max_tokens, shard = ctx.rng.randint(30, 40), 40, 10
    pool = f"chaos-{ctx.uid}"
    storage = Storage.from_environment()
    source = ctx.store.location(f"in-{ctx.uid}/requests.jsonl")
    storage.write_bytes(source, ctx.write_requests(n, max_tokens).read_bytes())
    output = ctx.output()
    extra = ("--work-pool", pool, "--shard-size", str(shard), "--max-parallel-shards", "4",
             "--shard-heartbeat-timeout", "10", "--limiter-url", bench.redis_url())  # fmt: skip
    argv = ctx.args(source, output, concurrency=3, extra=extra)
    workers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for label in ("a", "b"):
            name, key, home = f"chaos-{ctx.uid}-{label}", ctx.key(f"worker-{label}"), ctx.work / f"disk-{label}"
            home.mkdir()
            bench.processes.worker_names.add(name)
            command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                       "--limit", "1", "--name", name]  # fmt: skip
            env = {**bench.env, "ANTHROPIC_API_KEY": key, "PREFECT_WORKER_QUERY_SECONDS": "1"}
            log = ctx.work / f"worker-{label}.log"
            workers[label] = (bench.processes.start(command, env=env, log=log, cwd=home), key)
            ctx.extra_keys.append(key)
        deadline = time.monotonic() + 90
        while httpx.get(f"{bench.api_url}/work_pools/{pool}", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                ctx.problem("the work pool never appeared")
                return ctx.finish(output, n)
            time.sleep(0.5)
        run = ctx.start("A", argv)
        victim = ctx.rng.choice(["a", "b"])
        delay = ctx.rng.uniform(0.5, 3.0)
        deadline = time.monotonic() + 150
        killed = False
        while not killed and run.process.poll() is None and time.monotonic() < deadline:
            for label in (victim, "b" if victim == "a" else "a"):
                process, key = workers[label]
                state = bench.ledger.of(key)
                # Mid-shard: it has requests in flight, and answered ones (a shard started a while ago).
                if state["in_flight"] and (state["requests"] or time.monotonic() > deadline - 100):
                    time.sleep(delay)
                    ctx.fault("worker kill -9", [key])
                    count = bench.processes.kill_worker(process, f"chaos-{ctx.uid}-{label}")
                    ctx.note(f"worker {label} killed ({count} processes)")
                    killed = True
                    break
            time.sleep(0.3)
        if not killed:
            ctx.note("no worker was killed")
        outcome = ctx.finish(output, n, rerun=(argv, {}))
        if run.exit != "0":  # the point of the pool: the other worker finishes the lost shard, no rerun needed
            outcome.problems.append(f"the run did not finish past the lost worker (exit {run.exit}): {run.said()}")
        return outcome
    finally:
        for process, _ in workers.values():
            bench.processes.signal(process, signal.SIGTERM)
        for process, _ in workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            bench.processes.signal(process, signal.SIGKILL)
        kill_by_environment({f"chaos-{ctx.uid}-a", f"chaos-{ctx.uid}-b"})


SCENARIO_FUNCTIONS: dict[str, Callable[[Context], Outcome]] = {
    "pause-resume": pause_resume,
    "kill-budget": kill_budget,
    "templates": templates,
    "shard-size": shard_size,
    "store-outage": store_outage,
    "redis-restart": redis_restart,
    "worker-lost": worker_lost,
}


# -- the bench: services started once ---------------------------------------------------------------------


class Bench:
    """The services every run shares (emulator, Prefect server, stores, a Redis for work pools) and the
    processes started, all stopped by `close`."""

    def __init__(self, work: Path, seed: int, src: Path | None = None) -> None:
        self.work = work
        self.seed = seed
        self.src = src
        self.processes = Processes()
        self.stack = contextlib.ExitStack()
        self.stores: dict[str, Store] = {}
        self.skipped: dict[str, str] = {}
        self._redis_url: str | None = None
        self._redis_lock = threading.Lock()
        self.emulator_url = ""
        self.api_url = ""
        self.env: dict[str, str] = {}

    def start(self, stores: list[str]) -> None:
        state = self.work / "state"
        state.mkdir()
        os.environ["PREFECT_ANTHROPIC_STATE_DIR"] = str(state)
        config = EmulatorConfig(
            port=0, request_log=True, ttft_ms=TTFT_MS, latency_jitter_ms=300.0,
            output_tokens_per_second=OUTPUT_TOKENS_PER_S, error_rate_529=BACKGROUND_529, seed=self.seed,
        )  # fmt: skip
        with stderr_to_devnull():
            self.emulator_url = self.stack.enter_context(emulator_process(config)).base_url
        self.ledger = Ledger(self.emulator_url)
        self.api_url = self.start_prefect_server()
        for name in stores:
            self.start_store(name)
        # Each run's own environment: ours without Prefect's, the key and base URL given per run.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ANTHROPIC_"))}
        self.env = {
            **base,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.work / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_ANTHROPIC_STATE_DIR": str(state),
            "PYTHONUNBUFFERED": "1",
        }
        if self.src is not None:
            self.env["PYTHONPATH"] = str(self.src.resolve())

    def start_prefect_server(self) -> str:
        port = testing.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false", PREFECT_API_URL=f"http://127.0.0.1:{port}/api")  # fmt: skip
        command = [str(BIN / "prefect") if (BIN / "prefect").exists() else "prefect", "server", "start",
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        process = self.processes.start(command, env=env, log=self.work / "prefect-server.log")
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start: see {self.work / 'prefect-server.log'}")
            time.sleep(0.5)

    def start_store(self, name: str) -> None:
        if name == "local":
            self.stores[name] = Store("local", str(self.work))
            return
        fixture = {"s3": "s3_server", "gs": "gcs_server", "az": "azurite_server"}[name]
        server = getattr(testing, fixture, None)
        if server is None:
            self.skipped[name] = f"prefect_anthropic.testing.{fixture} is not there (yet)"
            return
        try:
            with stderr_to_devnull():
                store = self.stack.enter_context(server())
            # Its clients, here and in the runs (their environment is this one's), reach it through the environment.
            os.environ.update(store.environment)
            root = make_bucket({"s3": "s3", "gs": "gs", "az": "az"}[name])
        except Exception as error:  # a fixture whose server is not installed here: skip that store, say why
            self.skipped[name] = f"{fixture}() failed: {type(error).__name__}: {str(error)[:120]}"
            return
        url = store.endpoint
        port = int(url.rsplit(":", 1)[1].split("/")[0]) if name == "s3" else None
        self.stores[name] = Store(name, root, port)

    def redis_url(self) -> str:
        """One redis-server for the work pools' shared limiter, started on first use."""
        with self._redis_lock:
            if self._redis_url is None:
                self._redis_url = self.stack.enter_context(testing.redis_server())
            return self._redis_url

    def close(self) -> None:
        try:
            self.processes.stop_all()
        finally:
            self.stack.close()


# -- the table --------------------------------------------------------------------------------------------

COLUMNS = ("scenario", "store", "seed", "rows", "once", "paid 2x", "allowed", "ledger/budget", "exits", "violation")
WIDTHS = (13, 5, 4, 4, 4, 7, 7, 17, 16, 9)


def money(outcome: Outcome) -> str:
    budget = "-" if outcome.budget_usd is None else f"${outcome.budget_usd:.4f}"
    return f"${outcome.ledger_usd:.4f}/{budget}"


def table_line(cells: tuple[str, ...]) -> str:
    return " ".join(cell.ljust(width) if i < 2 or i >= 7 else cell.rjust(width)
                    for i, (cell, width) in enumerate(zip(cells, WIDTHS, strict=True)))  # fmt: skip


def outcome_line(o: Outcome) -> str:
    cells = (o.scenario, o.store, str(o.seed), str(o.rows), str(o.once), str(o.paid_twice), str(o.allowed),
             money(o), o.exits, "yes" if o.violation else "no")  # fmt: skip
    detail = "; ".join(o.problems + o.notes + [f"{o.elapsed_s:.0f} s"])
    return f"{table_line(cells)} {detail}"


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    chosen = [s.strip() for s in args.scenarios.split(",")] if args.scenarios else list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    stores = [s.strip() for s in args.stores.split(",")] if args.stores else None
    runs: list[tuple[float, str, str, int]] = []
    for scenario in chosen:
        scenario_stores, count = SCENARIOS[scenario]
        count = args.runs or count
        for store in scenario_stores:
            if stores is None or store in stores:
                for i, seed in enumerate(range(args.seed, args.seed + count)):
                    # Each scenario's runs spread over the whole schedule (a work pool's CPU beside pauses that
                    # wait), the long ones a little earlier so that the jobs end together.
                    key = (i + 0.5) / count - 0.15 * ESTIMATED_S[scenario] / max(ESTIMATED_S.values())
                    runs.append((key, scenario, store, seed))
    return [(scenario, store, seed) for _, scenario, store, seed in sorted(runs)]


def interrupted(signum: int, frame: Any) -> None:
    """SIGTERM (a CI timeout) ends the bench the way Ctrl-C does: through main's `finally`, every process stopped."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", help=f"Comma-separated subset of: {', '.join(SCENARIOS)}.")
    parser.add_argument("--stores", help="Comma-separated subset of: local, s3, gs, az.")
    parser.add_argument("--runs", type=int, help="Runs per scenario and store (default: 60 runs in all).")
    parser.add_argument("--seed", type=int, default=1, help="First seed (default 1); runs take seed, seed+1, ...")
    parser.add_argument("--jobs", type=int, default=4, help="Scenario runs at once (default 4).")
    parser.add_argument("--json", type=Path, help="Also write every outcome to this JSON file.")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (logs of every run).")
    parser.add_argument(
        "--src",
        type=Path,
        help="Run the command and the workers from this source tree (PYTHONPATH), e.g. `git archive` of the code "
        "before a fix; the emulator, stores and this bench stay this tree's.",
    )
    args = parser.parse_args()
    runs = plan(args)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    stores = sorted({store for _, store, _ in runs})
    bench = Bench(work, args.seed, args.src)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    signal.signal(signal.SIGTERM, interrupted)
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        print(f"chaos: starting the emulator, a Prefect server and the stores ({', '.join(stores)}); work {work}",
              flush=True)  # fmt: skip
        bench.start(stores)
        print(f"services up in {time.monotonic() - started:.0f} s", flush=True)
        for store, why in bench.skipped.items():
            print(f"skipped store {store}: {why}", flush=True)
        runs = [r for r in runs if r[1] in bench.stores]
        print(f"{len(runs)} runs, {args.jobs} at a time\n", flush=True)
        print(f"{table_line(COLUMNS)} notes", flush=True)

        def one(scenario: str, store: str, seed: int) -> Outcome:
            began = time.monotonic()
            ctx = Context(bench, scenario, bench.stores[store], seed)
            try:
                outcome = SCENARIO_FUNCTIONS[scenario](ctx)
            except Exception as error:  # the bench's own failure: a row that says so, never a silent pass
                outcome = ctx.outcome
                outcome.problems.append(f"bench error: {type(error).__name__}: {error}")
                outcome.exits = " ".join(f"{run.label}:{run.exit}" for run in ctx.runs)
            outcome.elapsed_s = time.monotonic() - began
            return outcome

        futures = [pool.submit(one, *run) for run in runs]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            print(outcome_line(outcome), flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bench.close()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    violations = sum(o.violation for o in outcomes)
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ | {"violation": o.violation} for o in outcomes], indent=1))
    print(f"\n{len(outcomes)} runs, {violations} violations ({time.monotonic() - started:.0f} s)")
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
