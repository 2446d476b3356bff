"""Issue 26: what a new user waits for before anything is sent, and whether start-up ever fails.

    python bench/startup.py                 # the table: medians of 5 per cell
    python bench/startup.py --repeat 3      # quicker
    python bench/startup.py --soak 20       # 20 runs, each in a fresh PREFECT_HOME, two at once, both setups

Each `prefect-anthropic run` is a subprocess launched as a user launches it, on a file of one request, against
the emulator (its own process, replies in milliseconds) with a fake ANTHROPIC_API_KEY. Four setups:

- Prefect home fresh (a new, empty PREFECT_HOME every run: a first run, or any new container) or warm (one
  home, used by an unmeasured run first);
- no Prefect API configured (PREFECT_API_URL unset: the run goes without orchestration, see the README), or
  PREFECT_API_URL set to a Prefect server this bench starts once in the background as `make demo` does (its
  own home and a free port) and stops at the end (the run is a flow run there).

Measured per run: time to the first request (launch to the emulator's `first_arrival_at`, the moment it
admitted the first Messages request; both clocks are this machine's), time to exit, and for the same
environment `prefect-anthropic --help` and `prefect-anthropic estimate` (launch to exit), and the CPU time
(user + system) the run used, which the machine's load hardly changes. Medians of --repeat runs.
--soak N runs N in a row, two at once, each in a fresh home, in each setup (no API, and API set): how many
complete with exit 0 and every row written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import MODEL
from prefect_anthropic.emulator import emulator_process
from prefect_anthropic.emulator.server import free_port

BIN = Path(sys.executable).parent
CLI = (
    [str(BIN / "prefect-anthropic")]
    if (BIN / "prefect-anthropic").exists()
    else [sys.executable, "-m", "prefect_anthropic.cli"]
)
PREFECT = [str(BIN / "prefect")]


def write_requests(path: Path, n: int = 1) -> Path:
    with path.open("w") as handle:
        for i in range(n):
            body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": f"Say hi {i}"}]}
            handle.write(json.dumps(body) + "\n")
    return path


def clean_env(home: Path, api_url: str | None) -> dict[str, str]:
    """A new user's environment: no Prefect variables but the home (and the API URL when set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ANTHROPIC_"))}
    env.update(PREFECT_HOME=str(home), ANTHROPIC_API_KEY="sk-ant-fake-startup-bench", PYTHONUNBUFFERED="1")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def background_server(root: Path) -> Iterator[str]:
    """A local Prefect server in the background, started as `make demo` starts one (`cli.demo_server`: its own
    home, a free port); its API URL. Stopped at the end with `prefect server stop`."""
    home = root / "server-home"
    home.mkdir()
    env = {**clean_env(home, None), "PREFECT_SERVER_API_PORT": str(free_port("127.0.0.1"))}
    code = "from prefect_anthropic import cli\nwith cli.prefect_defaults(): print(cli.demo_server()[0])"
    try:
        started = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([*PREFECT, "server", "stop"], env=env, capture_output=True, timeout=120)


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    return time.monotonic() - started, done


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children: what a run cost whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(base_url: str, work: Path, home: Path, api_url: str | None, emulator=None) -> dict[str, float | int]:
    """One run of one request; with `emulator`, reset first and the first request's arrival read after."""
    requests = write_requests(work / "one.jsonl")
    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    command = [*CLI, "run", str(requests), "--output-dir", str(out), "--base-url", base_url, "--no-progress"]
    if emulator is not None:
        emulator.reset()
    launched, cpu_before = time.time(), children_cpu_s()
    elapsed, done = timed(command, clean_env(home, api_url), work)
    row: dict[str, float | int] = {"exit_s": elapsed, "code": done.returncode, "cpu_s": children_cpu_s() - cpu_before}
    if done.returncode != 0:
        print(f"  exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    if emulator is not None:
        first = emulator.stats()["first_arrival_at"]
        row["first_s"] = first - launched if first is not None else float("nan")
    rows = (out / "results.jsonl").read_text().count("\n") if (out / "results.jsonl").exists() else 0
    row["rows"] = rows
    return row


def measure(emulator, root: Path, api_url: str | None, fresh: bool, repeat: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="work-", dir=root))
    warm_home = Path(tempfile.mkdtemp(prefix="home-warm-", dir=root))
    if not fresh:
        one_run(emulator.base_url, work, warm_home, api_url)  # warms the home (database, caches)
    firsts, exits, helps, estimates, cpus = [], [], [], [], []
    for _ in range(repeat):
        home = Path(tempfile.mkdtemp(prefix="home-fresh-", dir=root)) if fresh else warm_home
        row = one_run(emulator.base_url, work, home, api_url, emulator)
        firsts.append(row["first_s"])
        exits.append(row["exit_s"])
        cpus.append(row["cpu_s"])
        env = clean_env(Path(tempfile.mkdtemp(prefix="home-fresh-", dir=root)) if fresh else warm_home, api_url)
        helps.append(timed([*CLI, "--help"], env, work)[0])
        estimates.append(timed([*CLI, "estimate", str(work / "one.jsonl")], env, work)[0])
    return {
        "first": statistics.median(firsts),
        "exit": statistics.median(exits),
        "help": statistics.median(helps),
        "estimate": statistics.median(estimates),
        "first_max": max(firsts),
        "cpu": statistics.median(cpus),
    }


def soak(emulator, root: Path, api_url: str | None, runs: int) -> tuple[int, int]:
    """`runs` runs, two at a time, each in a new home: how many ended with exit 0 and their row."""
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=root))

    def go(i: int) -> bool:
        home = Path(tempfile.mkdtemp(prefix=f"home-soak-{i}-", dir=root))
        row = one_run(emulator.base_url, work, home, api_url)
        return row["code"] == 0 and row["rows"] == 1

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(go, range(runs)))
    return sum(results), runs


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="Runs per cell (medians).")
    parser.add_argument("--soak", type=int, default=0, help="Only the soak: this many runs in each setup.")
    parser.add_argument("--no-server", action="store_true", help="Skip the setups with PREFECT_API_URL.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    print(f"{os.cpu_count()} CPUs, load average before: {load_average()}", file=sys.stderr)
    try:
        with emulator_process() as emulator, contextlib.ExitStack() as stack:
            api_url = None if args.no_server else stack.enter_context(background_server(root))
            setups = [("unset", None)] + ([("set", api_url)] if api_url else [])
            if args.soak:
                for label, url in setups:
                    ok, total = soak(emulator, root, url, args.soak)
                    print(f"PREFECT_API_URL {label}: {ok} of {total} runs completed (fresh homes, two at once)")
                return
            print(
                "| Prefect home | PREFECT_API_URL | first request (s) | exit, 1 request (s) | --help (s) | "
                "estimate (s) | slowest first request (s) | CPU of the run (s) |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for label, url in setups:
                for fresh in (True, False):
                    cell = measure(emulator, root, url, fresh, args.repeat)
                    print(
                        f"| {'fresh' if fresh else 'warm'} | {label} | {cell['first']:.2f} | {cell['exit']:.2f} | "
                        f"{cell['help']:.2f} | {cell['estimate']:.2f} | {cell['first_max']:.2f} | {cell['cpu']:.2f} |",
                        flush=True,
                    )
    finally:
        print(f"load average after: {load_average()}; medians of {args.repeat}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
