from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.accounts.choices import ApiKeyKind
from apps.accounts.models import User
from apps.accounts.services import issue_api_key


class Command(BaseCommand):
    help = "Issue an API key for USERNAME. The key is printed alone on the last line and never shown again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--service",
            action="store_true",
            help="A service key for a trusted front end: it acts for the user named by the `username` header.",
        )
        parser.add_argument("--expires-days", type=int, default=None, help="Days until the key expires.")
        parser.add_argument("--name", default="", help="A label to recognise the key by.")

    def handle(self, *args, **options) -> None:
        user = User.objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"user {options['username']} does not exist")
        if options["expires_days"] is not None and options["expires_days"] < 1:
            raise CommandError("--expires-days must be at least 1")
        kind = ApiKeyKind.SERVICE if options["service"] else ApiKeyKind.PERSONAL
        key, raw = issue_api_key(user, kind=kind, name=options["name"], expires_days=options["expires_days"])
        expiry = key.expires_at.isoformat() if key.expires_at else "never"
        self.stderr.write(f"{kind} key {key.prefix}… for {user.username}, expires {expiry}")
        self.stdout.write(raw)
