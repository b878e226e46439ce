from django.core.management.base import BaseCommand, CommandParser

from apps.endpoints import services
from apps.endpoints.management.commands.refresh_endpoints import print_table
from apps.endpoints.models import Endpoint


class Command(BaseCommand):
    help = (
        "Status of endpoints as recorded, with each self-hosted endpoint's queue backlog and the number of "
        "workers it should run (the scaling hint an orchestrator can follow)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="*", help="Endpoint names (default: all live endpoints)")
        parser.add_argument("--desired-only", action="store_true", help="Print only the desired worker count")

    def handle(self, *args, **options) -> None:
        endpoints = Endpoint.objects.live().order_by("name")
        if options["names"]:
            endpoints = endpoints.filter(name__in=options["names"])
        rows = [services.describe_for_operators(e) for e in endpoints]
        if options["desired_only"]:
            for row in rows:
                self.stdout.write(f"{row['name']} {row['desired'] if row['desired'] is not None else ''}".rstrip())
            return
        print_table(self.stdout, rows)
