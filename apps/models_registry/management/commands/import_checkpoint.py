from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.models_registry import services
from apps.models_registry.choices import CheckpointType
from esd.api.errors import EsdError


class Command(BaseCommand):
    help = "Register a local model file as an Active checkpoint, streaming it into the blob store."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path)
        parser.add_argument("--type", required=True, choices=CheckpointType.values, dest="checkpoint_type")
        parser.add_argument(
            "--roles", nargs="*", default=[], help="Owner roles (or user names, or *); none: visible to everyone"
        )
        parser.add_argument("--creator", default="ESD", help="Recorded creator (default ESD)")

    def handle(self, *args, **options) -> None:
        path: Path = options["path"]
        if not path.is_file():
            raise CommandError(f"{path} is not a file")
        try:
            checkpoint = services.import_file(
                path, checkpoint_type=options["checkpoint_type"], owners=options["roles"], creator=options["creator"]
            )
        except EsdError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"{checkpoint.id} {options['checkpoint_type']} {path.name} Active")
