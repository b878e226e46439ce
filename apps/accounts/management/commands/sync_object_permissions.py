from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.accounts.grants import sync_all


class Command(BaseCommand):
    help = (
        "Verify the object permissions (django-guardian grants) of every shared resource against its owner names "
        "and creator, and repair them. Idempotent: a second run changes nothing. --check only reports."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--check", action="store_true", help="Change nothing; exit with an error when a grant is wrong."
        )

    def handle(self, *args, **options) -> None:
        repair = not options["check"]
        reports = sync_all(repair=repair)
        drift = 0
        for label, report in reports.items():
            drift += report.added + report.removed
            verb = ("added", "removed") if repair else ("missing", "extra")
            self.stdout.write(f"{label}: {report.added} {verb[0]}, {report.removed} {verb[1]}")
        if not repair and drift:
            raise CommandError(f"{drift} object permissions differ from the owner names; run without --check")
