from datetime import date

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.endpoints.usage import GROUPINGS, Period, today, usage
from esd.api.errors import EsdError


def day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{value!r} is not a day (YYYY-MM-DD)") from None


class Command(BaseCommand):
    help = (
        "GPU-seconds used by inference jobs and trainings that ended in a period (server days, TIME_ZONE), "
        "grouped by user, role (a user in two roles counts in both), endpoint (trainings: training:<backend>) "
        "or day. The same figures as the console's Usage page."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", required=True, type=day, help="First day, YYYY-MM-DD (included)")
        parser.add_argument("--until", type=day, help="Last day, YYYY-MM-DD (included; default: today)")
        parser.add_argument("--by", choices=GROUPINGS, default="user", help="Grouping (default: user)")
        parser.add_argument("--user", help="Only this user's jobs")
        parser.add_argument("--csv", action="store_true", help="CSV with a header row instead of a table")

    def handle(self, *args, **options) -> None:
        try:
            result = usage(Period(options["since"], options["until"] or today()), options["by"], options["user"])
        except EsdError as exc:
            raise CommandError(exc.message) from exc
        if options["csv"]:
            self.stdout.write(result.to_csv(), ending="")
            return
        width = max([len(options["by"]), len("total"), *(len(r.key) for r in result.rows)])
        self.stdout.write(f"{options['by']:<{width}}  {'gpu_seconds':>14}  {'inference_jobs':>14}  {'trainings':>9}")
        for row in [*result.rows, result.total]:
            self.stdout.write(
                f"{row.key:<{width}}  {row.gpu_seconds:>14.1f}  {row.inference_jobs:>14}  {row.trainings:>9}"
            )
