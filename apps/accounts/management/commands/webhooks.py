from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.accounts import webhooks
from apps.accounts.choices import WebhookEvent
from apps.accounts.models import Role, User, Webhook
from esd.api.errors import EsdError


class Command(BaseCommand):
    help = (
        "Webhooks called when a job ends: list | add --user U | --role R --url URL [--events ...] | remove ID | "
        "test ID (sends a ping). `add` prints the signing secret alone on the last line; it is not shown again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="every webhook: id, whose jobs, url, events, active (secrets are not shown)")
        add = sub.add_parser("add", help="a webhook for a user's jobs or for the jobs of a role's members")
        owner = add.add_mutually_exclusive_group(required=True)
        owner.add_argument("--user", help="username whose jobs are reported")
        owner.add_argument("--role", help="role whose members' jobs are reported")
        add.add_argument("--url", required=True)
        add.add_argument(
            "--events", nargs="+", default=None, help=f"any of {', '.join(WebhookEvent.values)} (default: all)"
        )
        for name, text in (("remove", "delete a webhook and its deliveries"), ("test", "send a ping event now")):
            sub.add_parser(name, help=text).add_argument("id", type=int)

    def handle(self, *args, **options) -> None:
        action = options["action"]
        if action == "list":
            for hook in Webhook.objects.select_related("user", "role").order_by("pk"):
                state = "active" if hook.active else "inactive"
                self.stdout.write(f"{hook.pk}\t{hook.subscriber}\t{hook.url}\t{','.join(hook.events)}\t{state}")
            return
        if action == "add":
            self._add(options)
            return
        hook = Webhook.objects.select_related("user", "role").filter(pk=options["id"]).first()
        if hook is None:
            raise CommandError(f"webhook {options['id']} does not exist")
        if action == "remove":
            hook.delete()
            self.stderr.write(f"removed webhook {options['id']} ({hook.url})")
        else:
            try:
                delivery = webhooks.ping(hook)
            except EsdError as exc:
                raise CommandError(exc.message) from exc
            self.stdout.write(f"ping {delivery.id} queued for {hook.url} (the admin and the console list how it went)")

    def _add(self, options: dict) -> None:
        user = role = None
        if options["user"]:
            user = User.objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"user {options['user']} does not exist")
        else:
            role = Role.objects.filter(name=options["role"]).first()
            if role is None:
                raise CommandError(f"role {options['role']} does not exist")
        try:
            hook = webhooks.create_webhook(
                url=options["url"], user=user, role=role, events=options["events"], by="manage.py"
            )
        except EsdError as exc:
            raise CommandError(exc.message) from exc
        self.stderr.write(f"webhook {hook.pk} for {hook.subscriber}: {hook.url} ({', '.join(hook.events)})")
        self.stdout.write(hook.secret)
