"""Kubernetes objects for GPU workers: per self-hosted endpoint a GPU worker ``Deployment`` and a KEDA
``ScaledObject`` that scales it on the endpoint's queue, down to zero when the endpoint allows it; for trainings a
KEDA ``ScaledJob`` that starts one Job per queued training.

Everything is derived from the endpoint row and the broker URL, and the scaling target and bounds come from
``apps.endpoints.scaling`` (the console's hint), so what the console says an endpoint should run is what the
cluster runs. ``manage.py k8s_manifests`` prints these objects; the static parts of a deployment (web, control
worker, migrations) are the kustomize base under ``deploy/k8s/``.

Why trainings are Jobs and inference workers a Deployment: KEDA's triggers count the messages *waiting* in a queue
(the Redis list ``dramatiq:<queue>``, RabbitMQ's ready messages); a message a worker has taken is no longer there,
so a busy worker looks like an idle one. For inference that is harmless: jobs are short, a scaled-in worker is sent
SIGTERM and finishes the job in hand within ``terminationGracePeriodSeconds`` (``--grace-seconds``, by default
``ESD_ASYNC_TIMEOUT``, after which the server fails the job anyway), and a scale-down stabilization window (the
HPA's ``behavior.scaleDown``) keeps a queue that drains for a moment from scaling busy workers in at once. A
training runs for hours: a Deployment would be scaled to zero while it trains, its grace would run out, the
un-acked message would be requeued, the queue would scale it up again and the training would start over, forever.
A ``ScaledJob`` never scales anything in: each Job runs ``python -m gpu_runtime trainer --once``, takes one
training, acks it and exits, and KEDA only starts Jobs (``accurate`` strategy: the queue length excludes the
trainings Jobs are running, which is exactly what the trigger reports) up to ``--max-trainers`` at a time.

Secrets never appear in the output: workers read ``DRAMATIQ_BROKER_URL`` (and ``REDIS_PASSWORD`` when the broker
has one) from the Secret the kustomize base expects, and KEDA reads them from the worker's environment
(``hostFromEnv``/``passwordFromEnv``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from apps.endpoints import scaling
from apps.endpoints.models import Endpoint

# The GPU runtime talks to dramatiq's RedisBroker with its default namespace (gpu_runtime.worker.make_broker), and
# the control plane does too (esd.settings): a queue's messages wait in the Redis list "{namespace}:{queue}".
REDIS_NAMESPACE = "dramatiq"
SECRET_NAME = "esd-secrets"  # noqa: S105 - a name, not a value: the Secret of deploy/k8s/base (keys: DRAMATIQ_BROKER_URL, REDIS_PASSWORD, ...)
PART_OF = "esd-server"
MANAGED_BY = "esd-server-k8s-manifests"
MODELS_DIR = "/var/lib/esd-runtime"
RUN_AS_USER = 10001  # the images' USER (Dockerfile, gpu_runtime/Dockerfile)
METRICS_PORT = 9100  # the worker's /metrics, /healthz and /readyz (gpu_runtime --metrics-port)
# The usual Prometheus pod-discovery annotations (the worker's port has no token: cluster network only).
SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}


class ManifestError(ValueError):
    """An endpoint or broker the manifests cannot be rendered for; the message says which and why."""


@dataclass(frozen=True)
class Options:
    """How the cluster runs GPU workers (the command's flags)."""

    broker_url: str
    image: str = "esd-gpu-runtime:latest"
    namespace: str = ""
    events_queue: str = "esd-events"
    training_queue: str = "esd-training"
    gpus_per_worker: int = 1
    device: str = "cuda"
    cache_gb: float = 100.0
    polling_seconds: int = 15
    cooldown_seconds: int = 300
    # SIGTERM finishes the job in hand: at least the longest a job may run (ESD_ASYNC_TIMEOUT, the command's default)
    grace_seconds: int = 3600
    # the HPA scales in only to the highest replica count it computed over this window (not for scale-to-zero,
    # which is KEDA's cooldown_seconds)
    scale_down_window_seconds: int = 300
    # trainer Jobs: a Job that got no training in this time exits (its message was taken by another, or was a cancel)
    trainer_idle_seconds: int = 120
    successful_jobs_history: int = 3
    failed_jobs_history: int = 5
    node_selector: tuple[tuple[str, str], ...] = ()


def broker_kind(url: str) -> str:
    """``redis`` or ``rabbitmq``: which KEDA scaler reads this broker's queues."""
    if url.startswith(("redis://", "rediss://")):
        return "redis"
    if url.startswith(("amqp://", "amqps://")):
        return "rabbitmq"
    if url.startswith("unix://"):
        raise ManifestError("a unix:// Redis socket cannot be reached by KEDA: use a redis:// URL")
    raise ManifestError(
        "KEDA scales on a Redis list or a RabbitMQ queue: set DRAMATIQ_BROKER_URL (or --broker-url) to a redis:// "
        f"or amqp:// URL, got {url!r}"
    )


def redis_list_name(queue_name: str) -> str:
    """The Redis list dramatiq keeps a queue's waiting message ids in (its dispatch script's ``queue_full_name``):
    the same list ``esd.tasks.queue_backlog`` measures for the console."""
    return f"{REDIS_NAMESPACE}:{queue_name}"


def k8s_name(name: str) -> str:
    """A DNS-1123 label for an endpoint name (which may hold capitals): lowercased, with a short digest appended
    when lowercasing changed it, so ``esd-async-A`` and ``esd-async-a`` never share a Deployment."""
    lowered = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "endpoint"
    if lowered == name:
        return name[:63]
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{lowered[:56].rstrip('-')}-{digest}"


def _trigger(queue_name: str, target: int, options: Options) -> dict[str, Any]:
    """The KEDA trigger on one queue: activate at the first waiting job, then ``target`` jobs per worker."""
    kind = broker_kind(options.broker_url)
    if kind == "redis":
        url = urlsplit(options.broker_url)
        metadata = {
            "address": f"{url.hostname or 'localhost'}:{url.port or 6379}",
            "listName": redis_list_name(queue_name),
            "listLength": str(target),
            "activationListLength": "0",
            "databaseIndex": (url.path or "/0").strip("/") or "0",
            "enableTLS": "true" if url.scheme == "rediss" else "false",
        }
        if url.password:
            metadata["passwordFromEnv"] = "REDIS_PASSWORD"
        if url.username:
            metadata["usernameFromEnv"] = "REDIS_USERNAME"
        return {"type": "redis", "metadata": metadata}
    return {
        "type": "rabbitmq",
        "metadata": {
            "protocol": "amqp",
            "mode": "QueueLength",
            "queueName": queue_name,
            "value": str(target),
            "activationValue": "0",
            "hostFromEnv": "DRAMATIQ_BROKER_URL",
        },
    }


def _env(options: Options) -> list[dict[str, Any]]:
    """The worker's environment: the broker from the Secret, the events queue; nothing else (a GPU worker needs no
    database and no storage credentials, everything arrives as presigned URLs)."""
    env: list[dict[str, Any]] = [
        {"name": "DRAMATIQ_BROKER_URL", "valueFrom": {"secretKeyRef": _secret("DRAMATIQ_BROKER_URL")}},
        {"name": "ESD_EVENTS_QUEUE", "value": options.events_queue},
        {"name": "ESD_RUNTIME_DIR", "value": MODELS_DIR},
    ]
    if broker_kind(options.broker_url) == "redis":
        url = urlsplit(options.broker_url)
        for present, var in ((url.password, "REDIS_PASSWORD"), (url.username, "REDIS_USERNAME")):
            if present:
                env.append({"name": var, "valueFrom": {"secretKeyRef": _secret(var)}})
    return env


def _secret(key: str) -> dict[str, str]:
    return {"name": SECRET_NAME, "key": key}


def _labels(component: str, queue_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "esd-server/queue": k8s_name(queue_name),
    }


def _metadata(name: str, labels: dict[str, str], options: Options, annotations: dict | None = None) -> dict:
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if options.namespace:
        metadata["namespace"] = options.namespace
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def _pod_spec(args: list[str], options: Options) -> dict[str, Any]:
    """The GPU worker's pod: one container running ``python -m gpu_runtime`` with ``args``."""
    pod_spec: dict[str, Any] = {
        # SIGTERM finishes the job in hand (gpu_runtime.service): give a stopped worker time to do so.
        "terminationGracePeriodSeconds": options.grace_seconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "fsGroup": RUN_AS_USER},
        "containers": [
            {
                "name": "worker",
                "image": options.image,
                "args": args,
                "env": _env(options),
                "resources": {"limits": {"nvidia.com/gpu": options.gpus_per_worker}} if options.gpus_per_worker else {},
                "volumeMounts": [{"name": "runtime", "mountPath": MODELS_DIR}],
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                # alive while the process answers; ready while its consumer answers the broker and its threads run
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 20},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10},
            }
        ],
        # The model cache; a cold worker downloads what its first jobs name (presigned URLs in each job).
        "volumes": [{"name": "runtime", "emptyDir": {}}],
    }
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    return pod_spec


