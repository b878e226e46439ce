"""Body schemas of the endpoint routes (contract §9.6); the responses are serializers (``serializers``)."""

from apps.endpoints.choices import REQUEST_TYPES, Backend
from esd.api.schemas import delete_body

NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$"

CREATE = {
    "type": "object",
    "required": [
        "endpoint_type",
        "instance_type",
        "initial_instance_count",
        "autoscaling_enabled",
        "assign_to_roles",
        "creator",
    ],
    "properties": {
        "endpoint_type": {"type": "string", "enum": REQUEST_TYPES},
        "instance_type": {"type": "string", "minLength": 1, "description": "A label for self-hosted endpoints"},
        "initial_instance_count": {"type": "number", "minimum": 1, "maximum": 1000, "description": "A whole number"},
        "autoscaling_enabled": {"type": "boolean"},
        "assign_to_roles": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {"type": "string", "minLength": 1},
            "description": "Owner roles (they need not exist)",
        },
        "creator": {"type": "string", "description": "Ignored; the acting user is recorded"},
        "endpoint_name": {
            "type": "string",
            "maxLength": 20,
            "description": f'Short name, "" = generated; else pattern {NAME_PATTERN}',
        },
        "min_instance_number": {
            "type": "number",
            "minimum": 0,
            "maximum": 1000,
            "description": "A whole number, default 0",
        },
        "max_instance_number": {
            "type": "number",
            "minimum": 1,
            "maximum": 1000,
            "description": "A whole number, default 1",
        },
        "custom_docker_image_uri": {"type": "string", "description": '"" = the default inference image'},
        "custom_extensions": {"type": "string", "description": "Up to 3 repositories, separated by spaces/commas"},
        "backend": {"type": "string", "enum": [b.value for b in Backend]},
    },
}

DELETE = delete_body("endpoint_name_list", max_items=10, username={"type": "string", "description": "Ignored"})
