"""Structured outputs: the JSON schema a dataset's rows must follow.

A user's schema (a JSON Schema file, or a Pydantic model) is used three ways:
- the **sent** schema: what the API can compile. Keywords it does not support (numeric and string-length
  constraints, formats it lacks, other `minItems`) are moved into the description, as the official SDK's
  `transform_schema` does, and every object gets `additionalProperties: false`;
- the **full** schema: every reply is validated against it on our side (jsonschema), so the constraints
  the API could not enforce still hold in the dataset;
- the **column type**: `parsed` in results.parquet is a struct whose fields follow the schema.

`compile_errors()` holds the API's rules for schemas (recursion, external `$ref`, unsupported keywords,
complexity limits); the emulator answers 400 by the same rules, and a run refuses such a schema before it
sends anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "API_STRING_FORMATS",
    "OutputSchema",
    "SchemaError",
    "compile_errors",
    "load_schema",
    "output_format_of",
    "parse_reply",
    "to_api_schema",
    "with_output_format",
]

#: Numeric and string-length constraints: the API's grammar cannot enforce them.
API_UNSUPPORTED_KEYWORDS = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength"}
)
#: String formats the API supports (the SDK's list, plus its "text").
API_STRING_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid", "text"}
)
MAX_OPTIONAL_PARAMETERS = 24
MAX_UNION_PARAMETERS = 16
MAX_DEPTH = 32


class SchemaError(ValueError):
    """A schema the API cannot take at all; the message names the keyword and where it is."""


def compile_errors(schema: Any, where: str = "schema") -> list[str]:
    """Why the API would refuse to compile `schema` (empty when it would compile it)."""
    problems: list[str] = []
    if not isinstance(schema, dict):
        return [f"{where}: a schema must be a JSON object"]
    defs = schema.get("$defs") or schema.get("definitions") or {}
    counts = {"optional": 0, "unions": 0}

    def walk(node: Any, at: str, refs: tuple[str, ...], depth: int) -> None:
        if not isinstance(node, dict):
            problems.append(f"{at}: a schema must be a JSON object")
            return
        if depth > MAX_DEPTH:
            problems.append(f"{at}: Schema is too complex for compilation (nested deeper than {MAX_DEPTH} levels)")
            return
        problems.extend(
            f"{at}.{k}: the keyword '{k}' is not supported in structured outputs"
            for k in node
            if k in API_UNSUPPORTED_KEYWORDS
        )
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
                problems.append(f"{at}.$ref: external references are not supported ({ref!r})")
                return
            name = ref.split("/")[-1]
            if name in refs:
                problems.append(f"{at}.$ref: recursive schemas are not supported ({ref!r})")
                return
            if name not in defs:
                problems.append(f"{at}.$ref: {ref!r} is not defined")
                return
            walk(defs[name], f"$defs.{name}", (*refs, name), depth + 1)
            return
        additional = node.get("additionalProperties")
        if additional is not None and additional is not False:
            problems.append(f"{at}.additionalProperties: only false is supported")
        if node.get("minItems", 0) not in (0, 1):
            problems.append(f"{at}.minItems: only 0 or 1 is supported")
        fmt = node.get("format")
        if fmt is not None and fmt not in API_STRING_FORMATS:
            problems.append(f"{at}.format: the format '{fmt}' is not supported")
        for union in ("anyOf", "oneOf", "allOf"):
            for i, variant in enumerate(node.get(union) or ()):
                walk(variant, f"{at}.{union}.{i}", refs, depth + 1)
        if node.get("anyOf") or node.get("oneOf") or isinstance(node.get("type"), list):
            counts["unions"] += 1
        required = set(node.get("required") or ())
        for name, sub in (node.get("properties") or {}).items():
            counts["optional"] += name not in required
            walk(sub, f"{at}.properties.{name}", refs, depth + 1)
        if "items" in node:
            walk(node["items"], f"{at}.items", refs, depth + 1)

    walk(schema, where, (), 0)
    too_complex = f"{where}: Schema is too complex for compilation"
    if counts["optional"] > MAX_OPTIONAL_PARAMETERS:
        problems.append(f"{too_complex} (more than {MAX_OPTIONAL_PARAMETERS} optional parameters)")
    if counts["unions"] > MAX_UNION_PARAMETERS:
        problems.append(f"{too_complex} (more than {MAX_UNION_PARAMETERS} union-typed parameters)")
    return problems


def to_api_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API can take it: what it cannot enforce moves into the description (the SDK's
    `transform_schema` rule); objects are closed with `additionalProperties: false`."""
    out: dict[str, Any] = {}
    rest = dict(schema)
    if "$defs" in rest:
        out["$defs"] = {name: to_api_schema(sub) for name, sub in rest.pop("$defs").items()}
    if "$ref" in rest:
        out["$ref"] = rest.pop("$ref")
        return out
    for union in ("anyOf", "oneOf", "allOf"):
        if union in rest:
            out["anyOf" if union == "oneOf" else union] = [to_api_schema(s) for s in rest.pop(union)]
    for keep in ("type", "enum", "const", "title", "description", "required"):
        if keep in rest:
            out[keep] = rest.pop(keep)
    if "properties" in rest:
        out["properties"] = {name: to_api_schema(sub) for name, sub in rest.pop("properties").items()}
    if out.get("type") == "object" or "properties" in out:
        rest.pop("additionalProperties", None)
        out["additionalProperties"] = False
    if "items" in rest:
        out["items"] = to_api_schema(rest.pop("items"))
    if rest.get("minItems") in (0, 1):
        out["minItems"] = rest.pop("minItems")
    if rest.get("format") in API_STRING_FORMATS:
        out["format"] = rest.pop("format")
    if rest:
        moved = ", ".join(f"{key}: {value}" for key, value in rest.items())
        out["description"] = (out["description"] + "\n\n" if out.get("description") else "") + "{" + moved + "}"
    return out


