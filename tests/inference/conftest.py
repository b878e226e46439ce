"""An inference stack on one machine: live server with the local store, the control plane's worker, and a real
``gpu_runtime`` worker on the tiny model consuming the endpoint's queue through the configured broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.endpoints.models import Endpoint
from apps.models_registry.services import import_file
from tests.conftest import Api, wait_until


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    from gpu_runtime.tiny import build_tiny_pipeline, write_tiny_lora, write_tiny_model

    root = tmp_path_factory.mktemp("inference-models")
    return {
        "model": write_tiny_model(root / "tiny.safetensors"),
        "lora": _lora(write_tiny_lora, build_tiny_pipeline, root / "style.safetensors"),
    }


def _lora(write, build, path: Path) -> Path:
    write(build(seed=0), path, seed=3)
    return path


@pytest.fixture
def registered(tiny_models, local_store):
    """The tiny model and a LoRA as Active checkpoints everyone may use."""
    import_file(tiny_models["model"], checkpoint_type="Stable-diffusion", owners=[])
    import_file(tiny_models["lora"], checkpoint_type="Lora", owners=[])
    return tiny_models


def body(endpoint_type: str, name: str):
    return {
        "endpoint_type": endpoint_type,
        "instance_type": "cpu",
        "initial_instance_count": 1,
        "autoscaling_enabled": False,
        "assign_to_roles": ["IT Operator", "Designer"],
        "creator": "admin",
        "endpoint_name": name,
    }


@pytest.fixture
def gpu(settings, tmp_path):
    """Start gpu_runtime workers for endpoints (the same code a GPU host runs), stopped after the test."""
    pytest.importorskip("diffusers")
    import dramatiq

    from gpu_runtime.engine import Engine
    from gpu_runtime.worker import GpuWorker

    engine = Engine(tmp_path / "runtime", device="cpu")
    started = []

    def start(endpoint_name: str) -> GpuWorker:
        worker = GpuWorker(
            dramatiq.get_broker(),
            engine,
            endpoint_name,
            events_queue=settings.ESD_EVENTS_QUEUE,
            instance_type="cpu",
            poll_ms=20,
        )
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=60)


@pytest.fixture
def endpoints(api: Api, admin_key, settings, worker, gpu, registered):
    """An Async and a Real-time self-hosted endpoint, InService with a worker each."""
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    names = {}
    for endpoint_type, short in (("Async", "a1"), ("Real-time", "r1")):
        answer = api.post("endpoints", body(endpoint_type, short), key=admin_key)
        assert answer.status == 202, answer.body
        names[endpoint_type] = answer.body["data"]["endpoint_name"]
        gpu(names[endpoint_type])
    for name in names.values():
        wait_until(lambda n=name: Endpoint.objects.filter(name=n, status="InService").exists())
    return names
