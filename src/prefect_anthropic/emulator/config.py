"""Every emulator option, with its command-line flag, default and help in one place."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def _opt(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class EmulatorConfig:
    # A table of options: fields alike in shape, each its own default and help (no logic to share).
    host: str = _opt("127.0.0.1", "Address to listen on.")
    port: int = _opt(8765, "Port to listen on (0 picks a free one).")
    api_key: str | None = _opt(None, "Accept only this key (others get 401); by default any non-empty key.")
    # Rate limits, per API key and model class, as continuously refilled token buckets (0 = unlimited).
    requests_per_minute: float = _opt(0, "Requests per minute (0 = unlimited).")
    input_tokens_per_minute: float = _opt(0, "Input tokens per minute; cache reads do not count (0 = unlimited).")
    output_tokens_per_minute: float = _opt(0, "Output tokens per minute (0 = unlimited).")
    count_tokens_per_minute: float = _opt(
        0, "Requests per minute to /v1/messages/count_tokens, its own limit per key (0 = unlimited)."
    )
    burst_seconds: float = _opt(
        60.0,
        "Bucket capacity in seconds of refill: 60 holds a whole minute's budget; smaller values enforce "
        "the per-minute limit over shorter intervals, as Anthropic may.",
    )
    reserve_max_tokens: bool = _opt(
        False,
        "Account output tokens the pre-2026 way: reserve max_tokens at admission, settle at the end "
        "(default: count output tokens as they are produced).",
    )
    capacity: int = _opt(
        0,
        "Most requests in flight per key (a stream until its last token): above it, --capacity-status at once "
        "(0 = no capacity limit).",
    )
    capacity_status: int = _opt(
        529,
        "Status answered above --capacity: 529 overloaded_error, as the API answers, or 503, as a full gateway "
        "in front of it would (an api_error envelope, message 'Service Unavailable', no retry-after; real "
        "gateways' bodies vary, the status is what a client can rely on).",
        choices=(529, 503),
    )
    # Reply time: latency + time to first token (with jitter), then the output at the output speed.
    latency_ms: float = _opt(0.0, "Fixed delay in ms added before every reply's first token (added to --ttft-ms).")
    latency_jitter_ms: float = _opt(
        0.0, "Uniform jitter around the time before the first token (--latency-ms + --ttft-ms), in ms."
    )
    ttft_ms: float = _opt(
        0.0,
        "Time to first token in ms: a reply's first token (a stream's message_start) comes "
        "--latency-ms + --ttft-ms after it is admitted.",
    )
    output_tokens_per_second: float = _opt(
        0.0,
        "Output speed in tokens a second: after its first token a reply takes output tokens / this many "
        "seconds more; a non-streamed reply is sent complete, a stream's content deltas are paced at it "
        "(0 = all output at once).",
    )
    # Faults, each a fraction 0..1 of requests, drawn from a generator seeded by --seed.
    error_rate_429: float = _opt(0.0, "Fraction of requests answered 429 rate_limit_error (with retry-after).")
    error_rate_529: float = _opt(0.0, "Fraction of requests answered 529 overloaded_error.")
    error_rate_500: float = _opt(0.0, "Fraction of requests answered 500 api_error.")
    error_rate_504: float = _opt(0.0, "Fraction of requests answered 504 timeout_error.")
    error_rate_409: float = _opt(0.0, "Fraction of requests answered 409 conflict_error.")
    drop_rate: float = _opt(
        0.0, "Fraction of responses whose connection drops mid-body or mid-stream (the work is billed)."
    )
    stall_rate: float = _opt(
        0.0, "Fraction of replies that stall: their first token comes after --stall-s, not --latency-ms + --ttft-ms."
    )
    stall_s: float = _opt(30.0, "How long a stalled response stalls, in seconds.")
    fault_retry_after_s: float = _opt(1.0, "retry-after (seconds) sent with an injected 429.")
    ramp_limit_rate: float = _opt(
        0.0,
        "Fraction of requests answered 429 with details.error_code ramp_limit_exceeded (usage growing too fast), "
        "with retry-after.",
    )
    refusal_rate: float = _opt(
        0.0, "Fraction of requests answered stop_reason refusal with stop_details, before any output (not billed)."
    )
    schema_violation_rate: float = _opt(
        0.0, "Fraction of structured-output replies that parse as JSON but break the schema."
    )
    invalid_json_rate: float = _opt(0.0, "Fraction of structured-output replies that are not valid JSON.")
    stream_error_rate: float = _opt(
        0.0, "Fraction of streamed replies interrupted by an `error` event (overloaded_error) mid-stream."
    )
    billing_error: bool = _opt(False, "Answer every message request 402 billing_error.")
    permission_error: bool = _opt(False, "Answer every message request 403 permission_error.")
    spend_limit_usd: float = _opt(
        0.0,
        "Once billed cost reaches this many dollars, answer 429 with details.error_code "
        "enforced_spend_limit_reached and no retry-after (0 = no cap).",
    )
    request_log: bool = _opt(
        False,
        "Keep a record of every billed Messages request (its key, when it was admitted and billed, its cost) for "
        "GET /_emulator/requests?key=...: which requests were paid twice, and which were in flight at a moment.",
    )
    # Prompt caching and batches.
    batch_delay_s: float = _opt(
        2.0, "Mean time a message batch takes to process, in seconds: its requests finish one by one over it."
    )
    batch_delay_jitter: float = _opt(
        0.0,
        "Spread of a batch's processing time: drawn uniformly from --batch-delay-s x (1 +/- this), 0..1; "
        "its requests finish at random moments within it.",
    )
    batch_cancel_s: float = _opt(
        0.5,
        "Time a canceled batch stays `canceling`: requests due in it still finish (and are billed), the "
        "rest end canceled, as the API's cancel may complete requests already in progress.",
    )
    batch_expire_rate: float = _opt(0.0, "Fraction of batch requests that end as expired.")
    unknown_min_cacheable_tokens: int = _opt(
        1024,
        "Minimum cacheable length for models whose minimum the model table does not know (an assumption "
        "of the emulator, not a fact about the API).",
    )
    models_file: str | None = _opt(None, "A models file adding or overriding model table entries (TOML).")
    seed: int | None = _opt(None, "Seed for the fault and latency generator (reproducible runs).")
    log_level: str = _opt("warning", "Server log level.")

    def __post_init__(self) -> None:
        if self.capacity_status not in (529, 503):
            raise ValueError(f"capacity_status must be 529 or 503, not {self.capacity_status}")
        for name in ("latency_ms", "latency_jitter_ms", "ttft_ms", "output_tokens_per_second"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                parser.add_argument(flag, action=action, default=f.default, help=f.metadata["help"])
                continue
            # Annotations are strings here (postponed evaluation): "float", "int | None", ...
            kind = {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=f.metadata["help"])

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> EmulatorConfig:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})

    def to_args(self) -> list[str]:
        """The command line that starts an emulator process with this configuration."""
        args: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or value is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        return args
