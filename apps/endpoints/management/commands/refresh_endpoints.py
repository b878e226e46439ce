from django.core.management.base import BaseCommand

from apps.endpoints import services
from apps.endpoints.models import Endpoint


class Command(BaseCommand):
    help = "One reconcile pass over every live endpoint (what the periodic sweep does), then print a table."

    def handle(self, *args, **options) -> None:
        rows = []
        for endpoint_id in Endpoint.objects.live().order_by("name").values_list("pk", flat=True):
            endpoint = services.reconcile(str(endpoint_id))
            if endpoint is not None:
                rows.append(services.describe_for_operators(endpoint))
        print_table(self.stdout, rows)


def print_table(out, rows: list[dict]) -> None:
    columns = ("name", "backend", "type", "status", "instances", "backlog", "desired", "error")
    table = [columns] + [tuple("" if r[c] is None else str(r[c]) for c in columns) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not rows:
        out.write("no live endpoints")
