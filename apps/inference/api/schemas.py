"""Body and response schemas of the inference routes (contract §9.7)."""

from apps.inference.choices import InferenceStatus, InferenceType
from esd.api.schemas import delete_body

TASKS = ["txt2img", "img2img", "extra-single-image", "extra-batch-images", "rembg"]

CREATE = {
    "type": "object",
    "required": ["task_type", "inference_type", "models"],
    "properties": {
        "task_type": {"type": "string", "minLength": 1},
        "inference_type": {"type": "string", "enum": [t.value for t in InferenceType]},
        "models": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "description": '{checkpoint type: [file names]}; VAE "None"/"Automatic" are built in',
        },
        "sagemaker_endpoint_name": {"type": "string", "description": "Full endpoint name (else a random usable one)"},
        "payload_string": {"type": "string", "description": "The parameters as a JSON string: one-call mode"},
        "filters": {"description": "Ignored"},
        "user_id": {"description": "Ignored"},
    },
}
DELETE = delete_body("inference_id_list")

_NULLABLE_STRING = {"type": "string", "nullable": True}
JOB = {
    "type": "object",
    "properties": {
        "InferenceJobId": {"type": "string"},
        "status": {"type": "string", "enum": [s.value for s in InferenceStatus]},
        "taskType": {"type": "string"},
        "inference_type": {"type": "string"},
        "owner_group_or_role": {"type": "array", "items": {"type": "string"}},
        "createTime": _NULLABLE_STRING,
        "startTime": _NULLABLE_STRING,
        "completeTime": _NULLABLE_STRING,
        "image_names": {"type": "array", "items": {"type": "string"}},
        "inference_info_name": _NULLABLE_STRING,
        "sagemakerRaw": {"nullable": True, "description": "The runtime's failure report"},
        "payload_string": _NULLABLE_STRING,
        "params": {"type": "object", "additionalProperties": True},
    },
}
JOB_WITH_URLS = {
    "type": "object",
    "properties": {
        **JOB["properties"],
        "img_presigned_urls": {"type": "array", "items": {"type": "string"}},
        "output_presigned_urls": {"type": "array", "items": {"type": "string"}},
    },
}
CREATED = {
    "type": "object",
    "properties": {
        "inference": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "type": {"type": "string"},
                "api_params_s3_location": {"type": "string"},
                "api_params_s3_upload_url": {"type": "string"},
                "models": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}
ACCEPTED = {
    "type": "object",
    "properties": {
        "inference": {
            "type": "object",
            "properties": {
                "inference_id": {"type": "string"},
                "status": {"type": "string"},
                "endpoint_name": {"type": "string"},
                "output_path": _NULLABLE_STRING,
            },
        }
    },
}
LIST = {
    "type": "object",
    "properties": {
        "inferences": {"type": "array", "items": JOB},
        "last_evaluated_key": {"type": "string", "nullable": True},
    },
}
