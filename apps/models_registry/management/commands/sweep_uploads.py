from django.core.management.base import BaseCommand, CommandParser

from apps.models_registry.services import sweep_uploads


class Command(BaseCommand):
    help = (
        "Abort unfinished multipart uploads older than ESD_MULTIPART_MAX_AGE_HOURS (or --max-age-hours) in the "
        "local store or the S3 bucket, and print each one removed. The server runs the same sweep every hour."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--max-age-hours", type=float, default=None, help="Override the setting for this run.")

    def handle(self, *args, **options) -> None:
        aborted = sweep_uploads(options["max_age_hours"])
        for entry in aborted:
            self.stdout.write(f"aborted {entry}")
        self.stderr.write(f"{len(aborted)} stale multipart upload(s) aborted")
