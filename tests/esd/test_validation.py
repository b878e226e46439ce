"""Contract §5.1: ESD's validator wording, message by message, and the ``errors`` map."""

import pytest
from django.http import QueryDict

from esd.api.errors import BadRequest
from esd.api.validation import Query, parse_query, validate_body

SCHEMA = {
    "type": "object",
    "required": ["name", "count", "items"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": r"^[A-Za-z][A-Za-z0-9_-]*$"},
        "count": {"type": "number", "minimum": 1, "maximum": 10},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "required": ["filename", "parts_number"],
                "properties": {
                    "filename": {"type": "string"},
                    "parts_number": {"type": "integer", "minimum": 1, "maximum": 10000},
                },
                "additionalProperties": False,
            },
        },
        "status": {"type": "string", "enum": ["Initial", "Active", "Disabled"]},
        "flag": {"type": "boolean"},
        "label": {"type": "string", "minLength": 1},
    },
}

GOOD = {"name": "abc", "count": 2, "items": [{"filename": "a", "parts_number": 1}]}


def problems(body):
    with pytest.raises(BadRequest) as caught:
        validate_body(SCHEMA, body)
    return caught.value.message, caught.value.errors


def test_valid_body_passes_through():
    assert validate_body(SCHEMA, dict(GOOD)) == GOOD


def test_required_names_sorted_in_message_and_one_each_in_errors():
    message, errors = problems({})
    assert message == '[object has missing required properties (["count","items","name"])]'
    assert errors == {
        "count": ['object has missing required properties (["count"])'],
        "items": ['object has missing required properties (["items"])'],
        "name": ['object has missing required properties (["name"])'],
    }


@pytest.mark.parametrize(
    ("patch", "path", "text"),
    [
        (
            {"name": 5},
            "name",
            'instance type (integer) does not match any allowed primitive type (allowed: ["string"])',
        ),
        (
            {"count": "1"},
            "count",
            'instance type (string) does not match any allowed primitive type (allowed: ["integer","number"])',
        ),
        (
            {"flag": 1},
            "flag",
            'instance type (integer) does not match any allowed primitive type (allowed: ["boolean"])',
        ),
        (
            {"count": True},
            "count",
            'instance type (boolean) does not match any allowed primitive type (allowed: ["integer","number"])',
        ),
        ({"label": ""}, "label", 'string "" is too short (length: 0, required minimum: 1)'),
        ({"name": "abcdef"}, "name", 'string "abcdef" is too long (length: 6, allowed maximum: 5)'),
        ({"name": "1ab"}, "name", 'ECMA 262 regex "^[A-Za-z][A-Za-z0-9_-]*$" does not match input string "1ab"'),
        (
            {"status": "Foo"},
            "status",
            'instance value ("Foo") not found in enum (possible values: ["Initial","Active","Disabled"])',
        ),
        ({"items": []}, "items", "array is too short: must have at least 1 elements but instance has 0 elements"),
        (
            {"items": [{"filename": "a", "parts_number": 1}] * 3},
            "items",
            "array is too long: must have at most 2 elements but instance has 3 elements",
        ),
        ({"count": 0}, "count", "numeric instance is lower than the required minimum (minimum: 1, found: 0)"),
        ({"count": 11}, "count", "numeric instance is greater than the required maximum (maximum: 10, found: 11)"),
        (
            {"items": [{"filename": "a", "parts_number": 1.5}]},
            "items.0.parts_number",
            'instance type (number) does not match any allowed primitive type (allowed: ["integer"])',
        ),
        (
            {"items": [{"filename": "a"}]},
            "items.0.parts_number",
            'object has missing required properties (["parts_number"])',
        ),
    ],
)
def test_each_check_has_esd_wording(patch, path, text):
    message, errors = problems({**GOOD, **patch})
    assert message == f"[{text}]"
    assert errors == {path: [text]}


def test_ecma_dollar_does_not_accept_a_trailing_newline():
    message, _ = problems({**GOOD, "name": "ab\n"})
    assert message.startswith("[ECMA 262 regex")


def test_word_class_is_ascii_like_ecma():
    schema = {"type": "object", "properties": {"u": {"type": "string", "pattern": r"^[\w.@+-]+$"}}}
    with pytest.raises(BadRequest):
        validate_body(schema, {"u": "zoë"})
    assert validate_body(schema, {"u": "zoe.b@x-y+z"})


