"""`manage.py k8s_manifests`: the rendered Deployment and KEDA ScaledObject of every self-hosted endpoint match the
endpoint row, the scaling KEDA's HPA derives from them is the console's hint for every backlog, and trainings are a
KEDA ScaledJob whose every field follows the command's options (one `trainer --once` Job per queued training)."""

import math
import os
import uuid
from io import StringIO

import dramatiq
import pytest
import yaml
from django.core.management import CommandError, call_command

from apps.endpoints import services
from apps.endpoints.models import Endpoint
from tests.conftest import Api

REDIS = "redis://:s3cret-pw@redis.esd.svc:6380/3"
RABBIT = "amqp://esd:rabbit-pw@rabbit.esd.svc:5672/"


def body(**changes):
    return {
        "endpoint_type": "Async",
        "instance_type": "ml.g5.xlarge",
        "initial_instance_count": 1,
        "autoscaling_enabled": False,
        "assign_to_roles": ["byoc"],
        "creator": "admin",
        **changes,
    }


@pytest.fixture
def rows(api: Api, admin_key, settings):
    """Four self-hosted endpoints of every scaling shape, created through the API, and one SageMaker row."""
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    shapes = {
        "zero": body(endpoint_name="zero", autoscaling_enabled=True, min_instance_number=0, max_instance_number=4),
        "rt": body(
            endpoint_type="Real-time",
            endpoint_name="rt",
            instance_type="rtx-4090",
            autoscaling_enabled=True,
            min_instance_number=1,
            max_instance_number=3,
        ),
        "fixed": body(endpoint_name="fixed", initial_instance_count=2),
        "Caps": body(endpoint_name="Caps", autoscaling_enabled=True, min_instance_number=0, max_instance_number=1),
    }
    for shape in shapes.values():
        answer = api.post("endpoints", shape, key=admin_key)
        assert answer.status == 202, answer.body
    Endpoint.objects.create(
        name="esd-async-cloud", endpoint_type="Async", backend="sagemaker", instance_type="ml.g5.xlarge", creator="x"
    )
    return {e.name: e for e in Endpoint.objects.filter(backend="self-hosted")}


def render(*args: str) -> list[dict]:
    out = StringIO()
    call_command("k8s_manifests", *args, stdout=out)
    text = out.getvalue()
    assert "s3cret-pw" not in text and "rabbit-pw" not in text  # secrets stay in the Secret
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_endpoint(docs: list[dict]) -> dict[str, dict[str, dict]]:
    """{endpoint name: {kind: object}} from the annotation that carries the exact (case-kept) name."""
    found: dict[str, dict[str, dict]] = {}
    for doc in docs:
        name = doc["metadata"].get("annotations", {}).get("esd-server/endpoint-name")
        if name:
            assert doc["kind"] not in found.setdefault(name, {})
            found[name][doc["kind"]] = doc
    return found


def keda_desired(scaled: dict, backlog: int) -> int:
    """What KEDA does with a queue-length trigger, from the ScaledObject alone: no replicas while the queue is at or
    below the activation value (when minReplicaCount is 0), otherwise the HPA's ceil(metric / AverageValue target)
    clamped to [max(min, 1), max]."""
    spec = scaled["spec"]
    meta = spec["triggers"][0]["metadata"]
    target = int(meta.get("listLength") or meta["value"])
    activation = int(meta.get("activationListLength") or meta.get("activationValue") or 0)
    low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
    if low == 0 and backlog <= activation:
        return 0
    return max(low, 1, min(high, math.ceil(backlog / target)))


