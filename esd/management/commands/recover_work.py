from django.core.management.base import BaseCommand

from esd.tasks import recover_unfinished_work, start_periodic


class Command(BaseCommand):
    help = (
        "Re-enqueue unfinished background work recorded in the database and (re)start the periodic sweeps. "
        "Run after a deploy or a broker outage; running it again is harmless."
    )

    def handle(self, *args, **options) -> None:
        counts = recover_unfinished_work()
        for name in start_periodic():
            self.stdout.write(f"periodic: {name}")
        if not counts:
            self.stdout.write("nothing to recover: no app registers unfinished work yet")
        for name, count in counts.items():
            self.stdout.write(f"{name}: {'failed, see log' if count < 0 else count}")
