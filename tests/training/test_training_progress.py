"""Progress with an ETA: the API's GET /trainings/{id} and the console's job page show the time left."""

import uuid

import pytest

from apps.training import training
from apps.training.models import TrainingJob
from apps.training.training import with_eta
from apps.training.views import duration_text
from tests.conftest import Api, make_key

pytestmark = pytest.mark.django_db


def test_eta_comes_from_the_step_rate_since_the_first_report():
    progress = with_eta({"step": 2, "steps": 12}, now=1000.0)
    assert "eta_seconds" not in progress and progress["rate_mark"] == [1000.0, 2]
    progress = with_eta({**progress, "step": 6}, now=1020.0)  # 4 steps in 20 s, 6 to go
    assert progress["eta_seconds"] == 30.0
    progress = with_eta({**progress, "step": 12}, now=1050.0)
    assert progress["eta_seconds"] == 0.0
    restarted = with_eta({**progress, "step": 1}, now=2000.0)  # a resumed or restarted run starts a new mark
    assert "eta_seconds" not in restarted and restarted["rate_mark"] == [2000.0, 1]
    assert with_eta({"epoch": 1}, now=1.0) == {"epoch": 1}
    assert duration_text(3725) == "1 h 02 min" and duration_text(240.5) == "4 min" and duration_text(30) == "30 s"


def test_the_api_and_the_console_show_progress_and_eta(api: Api, admin, client, monkeypatch):
    job = TrainingJob.objects.create(id=uuid.uuid4(), owner="admin", backend="self-hosted", status="Training")
    clock = iter([100.0, 160.0])
    monkeypatch.setattr(training, "with_eta", lambda progress, now: with_eta(progress, next(clock)))
    training.update_status(str(job.id), "Training", progress={"epoch": 1, "epochs": 2, "step": 1, "steps": 11})
    training.update_status(str(job.id), "Training", progress={"step": 5, "loss": 0.25})

    detail = api.get(f"trainings/{job.id}", key=make_key(admin)).body["data"]
    assert detail["progress"] == {"epoch": 1, "epochs": 2, "step": 5, "steps": 11, "loss": 0.25, "eta_seconds": 90.0}
    client.force_login(admin)
    assert "about 1 min left" in client.get(f"/training/{job.id}/").content.decode()