@pytest.mark.django_db
def test_redis_manifests_match_every_endpoint(rows, settings):
    docs = render("--broker-url", REDIS, "--image", "registry.example/esd-gpu:1.2", "--namespace", "gpu")
    objects = by_endpoint(docs)
    assert set(objects) == set(rows)  # every self-hosted endpoint, and the SageMaker one not at all
    expected_bounds = {"esd-async-zero": (0, 4), "esd-real-time-rt": (1, 3), "esd-async-fixed": (2, 2)}
    expected_bounds["esd-async-Caps"] = (0, 1)
    for name, endpoint in rows.items():
        deployment, scaled = objects[name]["Deployment"], objects[name]["ScaledObject"]
        assert deployment["apiVersion"] == "apps/v1" and scaled["apiVersion"] == "keda.sh/v1alpha1"
        k8s_name = deployment["metadata"]["name"]
        assert k8s_name == scaled["metadata"]["name"] == scaled["spec"]["scaleTargetRef"]["name"]
        assert deployment["metadata"]["namespace"] == scaled["metadata"]["namespace"] == "gpu"
        assert len(k8s_name) <= 63 and k8s_name == k8s_name.lower()
        # the worker serves exactly this endpoint's queue on a GPU, reporting the endpoint's instance type
        pod = deployment["spec"]["template"]
        assert all(pod["metadata"]["labels"][k] == v for k, v in deployment["spec"]["selector"]["matchLabels"].items())
        container = pod["spec"]["containers"][0]
        assert container["image"] == "registry.example/esd-gpu:1.2"
        args = container["args"]
        assert args[0] == "worker"
        assert args[args.index("--endpoint") + 1] == endpoint.queue_name == name
        assert args[args.index("--instance-type") + 1] == endpoint.instance_type
        assert args[args.index("--device") + 1] == "cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        # probed and scraped on the port the worker serves /healthz, /readyz and /metrics on
        port = args[args.index("--metrics-port") + 1]
        assert container["ports"] == [{"name": "metrics", "containerPort": int(port)}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == port
        env = {e["name"]: e for e in container["env"]}
        assert env["DRAMATIQ_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "esd-secrets",
            "key": "DRAMATIQ_BROKER_URL",
        }
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
        assert env["ESD_EVENTS_QUEUE"]["value"] == "esd-events"
        assert "replicas" not in deployment["spec"]  # KEDA's HPA owns the count
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        # the scaler: the endpoint's Redis list, the console's target, the endpoint's bounds
        spec = scaled["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == expected_bounds[name]
        assert (spec["minReplicaCount"] == 0) == (endpoint.autoscaling and endpoint.min_instance_number == 0)
        trigger = spec["triggers"]
        assert len(trigger) == 1 and trigger[0]["type"] == "redis"
        assert trigger[0]["metadata"] == {
            "address": "redis.esd.svc:6380",
            "listName": f"dramatiq:{name}",
            "listLength": "3",
            "activationListLength": "0",
            "databaseIndex": "3",
            "enableTLS": "false",
            "passwordFromEnv": "REDIS_PASSWORD",
        }
        # the console's hint and the cluster agree for every backlog
        for backlog in range(0, 40):
            assert keda_desired(scaled, backlog) == services.scaling_hint(endpoint, backlog), (name, backlog)
        # busy workers look idle to the trigger: scale-in waits out a window, and SIGTERM has the longest job's time
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == {"scaleDown": {"stabilizationWindowSeconds": 300}}
        assert pod["spec"]["terminationGracePeriodSeconds"] == settings.ESD_ASYNC_TIMEOUT
    # trainings: a ScaledJob, no Deployment an autoscaler could scale in while it trains
    trainer = [d for d in docs if d["metadata"]["name"] == "esd-trainer"]
    assert [d["kind"] for d in trainer] == ["ScaledJob"]
    check_scaled_job(trainer[0], namespace="gpu", image="registry.example/esd-gpu:1.2", most=1, redis=True)


def check_scaled_job(
    job: dict,
    *,
    namespace: str,
    image: str,
    most: int,
    redis: bool,
    polling: int = 15,
    idle: int = 120,
    kept: int = 3,
    failed_kept: int = 5,
    grace: int = 3600,
    node_selector: dict | None = None,
) -> None:
    """Every field of the trainer's ScaledJob against the options it was rendered with."""
    assert job["apiVersion"] == "keda.sh/v1alpha1" and job["kind"] == "ScaledJob"
    assert job["metadata"]["name"] == "esd-trainer" and job["metadata"]["namespace"] == namespace
    assert job["metadata"]["labels"]["esd-server/queue"] == "esd-training"
    spec = job["spec"]
    assert set(spec) == {
        "jobTargetRef",
        "pollingInterval",
        "successfulJobsHistoryLimit",
        "failedJobsHistoryLimit",
        "minReplicaCount",
        "maxReplicaCount",
        "rollout",
        "scalingStrategy",
        "triggers",
    }
    assert spec["pollingInterval"] == polling
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (kept, failed_kept)
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, most)
    assert spec["rollout"] == {"strategy": "gradual"}  # re-applying never deletes a Job that is training
    assert spec["scalingStrategy"] == {"strategy": "accurate"}  # the queue length excludes the trainings in hand
    target = spec["jobTargetRef"]
    assert (target["parallelism"], target["completions"], target["backoffLimit"]) == (1, 1, 0)
    assert "activeDeadlineSeconds" not in target  # a training may run for hours
    pod = target["template"]
    pod_spec = pod["spec"]
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["terminationGracePeriodSeconds"] == grace
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec.get("nodeSelector") == node_selector
    assert pod["metadata"]["labels"] == job["metadata"]["labels"]
    (container,) = pod_spec["containers"]
    assert container["image"] == image and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    assert args[:3] == ["trainer", "--queue", "esd-training"]
    assert "--once" in args and args[args.index("--idle-exit-seconds") + 1] == str(idle)
    assert args[args.index("--metrics-port") + 1] == pod["metadata"]["annotations"]["prometheus.io/port"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DRAMATIQ_BROKER_URL"]["valueFrom"]["secretKeyRef"]["key"] == "DRAMATIQ_BROKER_URL"
    (trigger,) = spec["triggers"]
    if redis:
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "dramatiq:esd-training"
        assert trigger["metadata"]["listLength"] == "1" and trigger["metadata"]["activationListLength"] == "0"
        assert trigger["metadata"]["passwordFromEnv"] == "REDIS_PASSWORD" and "REDIS_PASSWORD" in env
    else:
        assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == "esd-training"
        assert trigger["metadata"]["value"] == "1" and trigger["metadata"]["hostFromEnv"] == "DRAMATIQ_BROKER_URL"


@pytest.mark.django_db
def test_the_trainer_scaled_job_follows_every_option(rows):
    docs = render(
        "--broker-url",
        RABBIT,
        "--namespace",
        "train",
        "--image",
        "img:2",
        "--max-trainers",
        "4",
        "--polling-seconds",
        "7",
        "--trainer-idle-seconds",
        "45",
        "--jobs-history",
        "1",
        "--failed-jobs-history",
        "9",
        "--grace-seconds",
        "900",
        "--scale-down-window-seconds",
        "60",
        "--node-selector",
        "gpu=a100",
    )
    (job,) = [d for d in docs if d["kind"] == "ScaledJob"]
    check_scaled_job(
        job,
        namespace="train",
        image="img:2",
        most=4,
        redis=False,
        polling=7,
        idle=45,
        kept=1,
        failed_kept=9,
        grace=900,
        node_selector={"gpu": "a100"},
    )
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):  # the inference workers took the same options
        assert scaled["spec"]["pollingInterval"] == 7
        assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
            "stabilizationWindowSeconds": 60
        }
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
    assert not [d for d in render("--broker-url", REDIS, "--max-trainers", "0") if d["kind"] == "ScaledJob"]


