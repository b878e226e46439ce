"""Body and response schemas of the dataset routes (contract §9.5)."""

from apps.training.choices import DatasetStatus

STATUSES = [s.value for s in DatasetStatus]
DATASET_NAME = {"type": "string", "minLength": 1, "maxLength": 20, "pattern": r"^[A-Za-z][A-Za-z0-9_-]*$"}

CREATE_DATASET = {
    "type": "object",
    "required": ["dataset_name", "content", "params", "creator"],
    "properties": {
        "dataset_name": DATASET_NAME,
        "content": {
            "type": "array",
            "minItems": 1,
            "maxItems": 100,
            "items": {
                "type": "object",
                "required": ["filename", "name", "type", "params"],
                "properties": {
                    "filename": {"type": "string", "minLength": 1},
                    "name": {"type": "string", "minLength": 1},
                    "type": {"type": "string", "minLength": 1},
                    "params": {"type": "object"},
                },
            },
        },
        "params": {"type": "object", "description": "Free keys, e.g. description"},
        "creator": {"type": "string", "description": "Ignored; the acting user is recorded"},
        "prefix": {"type": "string", "description": 'One path segment such as kohya\'s "10_technic"; "" = none'},
    },
}
UPDATE_DATASET = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "enum": STATUSES}},
}
DELETE_DATASETS = {
    "type": "object",
    "required": ["dataset_name_list"],
    "properties": {"dataset_name_list": {"type": "array", "minItems": 1, "maxItems": 10, "items": DATASET_NAME}},
}

CREATED = {
    "type": "object",
    "properties": {
        "datasetName": {"type": "string"},
        "s3PresignUrl": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
UPDATED = {"type": "object", "properties": {"datasetName": {"type": "string"}, "status": {"type": "string"}}}
LISTED = {
    "type": "object",
    "properties": {
        "datasets": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": True,
                "properties": {
                    "datasetName": {"type": "string"},
                    "s3": {"type": "string"},
                    "status": {"type": "string", "enum": STATUSES},
                    "timestamp": {"type": "string"},
                },
            },
        },
        "last_evaluated_key": {"type": "string", "nullable": True},
    },
}
DETAIL = {
    "type": "object",
    "additionalProperties": True,
    "properties": {
        "dataset_name": {"type": "string"},
        "datasetName": {"type": "string"},
        "prefix": {"type": "string"},
        "s3": {"type": "string"},
        "status": {"type": "string", "enum": STATUSES},
        "timestamp": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": True,
                "properties": {
                    "key": {"type": "string"},
                    "name": {"type": "string"},
                    "type": {"type": "string"},
                    "preview_url": {"type": "string"},
                    "dataStatus": {"type": "string", "enum": STATUSES},
                    "original_file_name": {"type": "string"},
                },
            },
        },
    },
}