def test_all_problems_joined_in_order():
    message, errors = problems({"name": "", "count": 0, "items": [{"filename": "a", "parts_number": 0}]})
    assert message == (
        '[string "" is too short (length: 0, required minimum: 1), '
        'ECMA 262 regex "^[A-Za-z][A-Za-z0-9_-]*$" does not match input string "", '
        "numeric instance is lower than the required minimum (minimum: 1, found: 0), "
        "numeric instance is lower than the required minimum (minimum: 1, found: 0)]"
    )
    assert list(errors) == ["name", "count", "items.0.parts_number"]


def test_nested_closed_object_names_unexpected_properties():
    message, errors = problems({**GOOD, "items": [{"filename": "a", "parts_number": 1, "x": 1}]})
    assert message == '[unexpected properties: ["x"]]'
    assert errors == {"items.0.x": ["unexpected property"]}


def test_top_level_unknown_fields_are_rejected_after_the_schema():
    with pytest.raises(BadRequest) as caught:
        validate_body(SCHEMA, {**GOOD, "b": 1, "a": 2})
    assert caught.value.message == 'unexpected properties: ["a","b"]'
    assert caught.value.errors == {"a": ["unexpected property"], "b": ["unexpected property"]}


QUERY = (
    Query("page", kind="int", default=1),
    Query("per_page", kind="limit", default=10),
    Query("status", kind="enum", choices=("Initial", "Active"), many=True),
    Query("show", kind="bool", default=False),
    Query("username"),
)


def test_query_defaults_and_values():
    parsed = parse_query(QUERY, QueryDict("page=3&status=Active&status[]=Initial&show=1&ignored=x"), 1000)
    assert parsed == {"page": 3, "per_page": 10, "status": ["Active", "Initial"], "show": True, "username": None}


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5", ""])
def test_bad_positive_integers(value):
    with pytest.raises(BadRequest) as caught:
        parse_query(QUERY, QueryDict(f"page={value}"), 1000)
    assert caught.value.message == "page must be a positive integer"


def test_limit_minus_one_means_the_cap_and_large_values_are_capped():
    assert parse_query(QUERY, QueryDict("per_page=-1"), 1000)["per_page"] == 1000
    assert parse_query(QUERY, QueryDict("per_page=5000"), 1000)["per_page"] == 1000


def test_query_enums_are_checked_like_body_fields():
    with pytest.raises(BadRequest) as caught:
        parse_query(QUERY, QueryDict("status=Foo"), 1000)
    assert caught.value.message == '[instance value ("Foo") not found in enum (possible values: ["Initial","Active"])]'
    assert caught.value.errors == {
        "status.0": ['instance value ("Foo") not found in enum (possible values: ["Initial","Active"])']
    }


def test_query_values_with_nul_are_refused():
    with pytest.raises(BadRequest):
        parse_query(QUERY, QueryDict("username=%00"), 1000)


def test_the_jsonschema_walk_refuses_a_keyword_it_cannot_word_and_every_route_schema_is_worded():
    """The library checks every keyword; one without an ESD message would be a silent gap, so it is refused."""
    from django.urls import get_resolver

    from esd.api import validation

    with pytest.raises(ValueError, match=r"request schema keyword\(s\) \['uniqueItems'\] have no ESD message"):
        validate_body({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, {})

    def handlers(patterns):
        for pattern in patterns:
            if hasattr(pattern, "url_patterns"):
                yield from handlers(pattern.url_patterns)
            elif getattr(pattern.callback, "actions", None) is not None:  # viewset: its routed actions
                yield from (getattr(pattern.callback.cls, a) for a in pattern.callback.actions.values())

    bodies = [
        spec.body
        for handler in handlers(get_resolver().url_patterns)
        if (spec := getattr(handler, "operation", None)) is not None and spec.body
    ]
    assert len(bodies) >= 10
    for body in bodies:
        validation._check_keywords(body)


def test_patterns_are_ecma_262():
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": r"^\w+$"}}}
    assert validate_body(schema, {"name": "abc_1"}) == {"name": "abc_1"}
    for value in ("abc\n", "é"):  # $ before a trailing newline and non-ASCII \w match in Python, not in ECMA 262
        with pytest.raises(BadRequest, match="ECMA 262 regex"):
            validate_body(schema, {"name": value})
