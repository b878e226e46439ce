from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.accounts.models import ApiKey
from apps.accounts.services import revoke_api_key


class Command(BaseCommand):
    help = "Revoke the API key whose display prefix (its first characters, as listed in the console) is PREFIX."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="The key's prefix (up to 8 characters), or the whole key.")

    def handle(self, *args, **options) -> None:
        prefix = options["prefix"][:8]
        if not prefix:
            raise CommandError("the prefix must not be empty")
        keys = list(ApiKey.objects.select_related("user").filter(prefix__startswith=prefix))
        if not keys:
            raise CommandError(f"no API key starts with {prefix}")
        if len(keys) > 1:
            listed = ", ".join(f"{k.prefix} ({k.user.username})" for k in keys)
            raise CommandError(f"{prefix} matches {len(keys)} keys: {listed}; give more characters")
        key = keys[0]
        if revoke_api_key(key):
            self.stdout.write(f"revoked {key.prefix}… of {key.user.username}")
        else:
            self.stdout.write(f"{key.prefix}… of {key.user.username} was already revoked")
