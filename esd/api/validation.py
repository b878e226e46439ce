"""Request validation with the wording of ESD's API Gateway validator (contract §5.1).

Each route declares its body as a small JSON Schema (the subset ESD used: type, required, properties, items,
length, pattern, enum, item counts, bounds). The same dict is published in the OpenAPI document, so the schema a
client reads is the one the server enforces. The ``jsonschema`` library does the walk (draft 4, as API Gateway,
with strict JSON types and ECMA 262 patterns); its errors are put in the order ESD's validator reports them and
worded, with the ``errors`` map, exactly as ESD clients expect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
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


# The schema keywords our request schemas may use, in the order ESD's validator reports them at one node (a type
# mismatch ends the node); annotations (description, default, example) are ignored as JSON Schema says. A schema
# with any other keyword is refused when it is first used: nothing a schema says may go unchecked.
_ORDER = {
    "type": 0,
    "enum": 1,
    "minLength": 2,
    "maxLength": 3,
    "pattern": 4,
    "minimum": 5,
    "maximum": 6,
    "minItems": 7,
    "maxItems": 8,
    "items": 9,
    "required": 10,
    "properties": 11,
    "additionalProperties": 12,
}
_ANNOTATIONS = {"description", "default", "example", "title"}


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Any:
    from jsonschema import ValidationError

    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@cache
def _validator_class() -> Any:
    """JSON Schema draft 4 (API Gateway's) with strict JSON types and ECMA 262 patterns."""
    from jsonschema import Draft4Validator, validators

    return validators.extend(Draft4Validator, {"pattern": _ecma_pattern})


def _validator(schema: dict) -> Any:
    """The schema's validator, made once per distinct schema (views may build small schemas per request)."""
    return _validator_for(json.dumps(schema, sort_keys=True))


@lru_cache(maxsize=512)
def _validator_for(text: str) -> Any:
    schema = json.loads(text)
    _check_keywords(schema)
    return _validator_class()(schema)


def _check_keywords(schema: dict) -> None:
    unknown = set(schema) - set(_ORDER) - _ANNOTATIONS
    if unknown:
        raise ValueError(f"request schema keyword(s) {sorted(unknown)} have no ESD message")
    for sub in (schema.get("properties") or {}).values():
        _check_keywords(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _check_keywords(schema[key])


def _walk_order(error: Any, schema: dict, value: Any) -> list[tuple[int, Any]]:
    """Where ESD's depth-first walk meets this error: per level, the keyword's rank and the property's place in
    ``properties`` (the item's index; the key's place in the object for ``additionalProperties``)."""
    tokens, path = list(error.schema_path), list(error.path)
    key, index, depth = [], 0, 0
    while index < len(tokens):
        keyword = tokens[index]
        if keyword == "properties":
            name = tokens[index + 1]
            key.append((_ORDER[keyword], list(schema["properties"]).index(name)))
            schema, value, index, depth = schema["properties"][name], value[name], index + 2, depth + 1
        elif keyword == "items" and depth < len(path):
            key.append((_ORDER[keyword], path[depth]))
            schema, value, index, depth = schema["items"], value[path[depth]], index + 1, depth + 1
        elif keyword == "additionalProperties" and index + 1 < len(tokens) and depth < len(path):
            key.append((_ORDER[keyword], list(value).index(path[depth])))
            schema, value = schema["additionalProperties"], value[path[depth]]
            index, depth = index + 1, depth + 1
        else:
            key.append((_ORDER.get(keyword, len(_ORDER)), 0))
            index += 1
    return key


def check(schema: dict, value: Any, path: str, problems: Problems) -> None:
    """Validate ``value`` against ``schema`` with the ``jsonschema`` library, recording every problem under
    ``path`` in ESD's wording and order."""
    errors = list(_validator(schema).iter_errors(value))
    errors.sort(key=lambda error: _walk_order(error, schema, value))
    typed = {tuple(e.path) for e in errors if e.validator == "type"}
    reported: set[tuple[str, tuple]] = set()
    for error in errors:
        node = tuple(error.path)
        if node in typed and error.validator != "type":
            continue  # a value of the wrong type is reported once, for its type
        if (error.validator, node) in reported and error.validator in ("required", "additionalProperties"):
            continue  # one message for all of an object's missing (or unexpected) properties
        reported.add((error.validator, node))
        where = path
        for part in node:
            where = _join(where, part)
        _report(error, where, problems)


# ESD's wording of a value that breaks one keyword (value, the keyword's limit) -> message
_MESSAGES: dict[str, Callable[[Any, Any], str]] = {
    "enum": lambda v, limit: f"instance value ({dumps(v)}) not found in enum (possible values: {dumps(limit)})",
    "minLength": lambda v, limit: f"string {dumps(v)} is too short (length: {len(v)}, required minimum: {limit})",
    "maxLength": lambda v, limit: f"string {dumps(v)} is too long (length: {len(v)}, allowed maximum: {limit})",
    "pattern": lambda v, limit: f'ECMA 262 regex "{limit}" does not match input string {dumps(v)}',
    "minimum": lambda v, limit: f"numeric instance is lower than the required minimum (minimum: {limit}, found: {v})",
    "maximum": lambda v, limit: f"numeric instance is greater than the required maximum (maximum: {limit}, found: {v})",
    "minItems": lambda v, limit: (
        f"array is too short: must have at least {limit} elements but instance has {len(v)} elements"
    ),
    "maxItems": lambda v, limit: (
        f"array is too long: must have at most {limit} elements but instance has {len(v)} elements"
    ),
}


def _report(error: Any, path: str, problems: Problems) -> None:
    kind, limit, value, schema = error.validator, error.validator_value, error.instance, error.schema
    if kind == "type":
        allowed = _allowed_types(schema)
        problems.add(
            path,
            f"instance type ({json_type(value)}) does not match any allowed primitive type (allowed: {dumps(allowed)})",
        )
    elif kind in _MESSAGES:
        problems.add(path, _MESSAGES[kind](value, limit))
    elif kind == "required":  # one message for all the missing names, and one entry per name in the map
        missing = sorted(name for name in limit if name not in value)
        problems.messages.append(f"object has missing required properties ({dumps(missing)})")
        for name in missing:
            problems.add(_join(path, name), f"object has missing required properties ({dumps([name])})", listed=False)
    elif kind == "additionalProperties":
        extra = sorted(set(value) - set(schema.get("properties", {})))
        problems.messages.append(f"unexpected properties: {dumps(extra)}")
        for name in extra:
            problems.add(_join(path, name), "unexpected property", listed=False)
    else:  # pragma: no cover - _check_keywords refuses such schemas first
        raise ValueError(f"request schema keyword {kind} has no ESD message")


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
