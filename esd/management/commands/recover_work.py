from django.core.management.base import BaseCommand

from esd.tasks import recover_unfinished_work


class Command(BaseCommand):
    help = "Re-enqueue unfinished background work recorded in the database (after a broker outage or restart)."

    def handle(self, *args, **options) -> None:
        counts = recover_unfinished_work()
        if not counts:
            self.stdout.write("nothing to recover: no app registers unfinished work yet")
        for name, count in counts.items():
            self.stdout.write(f"{name}: {'failed, see log' if count < 0 else count}")
