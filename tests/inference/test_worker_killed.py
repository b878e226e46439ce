"""A GPU worker killed mid-job: the broker redelivers the message, another worker runs it, the job ends
``succeed`` exactly once. Needs Redis (the in-process broker has no redelivery across processes)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apps.endpoints.models import Endpoint
from apps.inference.models import InferenceJob
from tests.conftest import Api, endpoint_body, wait_until

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not os.environ.get("DRAMATIQ_BROKER_URL", "").startswith("redis"),
        reason="DRAMATIQ_BROKER_URL is not a Redis URL: redelivery needs a real broker (CI sets Redis)",
    ),
]
ROOT = Path(__file__).resolve().parents[2]
# ``python -m gpu_runtime`` with every denoising step taking at least 0.04 s (a pause in the engine's progress
# callback): the 150-step job runs for 6 s or more on any machine, so the test kills the worker mid-job
PACED_WORKER = """
import runpy, sys, time
sys.path.insert(0, {root!r})
from gpu_runtime.engine import Engine
original = Engine.run
def run(self, jobs, progress=None, stop=None):
    def slowed(step, steps):
        time.sleep(0.04)
        if progress is not None:
            progress(step, steps)
    return original(self, jobs, slowed, stop)
Engine.run = run
sys.argv = ["gpu_runtime", *sys.argv[1:]]
runpy.run_module("gpu_runtime", run_name="__main__", alter_sys=True)
"""


def test_killed_worker_job_is_redelivered_and_succeeds_once(
    api: Api, admin_key, worker, registered, settings, tmp_path
):
    from dramatiq.brokers.redis import RedisBroker

    from gpu_runtime.engine import Engine
    from gpu_runtime.worker import GpuWorker

    name = api.post("endpoints", endpoint_body("Async", "k1"), key=admin_key).body["data"]["endpoint_name"]
    launcher = tmp_path / "paced_worker.py"
    launcher.write_text(PACED_WORKER.format(root=str(ROOT)))
    first = subprocess.Popen(
        [
            sys.executable,
            str(launcher),
            "worker",
            "--endpoint",
            name,
            "--device",
            "cpu",
            "--broker",
            os.environ["DRAMATIQ_BROKER_URL"],
            "--events-queue",
            settings.ESD_EVENTS_QUEUE,
            "--models-dir",
            str(tmp_path / "first"),
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: Endpoint.objects.filter(name=name, status="InService").exists(), timeout=60)
        params = {"prompt": "a cat", "seed": 1, "steps": 150, "width": 64, "height": 64, "sampler_name": "Euler"}
        answer = api.post(
            "inferences",
            {
                "task_type": "txt2img",
                "inference_type": "Async",
                "models": {"Stable-diffusion": ["tiny.safetensors"]},
                "payload_string": json.dumps(params),
            },
            key=admin_key,
        )
        job_id = answer.body["data"]["inference"]["inference_id"]
        wait_until(lambda: InferenceJob.objects.filter(pk=job_id, progress_step__gt=0).exists(), timeout=90)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert InferenceJob.objects.get(pk=job_id).status == "inprogress"

    # A second worker whose broker requeues the dead worker's unacknowledged messages quickly.
    broker = RedisBroker(
        url=os.environ["DRAMATIQ_BROKER_URL"], middleware=[], heartbeat_timeout=2000, maintenance_chance=1_000_000
    )
    second = GpuWorker(
        broker, Engine(tmp_path / "second", device="cpu"), name, events_queue=settings.ESD_EVENTS_QUEUE, poll_ms=50
    )
    second.start()
    try:
        job = wait_until(
            lambda: InferenceJob.objects.filter(pk=job_id, status__in=["succeed", "failed"]).first(), timeout=120
        )
    finally:
        second.stop(timeout=60)
    assert job.status == "succeed", job.sagemaker_raw
    assert job.image_names == ["image_0.png"]
