"""Self-hosted endpoints: worker heartbeats through the real broker bring them up; silence and timeouts are seen."""

from datetime import timedelta
from io import StringIO

import dramatiq
import pytest
from django.core.management import call_command
from django.utils import timezone

from apps.endpoints import services
from apps.endpoints.models import Endpoint, Worker
from apps.endpoints.tasks import sweep_endpoints
from esd.tasks import queue_backlog, runtime_event
from tests.conftest import Api, wait_until


def body(**changes):
    return {
        "endpoint_type": "Async",
        "instance_type": "rtx-4090",
        "initial_instance_count": 1,
        "autoscaling_enabled": False,
        "assign_to_roles": ["byoc"],
        "creator": "admin",
        **changes,
    }


def heartbeat(endpoint: str, worker: str) -> None:
    """What a gpu_runtime worker sends every 15 s: a message to the events queue, through the broker."""
    runtime_event.send({"kind": "heartbeat", "endpoint": endpoint, "worker": worker, "instance_type": "rtx-4090"})


@pytest.mark.django_db(transaction=True)
def test_heartbeats_bring_an_endpoint_in_service_and_count_workers(api: Api, admin_key, worker, settings):
    name = api.post("endpoints", body(endpoint_name="gpu"), key=admin_key).body["data"]["endpoint_name"]
    heartbeat(name, "host-a/0")
    endpoint = wait_until(lambda: Endpoint.objects.filter(name=name, status="InService").first())
    assert endpoint.current_instance_count == 1 and endpoint.end_time is not None
    heartbeat(name, "host-b/0")
    wait_until(lambda: Endpoint.objects.filter(name=name, current_instance_count=2).exists())
    listed = api.get("endpoints", key=admin_key).body["data"]["endpoints"][0]
    assert (listed["endpoint_status"], listed["current_instance_count"]) == ("InService", "2")

    # Silence past the TTL: the count drops, the endpoint stays InService (jobs wait in its queue).
    Worker.objects.filter(worker="host-b/0").update(last_seen=timezone.now() - timedelta(seconds=60))
    sweep_endpoints()
    endpoint.refresh_from_db()
    assert (endpoint.status, endpoint.current_instance_count) == ("InService", 1)
    Worker.objects.update(last_seen=timezone.now() - timedelta(seconds=60))
    sweep_endpoints()
    endpoint.refresh_from_db()
    assert (endpoint.status, endpoint.current_instance_count) == ("InService", 0)


@pytest.mark.django_db(transaction=True)
def test_heartbeat_for_an_unknown_endpoint_or_malformed_is_harmless(worker):
    runtime_event.send({"kind": "heartbeat", "endpoint": "esd-async-nope", "worker": "w"})
    runtime_event.send({"kind": "heartbeat"})
    runtime_event.send({"kind": "mystery"})
    wait_until(lambda: Worker.objects.filter(endpoint_name="esd-async-nope").exists())


@pytest.mark.django_db
def test_startup_timeout_fails_the_endpoint(api: Api, admin_key, settings):
    name = api.post("endpoints", body(endpoint_name="late"), key=admin_key).body["data"]["endpoint_name"]
    endpoint = Endpoint.objects.get(name=name)
    services.reconcile(str(endpoint.pk))
    endpoint.refresh_from_db()
    assert endpoint.status == "Creating"
    settings.ESD_SELF_HOSTED_STARTUP_TIMEOUT = 0
    Endpoint.objects.filter(pk=endpoint.pk).update(start_time=timezone.now() - timedelta(seconds=1))
    services.reconcile(str(endpoint.pk))
    endpoint.refresh_from_db()
    assert endpoint.status == "Failed"
    assert endpoint.error == "no worker sent a heartbeat within 0 s of creation"
    assert api.get("endpoints", key=admin_key).body["data"]["endpoints"][0]["error"] == endpoint.error
    # a late worker still brings it up (contract §10.2: Failed self-hosted + heartbeat -> InService)
    Worker.objects.create(endpoint_name=name, worker="w", last_seen=timezone.now())
    services.reconcile(str(endpoint.pk))
    endpoint.refresh_from_db()
    assert (endpoint.status, endpoint.error) == ("InService", "")


@pytest.mark.django_db
def test_scaling_hint_and_operator_commands(api: Api, admin_key, settings):
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    api.post("endpoints", body(endpoint_name="fixed", initial_instance_count=2), key=admin_key)
    api.post(
        "endpoints",
        body(endpoint_name="auto", autoscaling_enabled=True, min_instance_number=1, max_instance_number=4),
        key=admin_key,
    )
    auto = Endpoint.objects.get(name="esd-async-auto")
    assert services.scaling_hint(Endpoint.objects.get(name="esd-async-fixed"), backlog=100) == 2
    assert [services.scaling_hint(auto, backlog=n) for n in (0, 1, 4, 7, 100)] == [1, 1, 2, 3, 4]

    broker = dramatiq.get_broker()
    for i in range(7):
        broker.enqueue(
            dramatiq.Message(
                queue_name="esd-async-auto", actor_name="run_inference", args=(str(i),), kwargs={}, options={}
            )
        )
    assert queue_backlog("esd-async-auto") == 7
    out = StringIO()
    call_command("endpoint_status", "esd-async-auto", "--desired-only", stdout=out)
    assert out.getvalue().strip() == "esd-async-auto 3"
    table = StringIO()
    call_command("refresh_endpoints", stdout=table)
    lines = table.getvalue().splitlines()
    assert lines[0].split()[:7] == ["name", "backend", "type", "status", "instances", "backlog", "desired"]
    assert lines[1].split()[:7] == ["esd-async-auto", "self-hosted", "Async", "Creating", "0", "7", "3"]
    # deleting the endpoint purges its queue
    api.delete("endpoints", {"endpoint_name_list": ["esd-async-auto"]}, key=admin_key)
    assert queue_backlog("esd-async-auto") == 0


@pytest.mark.django_db(transaction=True)
def test_periodic_sweep_runs_through_the_broker(api: Api, admin_key, worker, settings):
    from esd.tasks import start_periodic

    settings.ESD_WORKER_HEARTBEAT_TTL = 1
    name = api.post("endpoints", body(endpoint_name="swept"), key=admin_key).body["data"]["endpoint_name"]
    Worker.objects.create(endpoint_name=name, worker="w", last_seen=timezone.now())
    assert any("sweep_endpoints" in n for n in start_periodic())

    def heartbeat_and_look() -> bool:  # a live worker keeps beating, however late the first sweep runs
        Worker.objects.filter(worker="w").update(last_seen=timezone.now())
        return Endpoint.objects.filter(name=name, status="InService").exists()

    wait_until(heartbeat_and_look, timeout=15)
