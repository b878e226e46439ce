"""Schemas shared by every route's documentation. No imports: settings read this module."""

ERROR_COMPONENT = {
    "type": "object",
    "properties": {
        "statusCode": {"type": "integer"},
        "message": {"type": "string"},
        "errors": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "description": "Validation errors by field path (400 only)",
        },
        "requestId": {"type": "string", "description": "500 only: the x-request-id of the failed request"},
    },
    "required": ["message"],
}

ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}

NONEMPTY_STRING = {"type": "string", "minLength": 1}


def delete_body(field: str, *, items: dict = NONEMPTY_STRING, max_items: int = 100, **extra: dict) -> dict:
    """The body of ESD's bulk DELETE routes: one required, non-empty list of ids or names (plus ignored extras)."""
    return {
        "type": "object",
        "required": [field],
        "properties": {field: {"type": "array", "minItems": 1, "maxItems": max_items, "items": items}, **extra},
    }
