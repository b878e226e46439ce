"""Request validation with the wording of ESD's API Gateway validator (contract §5.1).

Each route declares its body as a small JSON Schema (the subset ESD used: type, required, properties, items,
length, pattern, enum, item counts, bounds). The same dict is published in the OpenAPI document, so the schema a
client reads is the one the server enforces. Messages and the ``errors`` map are built exactly as ESD clients
expect them; the walk is hand-written because no validator library produces that wording.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from esd.api.errors import BadRequest

JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")


def dumps(value: Any) -> str:
    """JSON as ESD's messages print it: compact, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    """ECMA 262 semantics: ``\\w`` is ASCII and ``$`` does not match before a trailing newline."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern, re.ASCII)


@dataclass
class Problems:
    """Messages in the order found, and the per-field map (field path -> its messages)."""

    messages: list[str] = field(default_factory=list)
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, path: str, message: str, *, listed: bool = True) -> None:
        if listed:
            self.messages.append(message)
        self.errors.setdefault(path or "body", []).append(message)

    def raise_if_any(self) -> None:
        if self.messages:
            raise BadRequest("[" + ", ".join(self.messages) + "]", errors=self.errors)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _allowed_types(schema: dict) -> list[str]:
    declared = schema["type"]
    types = [declared] if isinstance(declared, str) else list(declared)
    if "number" in types and "integer" not in types:
        types.append("integer")
    return sorted(types)


def check(schema: dict, value: Any, path: str, problems: Problems) -> None:
    """Validate ``value`` against ``schema``, recording every problem under ``path``."""
    if "type" in schema:
        allowed = _allowed_types(schema)
        actual = json_type(value)
        if actual not in allowed:
            problems.add(
                path,
                f"instance type ({actual}) does not match any allowed primitive type (allowed: {dumps(allowed)})",
            )
            return
    if "enum" in schema and value not in schema["enum"]:
        problems.add(
            path, f"instance value ({dumps(value)}) not found in enum (possible values: {dumps(schema['enum'])})"
        )
    if isinstance(value, str):
        _check_string(schema, value, path, problems)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(schema, value, path, problems)
    elif isinstance(value, list):
        _check_array(schema, value, path, problems)
    elif isinstance(value, dict):
        _check_object(schema, value, path, problems)


def _check_string(schema: dict, value: str, path: str, problems: Problems) -> None:
    length = len(value)
    if "minLength" in schema and length < schema["minLength"]:
        problems.add(
            path,
            f"string {dumps(value)} is too short (length: {length}, required minimum: {schema['minLength']})",
        )
    if "maxLength" in schema and length > schema["maxLength"]:
        problems.add(
            path,
            f"string {dumps(value)} is too long (length: {length}, allowed maximum: {schema['maxLength']})",
        )
    if "pattern" in schema and not _regex(schema["pattern"]).search(value):
        problems.add(path, f'ECMA 262 regex "{schema["pattern"]}" does not match input string {dumps(value)}')


def _check_number(schema: dict, value: float, path: str, problems: Problems) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        problems.add(
            path,
            f"numeric instance is lower than the required minimum (minimum: {schema['minimum']}, found: {value})",
        )
    if "maximum" in schema and value > schema["maximum"]:
        problems.add(
            path,
            f"numeric instance is greater than the required maximum (maximum: {schema['maximum']}, found: {value})",
        )


def _check_array(schema: dict, value: list, path: str, problems: Problems) -> None:
    count = len(value)
    if "minItems" in schema and count < schema["minItems"]:
        problems.add(
            path,
            f"array is too short: must have at least {schema['minItems']} elements but instance has {count} elements",
        )
    if "maxItems" in schema and count > schema["maxItems"]:
        problems.add(
            path,
            f"array is too long: must have at most {schema['maxItems']} elements but instance has {count} elements",
        )
    items = schema.get("items")
    if items:
        for index, item in enumerate(value):
            check(items, item, _join(path, index), problems)


