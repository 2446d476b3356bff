"""Structured outputs (`output_config.format`): which JSON schemas the API takes, and a reply that matches.

The API compiles the schema into a grammar, so it refuses what it cannot compile: recursive definitions,
external `$ref`s, numeric and string-length constraints, `additionalProperties` other than false, and
schemas over its complexity limits. The reply it then produces always parses and always matches the
schema (unless it is cut by max_tokens or refused). The emulator draws such a reply from a generator
seeded by the request, so a seed gives the same dataset every time.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping
from typing import Any

from ..api.schema import compile_errors
from .errors import invalid

__all__ = ["check_schema", "generate_value"]


def check_schema(schema: Any) -> None:
    """Raise the API's 400 for a schema it cannot compile (the rules live in prefect_anthropic.api.schema)."""
    if not isinstance(schema, dict):
        raise invalid("output_config.format.schema: Input should be a valid dictionary")
    problems = compile_errors(schema, "output_config.format.schema")
    if problems:
        raise invalid(problems[0])


_WORDS = ("alpha", "bravo", "delta", "echo", "kilo", "lima", "oscar", "romeo", "sierra", "tango")


def _uuid4(rng: random.Random) -> str:
    hexes = "".join(rng.choice(string.hexdigits[:16]) for _ in range(32))
    return f"{hexes[:8]}-{hexes[8:12]}-4{hexes[13:16]}-a{hexes[17:20]}-{hexes[20:]}"


#: A value of each string `format` the API supports, drawn from a generator (any other format: a few words).
_FORMATTED: Mapping[str, Callable[[random.Random], str]] = {
    "date-time": lambda rng: f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z",
    "date": lambda rng: f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    "time": lambda rng: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z",
    "duration": lambda rng: f"PT{rng.randint(1, 59)}M",
    "email": lambda rng: f"{rng.choice(_WORDS)}@example.com",
    "hostname": lambda rng: f"{rng.choice(_WORDS)}.example.com",
    "uri": lambda rng: f"https://example.com/{rng.choice(_WORDS)}",
    "ipv4": lambda rng: ".".join(str(rng.randint(1, 254)) for _ in range(4)),
    "ipv6": lambda rng: ":".join(f"{rng.randint(0, 65535):x}" for _ in range(8)),
    "uuid": _uuid4,
}


def _string(fmt: Any, rng: random.Random) -> str:
    draw = _FORMATTED.get(fmt) if isinstance(fmt, str) else None
    if draw is not None:
        return draw(rng)
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))


def generate_value(schema: dict[str, Any], rng: random.Random, root: dict[str, Any] | None = None) -> Any:
    """A value valid against `schema` (one the API accepts), drawn from `rng`."""
    root = root if root is not None else schema
    ref = schema.get("$ref")
    if ref is not None:
        defs = root.get("$defs") or root.get("definitions") or {}
        return generate_value(defs[ref.split("/")[-1]], rng, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return rng.choice(schema["enum"])
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return generate_value(rng.choice(schema[union]), rng, root)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = generate_value(part, rng, root)
            if isinstance(value, dict):
                merged.update(value)
            else:
                return value
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind == "object":
        required = set(schema.get("required") or ())
        return {
            name: generate_value(sub, rng, root)
            for name, sub in (schema.get("properties") or {}).items()
            if name in required or rng.random() < 0.5
        }
    if kind == "array":
        items = schema.get("items") or {"type": "string"}
        count = rng.randint(max(1, int(schema.get("minItems", 0))), 3)
        return [generate_value(items, rng, root) for _ in range(count)]
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _string(schema.get("format"), rng)


def violate(schema: dict[str, Any], value: Any) -> Any:
    """A value that still parses as JSON but breaks `schema`: a required property removed, else a value
    of the wrong type."""
    if isinstance(value, dict):
        for name in schema.get("required") or ():
            if name in value:
                return {k: v for k, v in value.items() if k != name}
        if value:
            name = next(iter(value))
            return {**value, name: [] if not isinstance(value[name], list) else "not a list"}
    if isinstance(value, str):
        return 12345
    return "not what the schema asks for"
