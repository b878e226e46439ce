"""``manage.py resume_training JOB_ID``: run a failed or stopped training again from its latest saved state."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.training import training
from apps.training.choices import TrainingStatus
from apps.training.models import TrainingJob
from esd.api.errors import EsdError


class Command(BaseCommand):
    help = (
        "Resume a failed or stopped training from its latest saved state (it needs save_state = true): the same job "
        "goes on, continuing its step count and loss curve. With --list, show what each resumable job would resume."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("job_id", nargs="?", help="The training's id")
        parser.add_argument("--by", default="operator", help="Recorded in the job's log (default operator)")
        parser.add_argument("--list", action="store_true", help="List failed and stopped jobs and their states")

    def handle(self, *args, **options) -> None:
        if options["list"]:
            ended = (TrainingStatus.FAILED, TrainingStatus.STOPPED)
            for job in TrainingJob.objects.filter(status__in=ended).order_by("-created"):
                problem = training.resume_problem(job)
                what = f"not resumable: {problem}" if problem else f"resumes from {training.latest_state(job)['name']}"
                self.stdout.write(f"{job.id} {job.status} {what}")
            return
        if not options["job_id"]:
            raise CommandError("give a training id (or --list)")
        try:
            job = training.resume_training(options["job_id"], by=options["by"])
        except EsdError as exc:
            raise CommandError(exc.message) from exc
        except (ValueError, TypeError) as exc:
            raise CommandError(f"{options['job_id']} is not a training id") from exc
        state = training.latest_state(job)
        self.stdout.write(f"{job.id} {job.status} run {job.attempt}, from {state['name']} (step {state['step']})")