def _check_object(schema: dict, value: dict, path: str, problems: Problems) -> None:
    missing = sorted(name for name in schema.get("required", ()) if name not in value)
    if missing:
        problems.messages.append(f"object has missing required properties ({dumps(missing)})")
        for name in missing:
            problems.add(_join(path, name), f"object has missing required properties ({dumps([name])})", listed=False)
    properties = schema.get("properties", {})
    for name, subschema in properties.items():
        if name in value:
            check(subschema, value[name], _join(path, name), problems)
    additional = schema.get("additionalProperties")
    if additional is False:
        extra = sorted(set(value) - set(properties))
        if extra:
            problems.messages.append(f"unexpected properties: {dumps(extra)}")
            for name in extra:
                problems.add(_join(path, name), "unexpected property", listed=False)
    elif isinstance(additional, dict):
        for name in value:
            if name not in properties:
                check(additional, value[name], _join(path, name), problems)


MAX_JSON_DEPTH = 64  # A1111's deepest request (ControlNet units in alwayson_scripts) nests about 6 levels


def clean_json(value: Any) -> bool:
    """False when a string anywhere in the value holds NUL or a lone surrogate (no database can store those) or
    the value nests deeper than ``MAX_JSON_DEPTH``. Iterative: a deep body must not exhaust the stack."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, list | dict):
            if depth >= MAX_JSON_DEPTH:
                return False
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def _reject_non_finite(token: str) -> None:
    raise ValueError(token)


def parse_body(raw: bytes | None) -> dict:
    """The request body as a JSON object; empty means ``{}``; anything else (or unreadable, None) is
    ``Invalid request body``."""
    body: Any = None
    if raw is not None and not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_non_finite) if raw is not None else None
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict) or not clean_json(body):
        problems = Problems()
        problems.add("body", "Invalid request body")
        problems.raise_if_any()
    return body


def validate_body(schema: dict | None, body: dict) -> dict:
    """Schema check, then ESD's separate unexpected-properties check on top-level fields."""
    if schema is None:
        return body
    problems = Problems()
    check(schema, body, "", problems)
    problems.raise_if_any()
    extra = sorted(set(body) - set(schema.get("properties", {})))
    if extra:
        raise BadRequest(f"unexpected properties: {dumps(extra)}", errors={n: ["unexpected property"] for n in extra})
    return body


# --- query parameters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One query parameter of a route. ``kind``: ``str``, ``enum``, ``int`` (positive), ``limit``, ``bool``."""

    name: str
    kind: str = "str"
    choices: tuple[str, ...] = ()
    many: bool = False
    default: Any = None
    description: str = ""


MAX_INT = 2**31 - 1  # what every database's INTEGER column holds; no count or page of ours comes near it
BOOLEAN_WORDS = {"true": True, "false": False, "True": True, "False": False, "1": True, "0": False}


def parse_query(params: tuple[Query, ...], querydict: Any, page_max: int) -> dict[str, Any]:
    """Read declared parameters (unknown ones are ignored); enum values are checked like body fields."""
    out: dict[str, Any] = {}
    problems = Problems()
    for param in params:
        values = querydict.getlist(param.name) + (querydict.getlist(param.name + "[]") if param.many else [])
        if any(not clean_json(v) for v in values):
            raise BadRequest(f"{param.name} is invalid")
        if not values:
            out[param.name] = [] if param.many else param.default
            continue
        if param.kind == "enum":
            for index, value in enumerate(values):
                check(
                    {"enum": list(param.choices)},
                    value,
                    _join(param.name, index) if param.many else param.name,
                    problems,
                )
        if param.many:
            out[param.name] = values
            continue
        value = values[-1]
        if param.kind in ("int", "limit"):
            out[param.name] = _positive_int(param, value, page_max)
        elif param.kind == "bool":
            if value not in BOOLEAN_WORDS:
                raise BadRequest(f"{param.name} must be true or false")
            out[param.name] = BOOLEAN_WORDS[value]
        else:
            out[param.name] = value
    problems.raise_if_any()
    return out


def _positive_int(param: Query, value: str, page_max: int) -> int:
    if param.kind == "limit" and value.strip() == "-1":
        return page_max
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_INT:
        raise BadRequest(f"{param.name} must be a positive integer")
    return number if param.kind == "int" else min(number, page_max)
