"""Body schemas of the dataset and training routes (contract §9.5, §9.8). Validated and published as given."""

from apps.training.choices import DatasetStatus
from esd.api.schemas import delete_body

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
DELETE_DATASETS = delete_body("dataset_name_list", items=DATASET_NAME, max_items=10)


# --- trainings (contract §9.8) ----------------------------------------------------------------------------------

_TEXT = {"type": "string", "minLength": 1}
CREATE_TRAINING = {
    "type": "object",
    "required": ["lora_train_type", "params"],
    "properties": {
        "lora_train_type": {"type": "string", "description": "kohya"},
        "params": {"type": "object", "description": "training_params and config_params (two forms, see §9.8)"},
    },
}
# params of the native form (what ESD's implementation and the WebUI send)
NATIVE_PARAMS = {
    "type": "object",
    "required": ["training_params", "config_params"],
    "properties": {
        "training_params": {
            "type": "object",
            "required": ["training_instance_type", "model", "dataset", "fm_type"],
            "properties": {
                "training_instance_type": _TEXT,
                "model": _TEXT,
                "dataset": _TEXT,
                "fm_type": _TEXT,
                "model_name": {"type": "string"},
            },
        },
        "config_params": {
            "type": "object",
            "required": ["saving_arguments", "training_arguments"],
            "properties": {
                "saving_arguments": {
                    "type": "object",
                    "required": ["output_name", "save_every_n_epochs"],
                    "properties": {
                        "output_name": _TEXT,
                        "save_every_n_epochs": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                },
                "training_arguments": {
                    "type": "object",
                    "required": ["max_train_epochs"],
                    "properties": {"max_train_epochs": {"type": "integer", "minimum": 1, "maximum": 10000}},
                },
            },
        },
    },
}
# params of the 1.5.0 document's form
DOCUMENT_PARAMS = {
    "type": "object",
    "required": ["training_params"],
    "properties": {
        "training_params": {
            "type": "object",
            "required": ["training_instance_type", "s3_model_path", "s3_data_path", "fm_type"],
            "properties": {
                "training_instance_type": _TEXT,
                "s3_model_path": _TEXT,
                "s3_data_path": _TEXT,
                "fm_type": _TEXT,
                "model_name": {"type": "string"},
            },
        },
        "config_params": {
            "type": "object",
            "properties": {
                "training": {
                    "type": "object",
                    "properties": {
                        "output_name": _TEXT,
                        "save_every_n_epochs": {"type": "integer", "minimum": 1, "maximum": 10000},
                        "max_train_epochs": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                }
            },
        },
    },
}
DELETE_TRAININGS = delete_body("training_id_list")
