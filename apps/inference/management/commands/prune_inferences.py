from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apps.inference.choices import InferenceStatus
from apps.inference.models import InferenceJob
from apps.inference.services import delete_jobs

BATCH = 500


class Command(BaseCommand):
    help = "Delete inference jobs older than DAYS with their parameters, raw outputs and result images."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=int, required=True, metavar="DAYS")
        parser.add_argument("--include-running", action="store_true", help="also jobs still in progress")

    def handle(self, *args, **options) -> None:
        if options["older_than"] < 1:
            raise CommandError("--older-than must be at least 1")
        cutoff = timezone.now() - timedelta(days=options["older_than"])
        old = InferenceJob.objects.filter(create_time__lt=cutoff)
        if not options["include_running"]:
            old = old.exclude(status=InferenceStatus.IN_PROGRESS)
        total = 0
        while batch := list(old.order_by("create_time")[:BATCH]):
            total += delete_jobs(batch)
        self.stdout.write(f"deleted {total} inference job(s) created before {cutoff:%Y-%m-%d %H:%M} UTC")