def _arrow_type(schema: dict[str, Any], defs: dict[str, Any]) -> pa.DataType:
    import pyarrow as pa  # only where a dataset is written: the engine and the emulator do without it

    ref = schema.get("$ref")
    if ref is not None:
        return _arrow_type(defs[ref.split("/")[-1]], defs)
    variants = schema.get("anyOf") or schema.get("oneOf")
    if variants:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) == 1:
            return _arrow_type(non_null[0], defs)
        return pa.string()  # a real union: kept as JSON text
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null_kinds = [k for k in kind if k != "null"]
        if len(non_null_kinds) != 1:
            return pa.string()
        kind = non_null_kinds[0]
    if kind is None and "enum" in schema:
        values = [v for v in schema["enum"] if v is not None]
        kind = "string" if all(isinstance(v, str) for v in values) else None
    if kind == "object":
        required = set(schema.get("required") or ())
        props = schema.get("properties") or {}
        if not props:
            return pa.string()
        return pa.struct(
            [pa.field(name, _arrow_type(sub, defs), nullable=name not in required) for name, sub in props.items()]
        )
    if kind == "array":
        return pa.list_(_arrow_type(schema.get("items") or {}, defs))
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}.get(
        str(kind), pa.string()
    )


def _to_column_value(value: Any, arrow_type: pa.DataType) -> Any:
    """A validated value shaped for its Arrow type (a union kept as JSON text)."""
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_struct(arrow_type):
        if not isinstance(value, dict):
            return None
        return {f.name: _to_column_value(value.get(f.name), f.type) for f in arrow_type}
    if pa.types.is_list(arrow_type):
        return [_to_column_value(v, arrow_type.value_type) for v in value] if isinstance(value, list) else None
    if pa.types.is_string(arrow_type) and not isinstance(value, str):
        return orjson.dumps(value).decode()
    if pa.types.is_floating(arrow_type) and isinstance(value, int):
        return float(value)
    return value


@dataclass(frozen=True)
class OutputSchema:
    """One dataset's schema: the full one (validated on our side) and the one sent to the API."""

    full: dict[str, Any]
    sent: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sent", to_api_schema(self.full))
        problems = compile_errors(self.sent)
        if problems:
            raise SchemaError(f"the API cannot take this schema: {problems[0]}")
        Draft202012Validator.check_schema(self.full)

    @cached_property
    def _validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.full)

    def output_format(self) -> dict[str, Any]:
        """The `output_config.format` to send."""
        return {"type": "json_schema", "schema": self.sent}

    def validate(self, value: Any) -> str | None:
        """Why `value` does not match the full schema (None when it does)."""
        error = best_match(self._validator.iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(part) for part in error.absolute_path)
        return f"{where or '(root)'}: {error.message}"

    @cached_property
    def arrow_type(self) -> pa.DataType:
        return _arrow_type(self.full, self.full.get("$defs") or self.full.get("definitions") or {})

    def column_value(self, value: Any) -> Any:
        return _to_column_value(value, self.arrow_type)


def load_schema(source: str | os.PathLike[str] | dict[str, Any] | type) -> OutputSchema:
    """A schema from a JSON file, a dict, or a Pydantic model class."""
    if isinstance(source, type):
        model_json_schema = getattr(source, "model_json_schema", None)
        if model_json_schema is None:
            raise SchemaError(f"{source!r} is not a Pydantic model class")
        return OutputSchema(model_json_schema())
    if isinstance(source, dict):
        return OutputSchema(source)
    from ..storage import Storage, is_url, local_path

    try:
        text = Storage.from_environment().read_text(str(source)) if is_url(source) else local_path(source).read_text()
        data = json.loads(text)
    except OSError as exc:
        raise SchemaError(f"cannot read schema file {source}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise SchemaError(f"schema file {source} is not valid JSON: {exc}") from exc
    return OutputSchema(data)


def output_format_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The request's structured-output format (`output_config.format`, or the older `output_format`)."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        fmt = body.get("output_format")
    return fmt if isinstance(fmt, dict) else None


def with_output_format(body: dict[str, Any], schema: OutputSchema | None) -> dict[str, Any]:
    """The body asking for replies matching `schema`; a line's own format wins."""
    if schema is None or output_format_of(body) is not None:
        return body
    config = body.get("output_config")
    config = dict(config) if isinstance(config, dict) else {}
    return {**body, "output_config": {**config, "format": schema.output_format()}}


def parse_reply(text: str | None, schema: OutputSchema) -> tuple[Any, str | None]:
    """(the parsed value, None) for a reply matching the full schema, else (None, why not)."""
    if not text:
        return None, "the reply is empty"
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return None, f"the reply is not valid JSON: {exc}"
    problem = schema.validate(value)
    return (value, None) if problem is None else (None, problem)
