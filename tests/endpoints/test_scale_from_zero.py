"""Scale from zero: an endpoint that autoscales from 0 serves with no worker (InService, count 0, no startup
timeout), its jobs wait in the queue and the job page says so, and a real gpu_runtime worker on the tiny model that
appears later runs them; the time from the first queued job to that worker's first heartbeat is recorded."""

import json
import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.endpoints import services
from apps.endpoints.models import ColdStart, Endpoint
from apps.inference.models import InferenceJob
from esd.tasks import queue_backlog
from tests.conftest import Api, make_user, wait_until


def zero_body(**changes):
    return {
        "endpoint_type": "Async",
        "instance_type": "cpu",
        "initial_instance_count": 1,
        "autoscaling_enabled": True,
        "min_instance_number": 0,
        "max_instance_number": 2,
        "assign_to_roles": ["IT Operator"],
        "creator": "admin",
        "endpoint_name": "zero",
        **changes,
    }


PARAMS = {"prompt": "a cat", "seed": 3, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


@pytest.mark.django_db
def test_an_endpoint_that_may_scale_to_zero_is_in_service_without_a_worker(api: Api, admin_key, settings):
    settings.ESD_SELF_HOSTED_STARTUP_TIMEOUT = 0
    name = api.post("endpoints", zero_body(), key=admin_key).body["data"]["endpoint_name"]
    Endpoint.objects.filter(name=name).update(start_time=timezone.now() - timedelta(hours=2))
    endpoint = services.reconcile(str(Endpoint.objects.get(name=name).pk))
    assert (endpoint.status, endpoint.current_instance_count, endpoint.error) == ("InService", 0, "")
    assert endpoint.end_time is not None
    listed = api.get("endpoints", key=admin_key).body["data"]["endpoints"][0]
    assert (listed["endpoint_status"], listed["current_instance_count"]) == ("InService", "0")
    # the startup timeout still fails an endpoint that must have a worker
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    must = api.post("endpoints", zero_body(endpoint_name="must", min_instance_number=1), key=admin_key)
    must_row = Endpoint.objects.get(name=must.body["data"]["endpoint_name"])
    Endpoint.objects.filter(pk=must_row.pk).update(start_time=timezone.now() - timedelta(hours=2))
    assert services.reconcile(str(must_row.pk)).status == "Failed"


@pytest.mark.django_db(transaction=True)
def test_jobs_queue_at_zero_and_run_when_a_worker_appears(api: Api, admin_key, admin, client, worker, gpu, registered):
    answer = api.post("endpoints", zero_body(), key=admin_key)
    assert answer.status == 202, answer.body
    name = answer.body["data"]["endpoint_name"]
    wait_until(lambda: Endpoint.objects.filter(name=name, status="InService", current_instance_count=0).exists())

    created = api.post(
        "inferences",
        {
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": ["tiny.safetensors"]},
            "payload_string": json.dumps(PARAMS),
        },
        key=admin_key,
    )
    assert created.status == 202, created.body
    job_id = created.body["data"]["inference"]["inference_id"]
    assert created.body["data"]["inference"]["endpoint_name"] == name

    # No worker: the job stays queued, the endpoint stays InService at 0, the cold-start clock runs.
    time.sleep(1.5)
    assert InferenceJob.objects.get(pk=job_id).status == "inprogress"
    assert queue_backlog(name) == 1
    endpoint = Endpoint.objects.get(name=name)
    assert (endpoint.status, endpoint.current_instance_count) == ("InService", 0)
    assert endpoint.waiting_since is not None
    client.force_login(admin)
    page = client.get(reverse("console:job", args=[job_id])).content.decode()
    assert "waiting for a worker" in page

    # The autoscaler's worker appears (the real runtime on the tiny model): it runs the queued job.
    gpu(name)
    wait_until(lambda: InferenceJob.objects.filter(pk=job_id, status__in=("succeed", "failed")).exists(), timeout=90)
    job = InferenceJob.objects.get(pk=job_id)
    assert job.status == "succeed", job.sagemaker_raw
    assert queue_backlog(name) == 0
    endpoint.refresh_from_db()
    assert (endpoint.status, endpoint.current_instance_count, endpoint.waiting_since) == ("InService", 1, None)

    cold = ColdStart.objects.get(endpoint_name=name)
    assert cold.seconds >= 1.5 and cold.queued_at < cold.started_at
    stats = services.cold_start_stats()[name]
    assert stats["count"] == 1 and stats["sum_seconds"] == stats["last_seconds"] == pytest.approx(cold.seconds)
    page = client.get(reverse("console:job-live", args=[job_id])).content.decode()
    assert "waiting for a worker" not in page
    scraped = client.get("/metrics").content.decode()  # exported for the operators' dashboards
    assert f'esd_endpoint_cold_start_seconds_count{{endpoint="{name}"}} 1.0' in scraped
    assert f'esd_endpoint_cold_start_last_seconds{{endpoint="{name}"}} {cold.seconds!r}' in scraped

    # Later heartbeats of the running worker are not cold starts.
    time.sleep(0.5)
    services.record_cold_start(name, cold.worker)
    assert ColdStart.objects.filter(endpoint_name=name).count() == 1


@pytest.mark.django_db
def test_the_sweep_starts_the_clock_for_jobs_queued_elsewhere(api: Api, admin_key, client):
    import dramatiq

    name = api.post("endpoints", zero_body(), key=admin_key).body["data"]["endpoint_name"]
    endpoint = Endpoint.objects.get(name=name)
    services.reconcile(str(endpoint.pk))
    assert Endpoint.objects.get(pk=endpoint.pk).waiting_since is None  # nothing queued: no clock
    dramatiq.get_broker().enqueue(
        dramatiq.Message(queue_name=name, actor_name="run_inference", args=("j", {}), kwargs={}, options={})
    )
    services.reconcile(str(endpoint.pk))
    assert Endpoint.objects.get(pk=endpoint.pk).waiting_since is not None
    assert services.record_cold_start(name, "host/0").seconds >= 0
    assert Endpoint.objects.get(pk=endpoint.pk).waiting_since is None
    # operators find the history in the admin
    client.force_login(make_user("ops", is_staff=True, is_superuser=True))
    page = client.get(reverse("admin:endpoints_coldstart_changelist"))
    assert page.status_code == 200 and "host/0" in page.content.decode()
