"""Body schemas of the checkpoint routes (contract §9.4); the responses are serializers (``serializers``)."""

from apps.models_registry.choices import CheckpointStatus, CheckpointType
from esd.api.schemas import delete_body

TYPES = [t.value for t in CheckpointType]
STATUSES = [s.value for s in CheckpointStatus]

CREATE = {
    "type": "object",
    "required": ["checkpoint_type", "params"],
    "properties": {
        "checkpoint_type": {"type": "string", "enum": TYPES},
        "params": {"type": "object", "description": "Free keys (message, ...), returned in params"},
        "filenames": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {
                "type": "object",
                "required": ["filename", "parts_number"],
                "properties": {
                    "filename": {"type": "string", "minLength": 1},
                    "parts_number": {"type": "integer", "minimum": 1, "maximum": 10000},
                },
                "additionalProperties": False,
            },
            "description": "Multipart upload: one entry per file",
        },
        "urls": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {"type": "string", "minLength": 1, "maxLength": 2048},
            "description": "Download by URL instead of uploading",
        },
    },
}

UPDATE = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": STATUSES},
        "multi_parts_tags": {
            "type": "object",
            "additionalProperties": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["ETag", "PartNumber"],
                    "properties": {
                        "ETag": {"type": "string"},
                        "PartNumber": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                },
            },
            "description": "{filename: [{ETag, PartNumber}]} from the part uploads",
        },
        "name": {"type": "string", "minLength": 1, "maxLength": 20, "pattern": r"^[A-Za-z][A-Za-z0-9_-]*$"},
    },
}

DELETE = delete_body("checkpoint_id_list")
