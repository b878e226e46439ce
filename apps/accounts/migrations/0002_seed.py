"""Seed data (contract §13); see ``apps.accounts.seed``. The permissions are created here, not left to
``post_migrate``, because the seeded roles need them now."""

from django.db import migrations

from apps.accounts.seed import seed


def forwards(apps, schema_editor):
    seed(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
