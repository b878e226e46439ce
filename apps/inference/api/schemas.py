"""Body schemas of the inference routes (contract §9.7); the response shapes are in ``serializers``."""

from apps.inference.choices import InferenceType
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
