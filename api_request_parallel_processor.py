"""Drop-in replacement for the original `api_request_parallel_processor.py`.

Same flags, same defaults, same output layout (one JSON array per line: [request, response] or
[request, response, metadata]; a failed request lists its errors in place of the response), plus a
Parquet file beside it. Under the hood it is `prefect-anthropic run` (the same function, `cli.run_flow`, so
the same path for the same flags): token buckets for requests, input and output tokens per minute, retries,
resumable shards. With a Prefect server configured (PREFECT_API_URL) the run is a flow run on it; with none,
the same steps run with plain asyncio, so nothing is paid for starting one (one stderr line says so).

    python api_request_parallel_processor.py \\
        --requests_filepath examples/requests.jsonl \\
        --request_url https://api.anthropic.com/v1/messages \\
        --max_requests_per_minute 40 --max_tokens_per_minute 16000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# The original logged with loguru's levels: TRACE and SUCCESS as well as the standard ones.
LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
TRUE_WORDS = {"true", "t", "yes", "y", "1", "on"}
FALSE_WORDS = {"false", "f", "no", "n", "0", "off"}


def parse_bool(text: str) -> bool:
    """`--use_caching False` means False (the original took any value as true)."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_level(text: str) -> int:
    name = str(text).strip().upper()
    if name in LEVELS:
        return LEVELS[name]
    if name.isdigit():
        return int(name)
    raise argparse.ArgumentTypeError(f"unknown logging level {text!r}; choose one of {', '.join(LEVELS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests_filepath", required=True)
    parser.add_argument("--save_filepath", default=None)
    parser.add_argument("--request_url", default="https://api.anthropic.com/v1/messages")
    parser.add_argument("--api_key", default=os.getenv("ANTHROPIC_API_KEY"))
    parser.add_argument("--max_requests_per_minute", type=float, default=40)
    parser.add_argument("--max_tokens_per_minute", type=float, default=16_000)
    parser.add_argument("--max_attempts", type=int, default=5)
    parser.add_argument("--logging_level", type=parse_level, default=LEVELS["INFO"])
    parser.add_argument("--use_caching", type=parse_bool, default=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, number in LEVELS.items():
        logging.addLevelName(number, name)
    logging.basicConfig(level=args.logging_level)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", logging.getLevelName(max(args.logging_level, 10)))

    from prefect_anthropic.cli import run_flow
    from prefect_anthropic.settings import API_KEY_ENV, ClientSettings

    requests_path = Path(args.requests_filepath)
    save_path = Path(args.save_filepath or requests_path.with_name(f"{requests_path.stem}_results.jsonl"))
    if args.api_key:
        os.environ[API_KEY_ENV] = args.api_key  # never a flow parameter
    base_url = args.request_url.split("/v1/messages")[0].rstrip("/")
    settings = ClientSettings(
        base_url=base_url,
        requests_per_minute=args.max_requests_per_minute,
        # The original budgeted estimated input tokens with its single token limit.
        input_tokens_per_minute=args.max_tokens_per_minute,
        max_attempts=args.max_attempts,
        use_caching=args.use_caching,
    )
    work_dir = save_path.parent / f".{save_path.stem}.prefect-anthropic"
    return run_flow(
        str(requests_path),
        str(work_dir),
        settings,
        original_layout_path=str(save_path),
        parquet_beside_original=True,
        show_progress=args.logging_level <= LEVELS["INFO"] and sys.stderr.isatty(),
    )


if __name__ == "__main__":
    sys.exit(main())
