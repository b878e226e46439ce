"""Seed data (contract §13): roles ``IT Operator`` and ``byoc``, user ``api``; created only when missing.

The ESD permissions are created here rather than left to ``post_migrate`` because the seed roles need them now.
"""

from django.db import migrations

RESOURCES = ("train", "checkpoint", "inference", "sagemaker_endpoint", "user", "role")
PERMISSIONS = [f"{r}:{a}" for r in RESOURCES for a in ("all", "list", "create")]
ADMIN_PERMISSIONS = [f"{r}:all" for r in RESOURCES]


def seed(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    Role = apps.get_model("accounts", "Role")
    User = apps.get_model("accounts", "User")

    content_type, _ = ContentType.objects.get_or_create(app_label="accounts", model="role")
    for perm in PERMISSIONS:
        Permission.objects.get_or_create(content_type=content_type, codename=perm, defaults={"name": perm})
    admin_permissions = list(Permission.objects.filter(content_type=content_type, codename__in=ADMIN_PERMISSIONS))

    for name in ("IT Operator", "byoc"):
        if not Role.objects.filter(name=name).exists():
            role = Role.objects.create(name=name, creator="ESD")
            role.permissions.set(admin_permissions)

    if not User.objects.filter(username="api").exists():
        # "!" marks an unusable password, as Django's set_unusable_password() does.
        user = User.objects.create(username="api", creator="ESD", password="!")  # noqa: S106
        user.groups.set(Role.objects.filter(name="IT Operator"))


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
