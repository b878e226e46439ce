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
