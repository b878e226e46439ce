from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.endpoints import k8s
from apps.endpoints.choices import Backend
from apps.endpoints.models import Endpoint


class Command(BaseCommand):
    help = (
        "Print, as YAML for `kubectl apply -f -`, a GPU worker Deployment and a KEDA ScaledObject for each live "
        "self-hosted endpoint, scaled on the endpoint's queue with the bounds and backlog target of the console's "
        "scaling hint, and a KEDA ScaledJob that runs each queued training as its own Job (trainer --once)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--endpoint", action="append", default=[], metavar="NAME", help="only this endpoint (repeatable)"
        )
        parser.add_argument("--image", default=settings.ESD_GPU_WORKER_IMAGE, help="the gpu_runtime image")
        parser.add_argument("--namespace", default=settings.ESD_K8S_NAMESPACE, help='"" = none (kubectl -n)')
        parser.add_argument(
            "--broker-url",
            default=settings.DRAMATIQ_BROKER_URL,
            help="the broker as KEDA reaches it (default DRAMATIQ_BROKER_URL); secrets in it are never printed",
        )
        parser.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu per worker (0: none, CPU workers)")
        parser.add_argument("--device", default="cuda", help="the workers' --device")
        parser.add_argument("--cache-gb", type=float, default=100.0, help="the workers' model cache budget")
        parser.add_argument("--cooldown-seconds", type=int, default=300, help="idle time before scaling to zero")
        parser.add_argument("--polling-seconds", type=int, default=15, help="how often KEDA reads the queues")
        parser.add_argument(
            "--grace-seconds",
            type=int,
            default=settings.ESD_ASYNC_TIMEOUT,
            help="time a scaled-in worker has to finish its job (default ESD_ASYNC_TIMEOUT, the longest a job runs)",
        )
        parser.add_argument(
            "--scale-down-window-seconds",
            type=int,
            default=300,
            help="the HPA scales workers in only to the most it wanted over this window",
        )
        parser.add_argument(
            "--trainer-idle-seconds", type=int, default=120, help="a training Job that got no training exits after"
        )
        parser.add_argument("--jobs-history", type=int, default=3, help="finished training Jobs kept")
        parser.add_argument("--failed-jobs-history", type=int, default=5, help="failed training Jobs kept")
        parser.add_argument(
            "--node-selector", action="append", default=[], metavar="KEY=VALUE", help="pin workers to nodes"
        )
        parser.add_argument("--max-trainers", type=int, default=1, help="training workers at most (0: none)")

    def handle(self, *args, **options) -> None:
        selector = []
        for entry in options["node_selector"]:
            key, sep, value = entry.partition("=")
            if not sep or not key:
                raise CommandError(f"--node-selector wants KEY=VALUE, got {entry!r}")
            selector.append((key, value))
        opts = k8s.Options(
            broker_url=options["broker_url"],
            image=options["image"],
            namespace=options["namespace"],
            events_queue=settings.ESD_EVENTS_QUEUE,
            training_queue=settings.ESD_TRAINING_QUEUE,
            gpus_per_worker=options["gpus"],
            device=options["device"],
            cache_gb=options["cache_gb"],
            polling_seconds=options["polling_seconds"],
            cooldown_seconds=options["cooldown_seconds"],
            grace_seconds=options["grace_seconds"],
            scale_down_window_seconds=options["scale_down_window_seconds"],
            trainer_idle_seconds=options["trainer_idle_seconds"],
            successful_jobs_history=options["jobs_history"],
            failed_jobs_history=options["failed_jobs_history"],
            node_selector=tuple(selector),
        )
        for flag, value, least in (
            ("--polling-seconds", opts.polling_seconds, 1),
            ("--trainer-idle-seconds", opts.trainer_idle_seconds, 1),
            ("--grace-seconds", opts.grace_seconds, 0),
            ("--cooldown-seconds", opts.cooldown_seconds, 0),
            ("--scale-down-window-seconds", opts.scale_down_window_seconds, 0),
            ("--jobs-history", opts.successful_jobs_history, 0),
            ("--failed-jobs-history", opts.failed_jobs_history, 0),
        ):
            if value < least:
                raise CommandError(f"{flag} must be at least {least}, got {value}")
        endpoints = Endpoint.objects.live().filter(backend=Backend.SELF_HOSTED).order_by("name")
        names = options["endpoint"]
        if names:
            endpoints = endpoints.filter(name__in=names)
            missing = sorted(set(names) - {e.name for e in endpoints})
            if missing:
                raise CommandError(f"no live self-hosted endpoint named {', '.join(missing)}")
        objects: list[dict] = []
        errors: list[str] = []
        try:
            k8s.broker_kind(opts.broker_url)
        except k8s.ManifestError as exc:
            raise CommandError(str(exc)) from None
        for endpoint in endpoints:
            try:
                objects += k8s.endpoint_objects(endpoint, opts)
            except k8s.ManifestError as exc:
                errors.append(str(exc))
        if errors:  # nothing half-rendered is printed: `| kubectl apply -f -` applies all or nothing
            raise CommandError("; ".join(errors))
        if not names and options["max_trainers"] > 0:
            objects += k8s.trainer_objects(opts, options["max_trainers"])
        if objects:
            self.stdout.write(k8s.render(objects), ending="")