def _deployment(
    name: str, labels: dict[str, str], args: list[str], options: Options, annotations: dict[str, str]
) -> dict[str, Any]:
    """A GPU worker Deployment with no ``replicas``: KEDA's HPA owns the count (a rendered number would fight it)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, labels, options, annotations),
        "spec": {
            "selector": {"matchLabels": _selector(labels)},
            "template": {
                "metadata": {"labels": labels, "annotations": {**annotations, **SCRAPE}},
                "spec": _pod_spec(args, options),
            },
        },
    }


def _selector(labels: dict[str, str]) -> dict[str, str]:
    return {key: labels[key] for key in ("app.kubernetes.io/name", "esd-server/queue")}


def _scaled_object(
    name: str,
    labels: dict[str, str],
    queue_name: str,
    bounds: tuple[int, int],
    target: int,
    options: Options,
    annotations: dict[str, str],
) -> dict[str, Any]:
    fewest, most = bounds
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(name, labels, options, annotations),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "pollingInterval": options.polling_seconds,
            "cooldownPeriod": options.cooldown_seconds,
            "minReplicaCount": fewest,
            "maxReplicaCount": most,
            # The trigger sees waiting jobs only, never the ones in hand: a queue that drains for a moment must not
            # scale busy workers in at once (they would finish their job under SIGTERM, but churn).
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": options.scale_down_window_seconds}}
                }
            },
            "triggers": [_trigger(queue_name, target, options)],
        },
    }


def _scaled_job(
    name: str,
    labels: dict[str, str],
    queue_name: str,
    args: list[str],
    most: int,
    options: Options,
    annotations: dict[str, str],
) -> dict[str, Any]:
    """One Kubernetes Job per queued message, ``most`` at a time, none ever stopped by scaling (see the module
    docstring). Each Job's pod runs once (``restartPolicy: Never``, ``backoffLimit: 0``): its message is acked
    when the run ends, whatever the outcome (reported as events), and a pod that dies leaves its message un-acked
    for the broker to give back, so a retry here would only start a second consumer of nothing."""
    pod_spec = {**_pod_spec(args, options), "restartPolicy": "Never"}
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": _metadata(name, labels, options, annotations),
        "spec": {
            "jobTargetRef": {
                "parallelism": 1,
                "completions": 1,
                "backoffLimit": 0,
                "template": {
                    "metadata": {"labels": labels, "annotations": {**annotations, **SCRAPE}},
                    "spec": pod_spec,
                },
            },
            "pollingInterval": options.polling_seconds,
            "successfulJobsHistoryLimit": options.successful_jobs_history,
            "failedJobsHistoryLimit": options.failed_jobs_history,
            "minReplicaCount": 0,
            "maxReplicaCount": most,
            # Re-applying the manifests (after every endpoint change) must not delete Jobs that are training.
            "rollout": {"strategy": "gradual"},
            # The queue length excludes messages Jobs hold, so: new Jobs = min(waiting, max - running).
            "scalingStrategy": {"strategy": "accurate"},
            "triggers": [_trigger(queue_name, 1, options)],
        },
    }


def endpoint_objects(endpoint: Endpoint, options: Options) -> list[dict[str, Any]]:
    """The Deployment and ScaledObject of one self-hosted endpoint.

    Bounds and target are ``scaling.replica_bounds`` and ``scaling.backlog_per_worker``: an endpoint without
    autoscaling runs exactly ``initial_instance_count`` workers; one that autoscales from 0 starts a worker when its
    first job is queued and goes back to none after ``cooldown_seconds`` without work.
    """
    if endpoint.backend != "self-hosted":
        raise ManifestError(f"endpoint {endpoint.name} is a {endpoint.backend} endpoint: it runs no GPU worker here")
    fewest, most = scaling.replica_bounds(endpoint)
    if most < 1:
        raise ManifestError(f"endpoint {endpoint.name} may run at most {most} workers: no worker could ever serve it")
    name = k8s_name(endpoint.name)
    labels = {**_labels("esd-gpu-worker", endpoint.queue_name), "esd-server/endpoint": name}
    annotations = {"esd-server/endpoint-name": endpoint.name, "esd-server/instance-type": endpoint.instance_type}
    args = [
        "worker",
        "--endpoint",
        endpoint.name,
        "--device",
        options.device,
        "--instance-type",
        endpoint.instance_type,
        "--models-dir",
        MODELS_DIR,
        "--cache-gb",
        f"{options.cache_gb:g}",
        "--metrics-port",
        str(METRICS_PORT),
    ]
    target = scaling.backlog_per_worker(endpoint)
    return [
        _deployment(name, labels, args, options, annotations),
        _scaled_object(name, labels, endpoint.queue_name, (fewest, most), target, options, annotations),
    ]


def trainer_objects(options: Options, max_trainers: int) -> list[dict[str, Any]]:
    """The trainings: a ScaledJob on the training queue, a Job per queued training (``python -m gpu_runtime trainer
    --once``), at most ``max_trainers`` at a time."""
    name = "esd-trainer"
    labels = _labels("esd-trainer", options.training_queue)
    annotations = {"esd-server/queue-name": options.training_queue}
    args = [
        "trainer",
        "--queue",
        options.training_queue,
        "--device",
        options.device,
        "--work-dir",
        MODELS_DIR,
        "--cache-gb",
        f"{options.cache_gb:g}",
        "--metrics-port",
        str(METRICS_PORT),
        "--once",
        "--idle-exit-seconds",
        str(options.trainer_idle_seconds),
    ]
    if max_trainers < 1:
        raise ManifestError(f"--max-trainers must be at least 1 to run trainings, got {max_trainers}")
    return [_scaled_job(name, labels, options.training_queue, args, max_trainers, options, annotations)]


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (a Deployment's labels appear twice): plain to read and to diff."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(objects: list[dict[str, Any]]) -> str:
    """One multi-document YAML stream, for ``kubectl apply -f -``."""
    return yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, explicit_start=True)
