"""The `prefect-anthropic` command: run, estimate, demo, emulator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api.formatting import money, number
from .api.models import MODELS_FILE_ENV
from .emulator.config import EmulatorConfig
from .settings import API_KEY_ENV, ClientSettings, RunOptions, add_arguments, explicit_options

if TYPE_CHECKING:
    from .storage import Storage

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_STOPPED = 2
EXIT_BUDGET = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    every row succeeded
  1    some rows failed (their errors are rows of the dataset)
  2    stopped: bad input or configuration, a key or account the API refuses,
       the output in use by another run or taken over by one (lost lease),
       Prefect unreachable, any unexpected error; one `error: ...` line
       (--verbose shows the traceback)
  3    the budget (--max-cost-usd) stopped the run: unsent lines are
       budget_exhausted rows
  130  interrupted (Ctrl-C): run the same command again to resume"""

# Prefect settings the CLI needs, unless the user set them (environment or profile). The ephemeral server's
# telemetry cannot reach the internet from most batch machines: it would log an error at every run. Several
# runs started at once on one machine each start an ephemeral server, and on two cores their start-ups share
# the CPU: Prefect's 20 s is not enough for four (measured: none of four started); waiting longer costs nothing
# when one start is quick.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": False,
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": 180,
}

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: The demo's key, unless one is set: its emulator takes any.
DEMO_API_KEY = "sk-ant-fake-demo-key-for-the-emulator"


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ClientSettings field as a flag (see settings.py), the key, and the blocks to take them from."""
    group = parser.add_argument_group("API, limits and requests (laid over a client block's settings)")
    group.add_argument("--api-key", default=None, help=f"API key (default: env {API_KEY_ENV}).")
    add_arguments(group, ClientSettings)
    blocks = parser.add_argument_group("Prefect blocks")
    blocks.add_argument("--client-block", help="Name of a saved AnthropicClientConfig block (settings and key).")
    blocks.add_argument("--credentials-block", help="Name of a saved AnthropicCredentials block.")


def _settings(args: argparse.Namespace) -> ClientSettings:
    """The settings the command line set explicitly: only the flags typed (a block's fill in the rest)."""
    return ClientSettings(**explicit_options(args, ClientSettings))


def _console_handlers() -> list[Any]:
    """The console log handlers that hold their own rich Console, bound to stderr: Prefect's (when Prefect is
    loaded: never imported for this) and a local run's own."""
    kinds: tuple[type, ...] = (_TerminalHandler,)
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import PrefectConsoleHandler

        kinds += (PrefectConsoleHandler,)
    loggers = [
        logging.getLogger(),
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    return [h for logger in loggers for h in logger.handlers if isinstance(h, kinds)]


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[None]:
    """A live bar on its own line at the bottom of the terminal: done, spent, projected total, $/min,
    req/min against the limit and an ETA from the limits in force. Log lines print above it."""
    from .orchestration.handoff import HANDOFF

    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Column
    from rich.text import Text

    class RunBar(Progress):
        """The bar, and under it a line of money and rates (two lines fit an 80-column terminal)."""

        details = ""

        def get_renderables(self):
            yield self.make_tasks_table(self.tasks)
            yield Text(self.details, overflow="ellipsis", no_wrap=True)

    bar = RunBar(
        BarColumn(bar_width=16),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")),
        console=Console(stderr=True),
        transient=False,
    )
    task_id = bar.add_task("starting", total=100)

    def listener(run) -> None:
        bar.details = run.details()
        bar.update(task_id, completed=run.percent, description=run.headline())

    handlers = _console_handlers()
    own_consoles = [handler.console for handler in handlers]
    HANDOFF.progress_listeners.append(listener)
    with bar:
        for handler in handlers:
            handler.console = bar.console  # through the live display: printed above the bar, never into it
        try:
            yield
        finally:
            HANDOFF.progress_listeners.remove(listener)
            for handler, console in zip(handlers, own_consoles, strict=True):
                handler.console = console


# The flow's own parameters (flows.py's generate_dataset), taken here for `run` and the drop-in script alike.
def run_flow(
    requests_path: str,
    output_dir: str,
    settings: ClientSettings,
    options: RunOptions | None = None,
    *,
    client_block: str | None = None,
    credentials_block: str | None = None,
    original_layout_path: str | None = None,
    parquet_beside_original: bool = False,
    show_progress: bool = True,
    input_table: str | None = None,
    input_columns: list[str] | None = None,
    with_prefect: bool | None = None,
    verbose: bool = False,
) -> int:
    """Run the dataset and turn its outcome into an exit code, with a message a user can act on (and, with
    `verbose`, the tracebacks on the terminal too). `run` and the drop-in script both come here: as a flow run
    when `runs_as_flow` says so (unless `with_prefect` decides), else with plain asyncio, said in one line."""
    from .dataset.run_lock import OutputDirectoryLocked
    from .engine import FatalAPIError, RunStopped
    from .orchestration.handoff import HANDOFF
    from .orchestration.observability import RowsFailed
    from .settings import MissingAPIKeyError

    options = options or RunOptions()
    if with_prefect is None:
        with_prefect = runs_as_flow(options)
    early = with_prefect and sends_early(options, client_block, credentials_block, settings.limiter_block)
    stopping: tuple[type[BaseException], ...] = (
        MissingAPIKeyError,
        FileNotFoundError,
        PermissionError,
        ValueError,
        OutputDirectoryLocked,
    )
    if with_prefect and not early:  # Prefect's errors, a work pool's (fanout imports Prefect): these load them
        from prefect.exceptions import ObjectNotFound

        from .orchestration.fanout import OutputDirectoryNotShared

        stopping += (ObjectNotFound, OutputDirectoryNotShared)
    if not with_prefect:
        print(LOCAL_RUN_NOTICE, file=sys.stderr)
    run_fields: dict[str, Any] = {
        "input_table": input_table,
        "input_columns": input_columns,
        "original_layout_path": original_layout_path,
        "parquet_beside_original": parquet_beside_original,
    }

    stop = HANDOFF.stop

    def on_interrupt(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        stop.set()
        print("\nstopping: no new requests; saving those in flight (Ctrl-C again to quit now)", file=sys.stderr)

    stop.clear()
    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        if early:  # the flow run sets its terminal up once Prefect is loaded
            quiet_terminal: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:
            quiet_terminal = _one_line_errors(verbose) if with_prefect else _terminal_log(verbose)
        with quiet_terminal, _progress_bar(show_progress):
            if early:
                flow_run = _flow_run_sending_early(
                    str(requests_path), str(output_dir), settings, options, run_fields, verbose
                )
            elif with_prefect:
                from .orchestration.flows import generate_dataset

                flow_run = generate_dataset(
                    requests_path=str(requests_path),
                    output_dir=str(output_dir),
                    settings=settings,
                    client_block=client_block,
                    credentials_block=credentials_block,
                    **options.model_dump(),
                    **run_fields,
                )
            else:
                flow_run = _without_prefect(
                    str(requests_path), str(output_dir), settings, options, run_fields, client_block, credentials_block
                )
            summary = asyncio.run(flow_run)
    except RowsFailed as failed:  # --fail-on-errors: the flow run is Failed; the dataset is written all the same
        summary = failed.summary
    except FatalAPIError as error:
        print(f"error: the run stopped: {error}", file=sys.stderr)
        return EXIT_STOPPED
    except stopping as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    except (RunStopped, KeyboardInterrupt):
        print("interrupted: finished requests are saved; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    print(
        f"{number(summary['succeeded'])} of {number(summary['requests'])} requests succeeded, "
        f"{number(summary['failed'])} failed; cost {money(summary['cost_usd'])}; outputs in {output_dir}",
        file=sys.stderr,
    )
    if summary["stopped_by_budget"]:
        print(
            f"stopped by the budget of {money(summary['budget_usd'])}: unsent lines are budget_exhausted rows; "
            "run the same command with a higher --max-cost-usd to resume",
            file=sys.stderr,
        )
        return EXIT_BUDGET
    return EXIT_OK if summary["failed"] == 0 else EXIT_SOME_FAILED


LOCAL_RUN_NOTICE = (
    "no Prefect server configured: running locally without orchestration (same outputs, resume, lock and "
    "budget); to see runs in the Prefect UI, `prefect server start` and set PREFECT_API_URL"
)


def runs_as_flow(options: RunOptions) -> bool:
    """Whether a run is a Prefect flow run. On a configured server, always: the UI shows it. Without one, a
    flow run would first start Prefect's temporary server (20-30 s on 2 cores, and its UI is never served), so
    a run goes through `shard_loop.run_dataset` instead, the same steps with plain asyncio, in any mode. Work
    pools (workers take flow runs) need Prefect: they stay flow runs and pay that start."""
    return prefect_api_configured() or bool(options.work_pool)


def prefect_api_configured() -> bool:
    """Whether a Prefect server is configured: without one a flow run starts a temporary server first, which
    costs seconds and shows nothing after."""
    return configured_prefect_api()[0] is not None


def configured_prefect_api() -> tuple[str | None, str | None]:
    """The Prefect API URL and key in force, read without loading Prefect: the environment's, else the active
    profile's; when Prefect is loaded already, the settings in force (a test harness's, the demo's)."""
    if "prefect.settings" in sys.modules:  # loaded already: its settings in force are the whole answer
        from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

        return PREFECT_API_URL.value() or None, PREFECT_API_KEY.value() or None
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], os.environ.get("PREFECT_API_KEY") or None
    from .api.models import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, ValueError):
        return None, None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = profiles.get("profiles", {}).get(active, {})
    return profile.get("PREFECT_API_URL") or None, profile.get("PREFECT_API_KEY") or None


def sends_early(options: RunOptions, *block_names: str | None) -> bool:
    """Whether a flow run starts sending before Prefect is loaded (`_flow_run_sending_early`): on a configured
    server, in real time on this machine, with no block to read first (blocks are read through Prefect)."""
    named = (*block_names, options.storage_block)
    return options.mode == "realtime" and not options.work_pool and not any(named) and prefect_api_configured()


async def _prefect_server_answers() -> bool:
    """Whether the configured Prefect server answers its health check (a run sends nothing before it does)."""
    import httpx

    url, key = configured_prefect_api()
    if url is None:
        return False
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.get(url.rstrip("/") + "/health", headers=headers)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def _flow_run_sending_early(
    requests_path: str,
    output_dir: str,
    settings: ClientSettings,
    options: RunOptions,
    run_fields: dict[str, Any],
    verbose: bool,
) -> dict[str, Any]:
    """A flow run on a configured server whose first requests leave before Prefect has loaded.

    Loading Prefect and creating the flow run take 2-3 s of CPU on 2 cores, the rest of a run's start-up well
    under one: so the run opens (its output held, its budget journaled, as always) and its first shards start
    sending at once, while Prefect loads in a thread; the flow run then adopts the open run, and each shard
    task takes over the shard already under way. A server that does not answer its health check first gets
    the ordinary start-up, which stops with Prefect's own message before anything is sent."""
    from .dataset.pipeline import open_run
    from .dataset.setup import RunSetup
    from .orchestration.handoff import HANDOFF

    setup = RunSetup.resolve(settings, options)  # no block is named (`sends_early`): nothing to read through Prefect
    flow_parameters = {
        "requests_path": requests_path,
        "output_dir": output_dir,
        "settings": settings,
        **options.model_dump(),
        **run_fields,
    }
    if not await _prefect_server_answers():
        return await _flow_run_once_prefect_loads(flow_parameters, verbose)
    setup.check()
    handed = {"stop": HANDOFF.stop, "progress_listeners": HANDOFF.progress_listeners}
    async with open_run(requests_path, output_dir, setup, **handed, **run_fields) as run:
        run.start_sending()
        HANDOFF.opened_early[output_dir] = run
        try:
            return await _flow_run_once_prefect_loads(flow_parameters, verbose)
        finally:
            HANDOFF.opened_early.pop(output_dir, None)
            await run.stop_sending_early()


async def _flow_run_once_prefect_loads(flow_parameters: dict[str, Any], verbose: bool) -> dict[str, Any]:
    flows = await asyncio.to_thread(importlib.import_module, f"{__package__}.orchestration.flows")
    with prefect_defaults(), _one_line_errors(verbose):
        result: dict[str, Any] = await flows.generate_dataset(**flow_parameters)
        return result


async def _without_prefect(
    requests_path: str,
    output_dir: str,
    settings: ClientSettings,
    options: RunOptions,
    run_fields: dict[str, Any],
    client_block: str | None = None,
    credentials_block: str | None = None,
) -> dict[str, Any]:
    from .dataset.shard_loop import run_with_setup
    from .orchestration.edge import resolve_run
    from .orchestration.handoff import HANDOFF

    # Blocks named are read as the flow reads them (from Prefect's local database); none, no Prefect.
    setup = await resolve_run(settings, options, client_block=client_block, credentials_block=credentials_block)
    handed = {"stop": HANDOFF.stop, "progress_listeners": HANDOFF.progress_listeners}
    return await run_with_setup(requests_path, output_dir, setup, **handed, **run_fields)


class _TerminalHandler(logging.Handler):
    """The terminal's log lines of a run without Prefect (Prefect's console handler is not loaded): through a
    rich Console, which the progress bar swaps for its own so that lines print above it; one line a record
    unless --verbose (the CLI says why a run stopped in its own `error: ...` line)."""

    def __init__(self, level: int | str, verbose: bool) -> None:
        from rich.console import Console

        super().__init__(level)
        self.console = Console(stderr=True)
        self.verbose = verbose
        self.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            one_line = _without_traceback(self.format)
            text = self.format(record) if self.verbose else one_line(record).split("\n", 1)[0]
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _terminal_log(verbose: bool) -> Iterator[None]:
    """The package's log lines on the terminal at the level the CLI chose (`_log_levels`: warnings, or
    --log-level with --verbose), unless the caller set logging up itself (the drop-in's basicConfig)."""
    if logging.getLogger().handlers:
        yield
        return
    level = os.environ.get("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    logger = logging.getLogger("prefect_anthropic")
    handler = _TerminalHandler(level, verbose)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(handler.level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class _OneLineFailure(logging.Filter):
    """The flow engine's own report of a failed run (its traceback, then "Finished in state Failed"), left off
    the terminal: the CLI says why in one `error: ...` line. The Prefect server still gets both."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "prefect.flow_runs" or record.levelno < logging.ERROR:
            return True
        reports = ("Encountered exception during execution", "Finished in state Failed")
        return not record.getMessage().startswith(reports)


def _without_traceback(format_record: Callable[[logging.LogRecord], str]) -> Callable[[logging.LogRecord], str]:
    """A handler's `format` that prints the record's line but not its traceback (for this handler only: the
    record is restored for the next, the Prefect server's, which keeps the traceback)."""

    def format_line(record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return format_record(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

    return format_line


def _console_level(level: str, verbose: bool) -> str:
    return level if verbose else "WARNING"


def _logging_environment(level: str = "INFO", verbose: bool = False) -> dict[str, str]:
    """Logs at `level` reach the Prefect server; the terminal shows warnings and errors only (Prefect's
    banners and per-task lines too with --verbose). Quiet terminal, full server logs. Prefect reads these when
    it sets up its logging, at import: `main` sets them before it imports Prefect."""
    return {"PREFECT_LOGGING_LEVEL": level, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": _console_level(level, verbose)}


@contextlib.contextmanager
def _log_levels(level: str = "INFO", verbose: bool = False) -> Iterator[None]:
    """The levels of `_logging_environment` on Prefect's console handlers where Prefect set them up already
    (an in-process command after another: a test, a notebook), for the block."""
    console = _console_level(level, verbose)
    handlers = _console_handlers() if "prefect" in sys.modules else []  # already set up: adjust in place
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(console)
    try:
        yield
    finally:
        for handler, previous in zip(handlers, levels, strict=True):
            handler.setLevel(previous)


@contextlib.contextmanager
def _one_line_errors(verbose: bool) -> Iterator[None]:
    """Without --verbose, the terminal shows no traceback: log lines keep their first line, and the flow
    engine's report of a failed run is left off (the CLI says why in one `error: ...` line)."""
    if verbose:
        yield
        return
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect sets its handlers up lazily: they must exist to be adjusted
    handlers = list({id(handler): handler for handler in _console_handlers()}.values())  # one may serve several loggers
    one_line = _OneLineFailure()
    for handler in handlers:
        handler.addFilter(one_line)
        handler.format = _without_traceback(handler.format)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(one_line)
            del handler.format  # the class's own again


def _run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        options = RunOptions(**explicit_options(args, RunOptions))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    with _log_levels(args.log_level, args.verbose):
        return _run_flow_from_args(args, settings, options)


def _run_flow_from_args(args: argparse.Namespace, settings: Any, options: RunOptions) -> int:
    requests_path, input_table, columns = args.requests, None, None
    if args.template is not None:
        from .dataset.tables import RequestTemplate, TableError, render_requests, template_text
        from .orchestration.edge import resolve_storage

        columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        try:
            storage = asyncio.run(resolve_storage(getattr(args, "storage_block", None)))
            # Every row is rendered before anything is sent: a template error costs nothing.
            template = RequestTemplate(
                template_text(args.template, storage) or "",
                model=args.model,
                max_tokens=args.max_tokens,
                system=template_text(args.system, storage),
                id_column=args.id_column,
            )
            rendered = render_requests(args.requests, args.output_dir, template, storage=storage)
        except (TableError, FileNotFoundError, ValueError) as error:
            print(f"error: {error}; nothing was sent", file=sys.stderr)
            return EXIT_STOPPED
        requests_path, input_table = str(rendered.requests_path), args.requests
    elif Path(args.requests).suffix.lower() in (".csv", ".parquet"):
        print(f"error: {args.requests} is a table: give --template (and --model, --max-tokens)", file=sys.stderr)
        return EXIT_STOPPED
    if options.deadline:
        from .dataset.auto_mode import absolute_deadline

        try:  # a duration counts from the command's start, Prefect's start-up included
            options = options.model_copy(update={"deadline": absolute_deadline(options.deadline)})
        except ValueError as error:
            print(f"error: {error}; nothing was sent", file=sys.stderr)
            return EXIT_STOPPED
    return run_flow(
        requests_path,
        args.output_dir,
        settings,
        options,
        input_table=input_table,
        input_columns=columns,
        client_block=args.client_block,
        credentials_block=args.credentials_block,
        original_layout_path=args.original_layout,
        show_progress=not args.no_progress,
        verbose=args.verbose,
    )


def _cancel_batches(args: argparse.Namespace) -> int:
    from .dataset.batch_mode import cancel_batches
    from .orchestration.edge import resolve_run

    async def cancel() -> list[str]:
        setup = await resolve_run(
            _settings(args), client_block=args.client_block, credentials_block=args.credentials_block
        )
        return await cancel_batches(args.output_dir, setup)

    canceled = asyncio.run(cancel())
    print(f"canceled {len(canceled)} batches: {' '.join(canceled) or '-'}", file=sys.stderr)
    print("run the same `run --mode batch` command again to collect what finished", file=sys.stderr)
    return EXIT_OK


def _estimate(args: argparse.Namespace) -> int:
    from .dataset.auto_mode import auto_estimate
    from .dataset.estimate import estimate_file, format_estimate
    from .engine import FatalAPIError
    from .orchestration.edge import resolve_storage
    from .settings import MissingAPIKeyError

    try:
        settings, api_key = _resolved(args)  # a bad schema or models file: exit 2
        storage = asyncio.run(resolve_storage())  # bad storage options: exit 2
        exact = asyncio.run(_exact_input_tokens(args.requests, settings, api_key, storage)) if args.exact else None
        result = estimate_file(args.requests, settings, exact_input_tokens=exact, storage=storage)
        auto = RunOptions(**explicit_options(args, RunOptions))
        result["auto"] = auto_estimate(
            result, auto.deadline, margin=auto.deadline_margin, slack_s=auto.deadline_slack_s
        )
    except (FileNotFoundError, ValueError, FatalAPIError, MissingAPIKeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_estimate(result))
    return EXIT_OK if not result["rejected_lines"] else EXIT_SOME_FAILED


def _resolved(args: argparse.Namespace) -> tuple[ClientSettings, str]:
    """The explicit settings over a block's, and the key (a block is read only when one is named)."""
    from .settings import api_key_from_env

    settings = _settings(args)
    if not (args.client_block or args.credentials_block):
        return settings, api_key_from_env()
    from .orchestration.blocks import resolve_settings

    return asyncio.run(resolve_settings(settings, args.client_block, args.credentials_block))


async def _exact_input_tokens(
    requests: str, settings: ClientSettings, api_key: str, storage: Storage
) -> dict[int, int]:
    from .dataset.estimate import prepared_requests
    from .dataset.token_count import count_input_tokens
    from .settings import MissingAPIKeyError

    if not api_key:
        raise MissingAPIKeyError(f"estimate --exact asks the API: set {API_KEY_ENV} or pass --api-key")
    items = (item for item, problem in prepared_requests(requests, settings, storage) if problem is None)
    return await count_input_tokens(
        items,
        requests,
        api_key=api_key,
        base_url=settings.api_base_url,
        api_version=settings.api_version,
        tier=settings.tier,
    )


def _demo(args: argparse.Namespace) -> int:
    """The example run as a flow run on a Prefect server whose UI stays up to look at: the configured one, or
    a local one started in the background (and reused by the next demo); its address and how to stop it."""
    from .emulator import emulator_in_thread

    try:
        api_url, stop_command = demo_server()
    except PrefectServerNotStarted as error:
        print(f"error: {error}; nothing was sent", file=sys.stderr)
        return EXIT_STOPPED
    output_dir = Path(args.output_dir)
    requests = Path(args.requests or EXAMPLES / "requests.jsonl")
    if not requests.exists() and not args.requests:  # installed without the repository's examples
        output_dir.mkdir(parents=True, exist_ok=True)
        requests = output_dir / "requests.jsonl"
        lines = (
            json.dumps(
                {
                    "model": "claude-sonnet-5-5",
                    "max_tokens": 1024,
                    "messages": [{"role": "user", "content": f"How much is 8 * {x}? Return only the result."}],
                    "metadata": {"row_id": x},
                }
            )
            for x in range(200)
        )
        requests.write_text("\n".join(lines) + "\n")
    # Replies paced as Claude's: about a second to the first token, then 75 output tokens a second.
    with emulator_in_thread(
        EmulatorConfig(port=0),
        requests_per_minute=1200,
        input_tokens_per_minute=200_000,
        output_tokens_per_minute=40_000,
        ttft_ms=900,
        latency_jitter_ms=600,
        output_tokens_per_second=75,
        error_rate_529=0.02,
        seed=7,
    ) as emulator:
        print(
            f"Emulator on {emulator.base_url}: 1,200 requests/min, first token after 0.6-1.2 s then "
            "75 tokens/s, 2% overloaded errors.",
            file=sys.stderr,
        )
        settings = ClientSettings(base_url=emulator.base_url, requests_per_minute=1200)
        with _log_levels(), _on_prefect_api(api_url):
            code = run_flow(str(requests), str(output_dir), settings, RunOptions(shard_size=50), with_prefect=True)
            address = asyncio.run(_flow_run_address(str(output_dir)))
        stats = emulator.stats()
    print(
        f"The emulator billed {stats['billed_requests']} requests (${stats['cost_usd']:.4f}); "
        f"dataset: {output_dir / 'results.parquet'}",
        file=sys.stderr,
    )
    print(f"The run in the Prefect UI (flow run, shard tasks, logs, artifacts): {address}", file=sys.stderr)
    if stop_command:
        print(
            f"The Prefect server stays up for later runs (`export PREFECT_API_URL={api_url}` to record them "
            f"there); stop it with: {stop_command}",
            file=sys.stderr,
        )
    return code


class PrefectServerNotStarted(RuntimeError):
    """The demo's local Prefect server did not answer: its process ended, or it did not start in time."""


#: The file, in PREFECT_HOME, where the demo's background server writes its output.
SERVER_LOG = "prefect-anthropic-server.log"
#: Prefect's own record of its background server (`prefect server stop` reads it).
SERVER_PID_FILE = "server.pid"
FLOW_NAME = "anthropic-requests-to-dataset"


def demo_server() -> tuple[str, str | None]:
    """The API the demo records its run on, and the command that stops its server when a demo started it.

    A configured server (PREFECT_API_URL) as it is. Otherwise a local server on Prefect's own host and port
    (PREFECT_SERVER_API_HOST and _PORT: 127.0.0.1:4200), started once in the background and reused while it
    answers. Started as `prefect server start` in a session of its own, its output in PREFECT_HOME/SERVER_LOG,
    its process id in Prefect's pid file, so that `prefect server stop` stops it. Not `--background`: Prefect
    3.9 keeps that server's output piped to the command that started it, which has exited by then."""
    import prefect.settings as prefect_settings

    if prefect_api_configured():
        return str(prefect_settings.PREFECT_API_URL.value()), None
    host = str(prefect_settings.PREFECT_SERVER_API_HOST.value())
    port = int(prefect_settings.PREFECT_SERVER_API_PORT.value())
    home = Path(prefect_settings.PREFECT_HOME.value()).expanduser()
    reach = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    api_url = f"http://{f'[{reach}]' if ':' in reach else reach}:{port}/api"
    stop = ("" if "PREFECT_HOME" not in os.environ else f"PREFECT_HOME={home} ") + "prefect server stop"
    pid_file = home / SERVER_PID_FILE
    if _api_healthy(api_url):
        return api_url, stop if pid_file.exists() else None
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / SERVER_LOG
    print(f"Starting a local Prefect server on {api_url.removesuffix('/api')} (log: {log_path})", file=sys.stderr)
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    pid_file.write_text(str(process.pid))
    timeout = float(prefect_settings.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    deadline = time.monotonic() + timeout
    while not _api_healthy(api_url):
        ended = process.poll()
        if ended is not None or time.monotonic() > deadline:
            if ended is None:
                process.terminate()
            with contextlib.suppress(OSError):
                pid_file.unlink()
            why = f"it ended with code {ended}" if ended is not None else f"not up in {timeout:.0f} s"
            raise PrefectServerNotStarted(
                f"the local Prefect server on port {port} did not start ({why}; its log: {log_path}). "
                "Choose a free port with PREFECT_SERVER_API_PORT, or point PREFECT_API_URL at a running server"
            )
        time.sleep(0.25)
    return api_url, stop


def _api_healthy(api_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _on_prefect_api(api_url: str) -> Iterator[None]:
    """Flow runs inside go to this API (Prefect is loaded: its settings, not the environment, say where)."""
    import prefect.settings

    with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api_url}):
        yield


async def _flow_run_address(output_dir: str) -> str:
    """The UI page of the newest run of the flow into `output_dir` (the UI's runs page if none is found)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_UI_URL

    ui = str(PREFECT_UI_URL.value() or "").rstrip("/")
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=20,
        )
    for run in runs:
        if run.parameters.get("output_dir") == output_dir:
            return f"{ui}/runs/flow-run/{run.id}"
    return f"{ui}/runs"


def _emulator(args: argparse.Namespace) -> int:
    from .emulator import serve

    config = EmulatorConfig.from_namespace(args)
    print(f"Anthropic API emulator on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    serve(config)
    return EXIT_OK


VERBOSE_HELP = "Show the traceback of an error (exit 2), not only its one line."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-anthropic",
        description=__doc__,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="Send every request of a JSONL file, or a table's rows through a template; write the dataset.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "requests", metavar="TABLE_OR_REQUESTS",
        help="A .csv, .parquet or .jsonl table (with --template), or a JSONL file of Messages API requests.",
    )  # fmt: skip
    table = run.add_argument_group("a table and a template instead of a request file")
    table.add_argument(
        "--template", metavar="TEXT_OR_FILE",
        help="Jinja2 template of the user message, over the row's columns (strict: an undefined column is an "
        "error before anything is sent); or rendering a whole request body as JSON.",
    )  # fmt: skip
    table.add_argument("--model", help="Model of every request (unless the rendered body sets one).")
    table.add_argument("--max-tokens", type=int, help="max_tokens of every request (unless the body sets it).")
    table.add_argument("--system", metavar="TEXT_OR_FILE", help="Jinja2 template of the system prompt.")
    table.add_argument("--id-column", help="Column giving each row's custom_id (default: a digest of the row).")
    table.add_argument("--columns", help="Comma-separated table columns to keep in the outputs (default: all).")
    run.add_argument("--output-dir", required=True, help="Directory for results.parquet/.jsonl and summary.json.")
    _add_client_arguments(run)
    add_arguments(run.add_argument_group("shards and mode"), RunOptions)
    run.add_argument("--original-layout", metavar="PATH", help="Also write the original script's JSONL layout.")
    # Flags declared alike in shape (a long help kept on few lines): each its own flag, nothing to share.
    run.add_argument(
        "--storage-options", metavar="JSON",
        help="fsspec storage options for URL inputs and outputs, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}' "
        "(env PREFECT_ANTHROPIC_STORAGE_OPTIONS; never a flow parameter). Default: what the filesystem finds.",
    )  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="No progress bar.")
    run.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="Level of the log lines the Prefect server gets (default INFO); the terminal shows warnings only.",
    )  # fmt: skip
    run.add_argument(
        "--verbose",
        action="store_true",
        help="Show the log lines at --log-level in the terminal too, Prefect's too, and the traceback of an error.",
    )
    run.set_defaults(handler=_run)

    cancel = commands.add_parser("cancel-batches", help="Cancel the unfinished batches of a batch-mode run.")
    cancel.add_argument("--output-dir", required=True, help="The run's output directory.")
    _add_client_arguments(cancel)
    cancel.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    cancel.set_defaults(handler=_cancel_batches)

    estimate = commands.add_parser("estimate", help="Count, price and time a request file without any API call.")
    estimate.add_argument("requests", help="JSONL file of Messages API requests.")
    _add_client_arguments(estimate)
    estimate.add_argument(
        "--exact", action="store_true",
        help="Count input tokens with the API's free count_tokens endpoint (within its own rate limit; "
        "counts are kept, so a big file resumes).",
    )  # fmt: skip
    estimate.add_argument("--json", action="store_true", help="Print the estimate as one JSON object.")
    estimate.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    auto_options = ("deadline", "deadline_margin", "deadline_slack_s")
    add_arguments(
        estimate, RunOptions, skip=tuple(name for name in RunOptions.model_fields if name not in auto_options)
    )
    estimate.set_defaults(handler=_estimate)

    demo = commands.add_parser("demo", help="Start the emulator and run the flow on the shipped example.")
    demo.add_argument("--requests", help="Request file (default: examples/requests.jsonl).")
    demo.add_argument("--output-dir", default="demo-output", help="Where the dataset goes (default demo-output).")
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    demo.set_defaults(handler=_demo)

    emulator = commands.add_parser("emulator", help="Run the local Anthropic API emulator.")
    EmulatorConfig.add_arguments(emulator)
    emulator.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    emulator.set_defaults(handler=_emulator)
    return parser


@contextlib.contextmanager
def prefect_defaults() -> Iterator[None]:
    """PREFECT_DEFAULTS in force for what runs inside, the user's own values (environment or profile) first.

    Through Prefect's settings API, not the environment: Prefect reads its settings once, when it is imported
    (this package's blocks import it), so a variable set later is never seen (the start-up timeout stayed 20 s).
    The ephemeral server is started inside, and is given these settings as its environment."""
    import prefect.settings

    defaults = {getattr(prefect.settings, name): value for name, value in PREFECT_DEFAULTS.items()}
    with prefect.settings.temporary_settings(set_defaults=defaults):
        yield


def _uses_prefect(args: argparse.Namespace) -> bool:
    """Whether the command may talk to a Prefect API (and so start an ephemeral server): a run that is a flow
    run (`runs_as_flow`), or any command naming a block. A local run imports no Prefect at all."""
    blocks = ("client_block", "credentials_block", "storage_block", "limiter_block")
    if args.command == "demo":
        return True
    if args.command == "run":
        mode, pool = getattr(args, "mode", "realtime"), getattr(args, "work_pool", None)
        options = RunOptions.model_validate({"mode": mode, "work_pool": pool})
        if sends_early(options, *(getattr(args, name, None) for name in blocks)):
            return False  # Prefect loads while the first requests are sent (`_flow_run_sending_early`)
        if prefect_api_configured() or pool:
            return True
    return any(getattr(args, name, None) for name in blocks)


def stopped_message(error: BaseException) -> str:
    """One line for an error no handler expected: its type and message, and what to do where we know it."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, RuntimeError) and "ephemeral Prefect API server" in str(error):
        return (
            f"Prefect's temporary server did not start in time ({text}); nothing was sent. Point PREFECT_API_URL "
            "at a running server (`prefect server start`), or wait longer with "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (the CLI waits 180 s unless set)"
        )
    if isinstance(error, RuntimeError) and str(error).startswith("Failed to reach API at"):
        return (
            f"the Prefect server cannot be reached ({text}); nothing was sent. Start it, or point PREFECT_API_URL "
            "at a running one (unset, the run starts a temporary server)"
        )
    return text


def command_environment(args: argparse.Namespace) -> dict[str, str]:
    """What a command puts in this process's environment, for its life, so that the processes it starts (an
    emulator, Prefect's server, workers) read it too: the key and the storage credentials (never flow
    parameters: workers bring their own), the models file, Prefect's logging levels; the demo's key unless one
    is set."""
    values: dict[str, str | None] = {}
    if args.command in ("run", "estimate", "cancel-batches"):
        values |= {API_KEY_ENV: args.api_key, MODELS_FILE_ENV: getattr(args, "models_file", None)}
    if args.command == "run":
        from .storage import STORAGE_OPTIONS_ENV

        values |= {STORAGE_OPTIONS_ENV: args.storage_options, **_logging_environment(args.log_level, args.verbose)}
    if args.command == "demo":
        values |= _logging_environment()
        if API_KEY_ENV not in os.environ:
            values[API_KEY_ENV] = DEMO_API_KEY
    return {name: value for name, value in values.items() if value}


@contextlib.contextmanager
def environment_set(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in this process's environment (and so in the processes it starts) for the block, then the
    previous ones again: a command run in-process (a test, a notebook) leaves nothing behind."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: list[str] | None = None) -> int:
    """The exit code means one thing (EXIT_CODES_HELP): an error no handler expected stops with 2 and one line,
    never 1, the code of "some rows failed" (a wrapper retrying on 1 would otherwise pay again)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a flag argparse refused (it printed why), or --help: nothing was sent
        return stop.code if isinstance(stop.code, int) else EXIT_STOPPED
    verbose = bool(getattr(args, "verbose", False))
    try:
        # The one place the command line writes the environment; before Prefect is imported (it reads its
        # logging levels then).
        with (
            environment_set(command_environment(args)),
            prefect_defaults() if _uses_prefect(args) else contextlib.nullcontext(),
        ):
            return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # the command line's last word: every error is one line and exit 2
        from .engine import FatalAPIError, RunStopped

        if isinstance(error, RunStopped):
            print("interrupted: run the same command again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        if verbose:
            import traceback

            traceback.print_exc()
        if isinstance(error, FatalAPIError):
            print(f"error: the run stopped: {error}", file=sys.stderr)
        else:
            print(f"error: {stopped_message(error)}", file=sys.stderr)
        return EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