@pytest.mark.django_db
def test_rabbitmq_manifests_and_one_endpoint(rows):
    docs = render("--broker-url", RABBIT, "--endpoint", "esd-async-zero", "--node-selector", "gpu=a100")
    assert [d["kind"] for d in docs] == ["Deployment", "ScaledObject"]  # only that endpoint, no trainer
    deployment, scaled = docs
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "a100"}
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "DRAMATIQ_BROKER_URL" in env and "REDIS_PASSWORD" not in env
    assert scaled["spec"]["triggers"] == [
        {
            "type": "rabbitmq",
            "metadata": {
                "protocol": "amqp",
                "mode": "QueueLength",
                "queueName": "esd-async-zero",
                "value": "3",
                "activationValue": "0",
                "hostFromEnv": "DRAMATIQ_BROKER_URL",  # KEDA reads it from the worker's env (the Secret)
            },
        }
    ]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 4)


@pytest.mark.django_db
def test_names_that_are_not_dns_labels_get_distinct_ones(rows, settings):
    Endpoint.objects.create(
        name="esd-async-caps", endpoint_type="Async", backend="self-hosted", instance_type="x", creator="x"
    )
    objects = by_endpoint(render("--broker-url", REDIS))
    upper = objects["esd-async-Caps"]["Deployment"]["metadata"]["name"]
    lower = objects["esd-async-caps"]["Deployment"]["metadata"]["name"]
    assert lower == "esd-async-caps" and upper.startswith("esd-async-caps-") and upper != lower
    assert objects["esd-async-Caps"]["ScaledObject"]["spec"]["triggers"][0]["metadata"]["listName"] == (
        "dramatiq:esd-async-Caps"  # the queue keeps its exact name
    )


