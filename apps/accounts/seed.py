"""Seed data (contract §13): roles ``IT Operator`` and ``byoc`` and user ``api``, created only when missing.

Called by the data migration with the historical app registry; tests call it again after a transactional test
flushed the tables.
"""

from __future__ import annotations

from typing import Any

RESOURCES = ("train", "checkpoint", "inference", "sagemaker_endpoint", "user", "role")
PERMISSIONS = [f"{r}:{a}" for r in RESOURCES for a in ("all", "list", "create")]
ADMIN_PERMISSIONS = [f"{r}:all" for r in RESOURCES]


def seed(apps: Any) -> None:
    content_type_model = apps.get_model("contenttypes", "ContentType")
    permission_model = apps.get_model("auth", "Permission")
    role_model = apps.get_model("accounts", "Role")
    user_model = apps.get_model("accounts", "User")

    content_type, _ = content_type_model.objects.get_or_create(app_label="accounts", model="role")
    for perm in PERMISSIONS:
        permission_model.objects.get_or_create(content_type=content_type, codename=perm, defaults={"name": perm})
    admin_permissions = list(permission_model.objects.filter(content_type=content_type, codename__in=ADMIN_PERMISSIONS))
    for name in ("IT Operator", "byoc"):
        if not role_model.objects.filter(name=name).exists():
            role = role_model.objects.create(name=name, creator="ESD")
            role.permissions.set(admin_permissions)
    if not user_model.objects.filter(username="api").exists():
        # "!" marks an unusable password, as Django's set_unusable_password() does.
        user = user_model.objects.create(username="api", creator="ESD", password="!")  # noqa: S106
        user.groups.set(role_model.objects.filter(name="IT Operator"))
