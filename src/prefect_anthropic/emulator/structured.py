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
from typing import Any

from .errors import APIError, invalid

__all__ = ["check_schema", "generate_value"]

#: Numeric and string-length constraints (ANTHROPIC_API_2026.md); other keywords are let through.
UNSUPPORTED_KEYWORDS = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength"}
)
SUPPORTED_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid", "text"}
)
#: The API's published limits per request.
MAX_OPTIONAL_PARAMETERS = 24
MAX_UNION_PARAMETERS = 16
_MAX_DEPTH = 32


def _too_complex(why: str) -> APIError:
    return invalid(f"output_config.format.schema: Schema is too complex for compilation ({why})")


class _Checker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.defs = root.get("$defs") or root.get("definitions") or {}
        self.optional = 0
        self.unions = 0

    def check(self, schema: Any, where: str, refs: tuple[str, ...] = (), depth: int = 0) -> None:
        if not isinstance(schema, dict):
            raise invalid(f"{where}: a schema must be an object")
        if depth > _MAX_DEPTH:
            raise _too_complex(f"nested deeper than {_MAX_DEPTH} levels")
        for keyword in schema:
            if keyword in UNSUPPORTED_KEYWORDS:
                raise invalid(f"{where}.{keyword}: the keyword '{keyword}' is not supported in structured outputs")
        ref = schema.get("$ref")
        if ref is not None:
            if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
                raise invalid(f"{where}.$ref: external references are not supported ({ref!r})")
            name = ref.split("/")[-1]
            if name in refs:
                raise invalid(f"{where}.$ref: recursive schemas are not supported ({ref!r})")
            if name not in self.defs:
                raise invalid(f"{where}.$ref: {ref!r} is not defined")
            self.check(self.defs[name], f"$defs.{name}", (*refs, name), depth + 1)
            return
        additional = schema.get("additionalProperties")
        if additional is not None and additional is not False:
            raise invalid(f"{where}.additionalProperties: only false is supported")
        if schema.get("minItems", 0) not in (0, 1):
            raise invalid(f"{where}.minItems: only 0 or 1 is supported")
        fmt = schema.get("format")
        if fmt is not None and fmt not in SUPPORTED_FORMATS:
            raise invalid(f"{where}.format: the format '{fmt}' is not supported")
        for union in ("anyOf", "oneOf", "allOf"):
            if union in schema:
                self.unions += union != "allOf"
                for i, variant in enumerate(schema[union]):
                    self.check(variant, f"{where}.{union}.{i}", refs, depth + 1)
        if isinstance(schema.get("type"), list):
            self.unions += 1
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        for name, sub in properties.items():
            self.optional += name not in required
            self.check(sub, f"{where}.properties.{name}", refs, depth + 1)
        if "items" in schema:
            self.check(schema["items"], f"{where}.items", refs, depth + 1)
        if self.optional > MAX_OPTIONAL_PARAMETERS:
            raise _too_complex(f"more than {MAX_OPTIONAL_PARAMETERS} optional parameters")
        if self.unions > MAX_UNION_PARAMETERS:
            raise _too_complex(f"more than {MAX_UNION_PARAMETERS} union-typed parameters")


def check_schema(schema: Any) -> None:
    """Raise the API's 400 for a schema it cannot compile."""
    if not isinstance(schema, dict):
        raise invalid("output_config.format.schema: Input should be a valid dictionary")
    _Checker(schema).check(schema, "output_config.format.schema")


_WORDS = ("alpha", "bravo", "delta", "echo", "kilo", "lima", "oscar", "romeo", "sierra", "tango")


def _string(fmt: str | None, rng: random.Random) -> str:
    if fmt == "date-time":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z"
    if fmt == "date":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"
    if fmt == "duration":
        return f"PT{rng.randint(1, 59)}M"
    if fmt == "email":
        return f"{rng.choice(_WORDS)}@example.com"
    if fmt == "hostname":
        return f"{rng.choice(_WORDS)}.example.com"
    if fmt == "uri":
        return f"https://example.com/{rng.choice(_WORDS)}"
    if fmt == "ipv4":
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    if fmt == "ipv6":
        return ":".join(f"{rng.randint(0, 65535):x}" for _ in range(8))
    if fmt == "uuid":
        hexes = "".join(rng.choice(string.hexdigits[:16]) for _ in range(32))
        return f"{hexes[:8]}-{hexes[8:12]}-4{hexes[13:16]}-a{hexes[17:20]}-{hexes[20:]}"
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