@pytest.mark.django_db
def test_refusals_name_what_is_wrong(rows):
    with pytest.raises(CommandError, match="redis:// or amqp://"):
        render("--broker-url", "")
    with pytest.raises(CommandError, match="no live self-hosted endpoint named esd-async-cloud, esd-async-nope"):
        render("--broker-url", REDIS, "--endpoint", "esd-async-nope", "--endpoint", "esd-async-cloud")
    with pytest.raises(CommandError, match="KEY=VALUE"):
        render("--broker-url", REDIS, "--node-selector", "novalue")
    with pytest.raises(CommandError, match="--polling-seconds must be at least 1, got 0"):
        render("--broker-url", REDIS, "--polling-seconds", "0")
    with pytest.raises(CommandError, match="--grace-seconds must be at least 0, got -1"):
        render("--broker-url", REDIS, "--grace-seconds", "-1")
    Endpoint.objects.filter(name="esd-async-zero").update(max_instance_number=0)
    with pytest.raises(CommandError, match="esd-async-zero may run at most 0 workers"):
        render("--broker-url", REDIS)


def test_the_trigger_names_the_list_dramatiq_really_uses():
    """Against a real Redis: a message sent for a queue waits in exactly the list the trigger names."""
    url = os.environ.get("DRAMATIQ_BROKER_URL", "")
    if not url.startswith("redis://"):
        pytest.skip("needs DRAMATIQ_BROKER_URL=redis://... (CI's scaled-out pass)")
    from dramatiq.brokers.redis import RedisBroker

    from apps.endpoints.k8s import redis_list_name

    broker = RedisBroker(url=url, middleware=[])  # as gpu_runtime.worker.make_broker builds it
    queue = f"esd-async-k8s-{uuid.uuid4().hex[:6]}"
    broker.declare_queue(queue)
    try:
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="run_inference", args=(), kwargs={}, options={}))
        assert broker.client.llen(redis_list_name(queue)) == 1
    finally:
        broker.flush(queue)


def test_the_trigger_names_the_queue_rabbitmq_really_holds():
    """Against a real RabbitMQ: the queue the trigger names is where the message waits (KEDA's amqp protocol reads
    the same count with a passive declare)."""
    url = os.environ.get("RABBITMQ_URL", "")
    if not url:
        pytest.skip("needs RABBITMQ_URL (CI)")
    import pika
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=url, middleware=[])
    queue = f"esd-async-k8s-{uuid.uuid4().hex[:6]}"
    broker.declare_queue(queue)
    try:
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="run_inference", args=(), kwargs={}, options={}))
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            declared = connection.channel().queue_declare(queue, passive=True)
            assert declared.method.message_count == 1
        finally:
            connection.close()
    finally:
        broker.flush(queue)
        broker.close()
