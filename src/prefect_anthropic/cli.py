"""The `prefect-anthropic` command: emulator, run, estimate, demo."""

from __future__ import annotations

import argparse
import sys

from .emulator.config import EmulatorConfig


def _emulator(args: argparse.Namespace) -> int:
    from .emulator import serve

    config = EmulatorConfig.from_namespace(args)
    print(f"Anthropic API emulator on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    serve(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefect-anthropic", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    emulator = commands.add_parser("emulator", help="Run the local Anthropic API emulator.")
    EmulatorConfig.add_arguments(emulator)
    emulator.set_defaults(handler=_emulator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
