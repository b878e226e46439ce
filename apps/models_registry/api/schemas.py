"""Body and response schemas of the checkpoint routes (contract §9.4)."""

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

_PARAMS = {"type": "object", "additionalProperties": True}
SHORT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "enum": TYPES},
        "s3_location": {"type": "string"},
        "status": {"type": "string", "enum": STATUSES},
        "params": _PARAMS,
    },
}
ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "s3Location": {"type": "string"},
        "type": {"type": "string", "enum": TYPES},
        "status": {"type": "string", "enum": STATUSES},
        "name": {"type": "array", "items": {"type": "string"}},
        "created": {"type": "string", "description": "Epoch seconds with six decimals"},
        "params": _PARAMS,
        "allowed_roles_or_users": {"type": "array", "items": {"type": "string"}},
    },
}
LIST = {
    "type": "object",
    "properties": {
        "page": {"type": "integer"},
        "per_page": {"type": "integer"},
        "pages": {"type": "integer"},
        "total": {"type": "integer"},
        "checkpoints": {"type": "array", "items": ITEM},
    },
}
CREATED = {
    "type": "object",
    "properties": {
        "checkpoint": SHORT,
        "s3PresignUrl": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "description": "Part URLs per file name",
        },
    },
}
ACCEPTED = {"type": "object", "properties": {"checkpoints": {"type": "array", "items": SHORT}}}
UPDATED = {"type": "object", "properties": {"checkpoint": SHORT}}
