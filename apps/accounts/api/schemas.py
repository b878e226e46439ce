"""Body schemas of the account routes (contract §9.1-9.3). Validated and published as given."""

from apps.accounts.permissions import PERMISSIONS
from esd.api.schemas import delete_body

ROLE_NAME = {"type": "string", "minLength": 1, "maxLength": 100}
USERNAME = {"type": "string", "minLength": 1, "maxLength": 150, "pattern": r"^[\w.@+-]+$"}

CREATE_ROLE = {
    "type": "object",
    "required": ["role_name", "permissions"],
    "properties": {
        "role_name": ROLE_NAME,
        "permissions": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {"type": "string", "enum": list(PERMISSIONS)},
        },
        "initial": {"type": "boolean", "description": "First run only (contract §13)"},
        "creator": {"type": "string", "description": "Ignored; the acting user is recorded"},
    },
}

DELETE_ROLES = delete_body("role_name_list", items=ROLE_NAME)

CREATE_USER = {
    "type": "object",
    "required": ["username", "password"],
    "properties": {
        "username": USERNAME,
        "password": {"type": "string", "minLength": 1, "maxLength": 128},
        "roles": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": ROLE_NAME,
        },
        "initial": {"type": "boolean", "description": "First run only (contract §13)"},
        "creator": {"type": "string", "description": "Ignored; the acting user is recorded"},
    },
}

DELETE_USERS = delete_body("user_name_list", items={"type": "string", "minLength": 1, "maxLength": 150})
