"""Console training pages: the list and start form, a job's live page with its loss chart, delete, datasets."""

import html
import re
import tomllib
import uuid

import pytest

from apps.models_registry.models import Checkpoint
from apps.training import services
from apps.training.models import Dataset, TrainingJob
from apps.training.views import CHART_HEIGHT, CHART_WIDTH, loss_chart
from esd.storage import blob_store
from tests.conftest import make_role, make_user
from tests.models_registry.test_checkpoints import register

pytestmark = pytest.mark.django_db


@pytest.fixture
def ready(admin, disk_store):
    """A base model and an Enabled dataset, as ``tests/training/test_trainings_api.py::ready`` has them."""
    register("v1-5.safetensors", data=b"weights")
    register("other.safetensors", status="Disabled")
    dataset, _ = services.create_dataset(
        name="lego",
        creator="admin",
        owners=["IT Operator"],
        params={},
        prefix="10_technic",
        content=[
            {"filename": "1.png", "name": "1.png", "type": "image", "params": {}},
            {"filename": "1.txt", "name": "1.txt", "type": "text", "params": {}},
        ],
    )
    disk_store.put_bytes("dataset/lego/10_technic/1.png", b"png")
    disk_store.put_bytes("dataset/lego/10_technic/1.txt", b"a lego car")
    services.set_status(dataset, "Enabled")
    return dataset


def page(response) -> str:
    return html.unescape(response.content.decode())


def form_body(**changes):
    body = {
        "model": "v1-5.safetensors",
        "dataset": "lego",
        "output_name": "lego_lora",
        "fm_type": "sd_1_5",
        "max_train_epochs": "3",
        "save_every_n_epochs": "1",
        "network_dim": "8",
        "network_alpha": "4",
        "learning_rate": "0.0002",
        "resolution": "768",
        "train_batch_size": "2",
        "training_instance_type": "ml.g5.2xlarge",
    }
    body.update(changes)
    return body


def make_training(owner="admin", status="Training", **fields) -> TrainingJob:
    return TrainingJob.objects.create(
        id=uuid.uuid4(),
        owner=owner,
        backend="self-hosted",
        status=status,
        params={
            "training_type": "kohya",
            "training_params": {"model": "v1-5.safetensors", "dataset": "lego", "fm_type": "sd_1_5"},
            "config_params": {"saving_arguments": {"output_name": fields.pop("output_name", "lego_lora")}},
        },
        **fields,
    )


def test_trainings_page_lists_jobs_and_offers_the_form(client, admin, ready):
    job = make_training(progress={"epoch": 1, "epochs": 3, "step": 10, "steps": 40, "loss": 0.3})
    client.force_login(admin)
    response = client.get("/training/")
    assert response.status_code == 200
    text = page(response)
    assert 'id="training-form"' in text
    assert '<option value="v1-5.safetensors"' in text and '<option value="other.safetensors"' not in text
    assert '<option value="lego"' in text
    assert f'href="/training/{job.id}/"' in text and ">lego_lora<" in text
    assert "epoch 1 of 3, step 10 of 40" in text and "width: 25%" in text
    assert "status-Training" in text


def test_start_form_creates_a_training(client, admin, ready, django_capture_on_commit_callbacks):
    client.force_login(admin)
    with django_capture_on_commit_callbacks():
        response = client.post("/training/", form_body())
    job = TrainingJob.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/training/{job.id}/"
    assert job.status == "Starting" and job.owner == "admin"
    assert job.params["training_params"]["model"] == "v1-5.safetensors"
    assert job.params["training_params"]["dataset"] == "lego"
    config = tomllib.loads(blob_store().read_bytes(f"kohya/train/{job.id}/input/kohya_config_cloud.toml").decode())
    assert config["saving_arguments"]["output_name"] == "lego_lora"
    assert config["training_arguments"]["max_train_epochs"] == 3
    assert config["training_arguments"]["train_batch_size"] == 2
    assert config["additional_network_arguments"]["network_dim"] == 8
    assert config["additional_network_arguments"]["network_alpha"] == 4
    assert config["additional_network_arguments"]["unet_lr"] == 0.0002
    assert config["optimizer_arguments"]["learning_rate"] == 0.0002
    assert config["dataset_arguments"]["resolution"] == "768,768"
    assert Checkpoint.objects.get(pk=job.id).checkpoint_type == "Lora"
    assert "Training lego_lora started." in page(client.get(response["Location"]))


def test_empty_tuning_fields_keep_the_template(client, admin, ready, django_capture_on_commit_callbacks):
    client.force_login(admin)
    body = form_body(fm_type="sd_xl", network_dim="", network_alpha="", learning_rate="", resolution="")
    with django_capture_on_commit_callbacks():
        assert client.post("/training/", {**body, "train_batch_size": ""}).status_code == 302
    job = TrainingJob.objects.get()
    config = tomllib.loads(blob_store().read_bytes(f"kohya/train/{job.id}/input/kohya_config_cloud_xl.toml").decode())
    assert config["dataset_arguments"]["resolution"] == "1024,1024"
    assert config["additional_network_arguments"]["network_dim"] == 32


def test_start_form_shows_the_services_messages(client, admin, ready):
    register("lego_lora.safetensors", checkpoint_type="Lora")
    client.force_login(admin)
    response = client.post("/training/", form_body())
    assert response.status_code == 200
    text = page(response)
    assert "lego_lora.safetensors already exists, please use another or rename/delete exists" in text
    assert not TrainingJob.objects.exists()

    response = client.post("/training/", form_body(output_name="a/b"))
    assert "filename a/b is not allowed" in page(response)
    response = client.post("/training/", form_body(model="other.safetensors", max_train_epochs="0"))
    text = page(response)
    assert "Base model: Select a valid choice." in text and "Epochs:" in text
    assert not TrainingJob.objects.exists()


def test_job_page_draws_the_loss_chart(client, admin, ready):
    job = make_training(
        progress={"epoch": 2, "epochs": 3, "step": 30, "steps": 40, "loss": 0.42},
        losses=[[10, 0.9], [20, 0.5], [30, 0.42]],
        log=["network_module kept", "xformers ignored"],
    )
    client.force_login(admin)
    for url in (f"/training/{job.id}/", f"/training/{job.id}/live"):
        response = client.get(url)
        assert response.status_code == 200
        text = page(response)
        assert 'id="training-status"' in text and ">Training<" in text
        assert "epoch 2 of 3, step 30 of 40, loss 0.4200" in text and "width: 75%" in text
        assert f'hx-get="/training/{job.id}/live"' in text and 'hx-trigger="every 2s"' in text
        points = re.search(r'<polyline [^>]*points="([^"]+)"', text).group(1).split()
        assert len(points) == 3
        assert "network_module kept" in text and "xformers ignored" in text
    text = page(client.get(f"/training/{job.id}/"))
    assert '<svg id="loss-chart" class="chart"' in text
    assert f'href="/training/{job.id}/delete/"' in text
    assert "<script" not in text.split("<main>")[1]  # the chart is drawn server-side


def test_completed_job_links_its_output_files(client, admin, ready):
    job = make_training(
        status="Completed", output_files=["lego_lora.safetensors", "lego_lora-000001.safetensors"], losses=[[1, 0.5]]
    )
    client.force_login(admin)
    text = page(client.get(f"/training/{job.id}/"))
    assert "hx-trigger" not in text
    links = re.findall(r'<a href="([^"]+)" download="([^"]+)"', text)
    assert [name for _, name in links] == ["lego_lora.safetensors", "lego_lora-000001.safetensors"]
    assert f"/blob/kohya/train/{job.id}/output/lego_lora.safetensors?" in links[0][0]
    assert "<circle" in text  # a single point still shows


def test_failed_job_shows_its_reason(client, admin, ready):
    job = make_training(status="Failed", reason="CUDA out of memory")
    client.force_login(admin)
    text = page(client.get(f"/training/{job.id}/live"))
    assert "CUDA out of memory" in text and "hx-trigger" not in text and "No loss reported yet." in text


def test_delete_asks_then_deletes(client, admin, ready, django_capture_on_commit_callbacks):
    client.force_login(admin)
    with django_capture_on_commit_callbacks():
        client.post("/training/", form_body())
    job = TrainingJob.objects.get()
    response = client.get(f"/training/{job.id}/delete/")
    assert response.status_code == 200
    text = page(response)
    assert "Delete training lego_lora?" in text and 'id="training-delete-confirm"' in text
    assert TrainingJob.objects.filter(pk=job.id).exists()
    response = client.post(f"/training/{job.id}/delete/")
    assert response.status_code == 302 and response["Location"] == "/training/"
    assert not TrainingJob.objects.filter(pk=job.id).exists()
    assert not Checkpoint.objects.filter(pk=job.id).exists()  # never completed: its LoRA row goes too
    assert "Training lego_lora deleted." in page(client.get("/training/"))


def test_datasets_page(client, admin, ready):
    services.create_dataset(name="empty", creator="admin", owners=["IT Operator"], params={}, prefix="", content=[])
    client.force_login(admin)
    response = client.get("/datasets/")
    assert response.status_code == 200
    text = page(response)
    assert 'id="dataset-form"' in text and 'data-api="/api/"' in text and 'id="dataset-files"' in text
    assert "/static/console/dataset.js" in text
    row = re.search(r'<tr data-dataset="lego">(.*?)</tr>', text, re.S).group(1)
    assert "10_technic" in row and "<td>2</td>" in row and "status-Enabled" in row
    row = re.search(r'<tr data-dataset="empty">(.*?)</tr>', text, re.S).group(1)
    assert "<td>0</td>" in row and "Initialed" in row
    assert "https://" not in text and "http://" not in text


def test_visibility_and_permissions(client, ready):
    make_role("Trainers", ["train:all"])
    make_role("Painters", ["inference:all"])
    trainer = make_user("tess", roles=("Trainers",))
    painter = make_user("pat", roles=("Painters",))
    others = make_training(owner="admin")
    own = make_training(owner="tess", output_name="tess_lora")
    client.force_login(painter)
    for url in ("/training/", f"/training/{own.id}/", f"/training/{own.id}/live", "/datasets/"):
        assert client.get(url).status_code == 403, url
    assert client.post(f"/training/{own.id}/delete/").status_code == 403
    assert TrainingJob.objects.filter(pk=own.id).exists()
    client.force_login(trainer)
    text = page(client.get("/training/"))
    assert "tess_lora" in text and str(others.id) not in text
    assert '<option value="lego"' not in text  # the dataset belongs to IT Operator
    assert client.get(f"/training/{others.id}/").status_code == 404
    assert client.post(f"/training/{others.id}/delete/").status_code == 404
    assert client.get(f"/training/{own.id}/").status_code == 200
    assert 'data-dataset="lego"' not in page(client.get("/datasets/"))
    assert Dataset.objects.filter(name="lego").exists()


def test_loss_chart_fits_the_box():
    chart = loss_chart([[5, 2.0], [1, 1.0], [3, float("nan")], [9, 0.5], ["x", 1], [7]])
    points = [tuple(map(float, p.split(","))) for p in chart["points"].split()]
    assert len(points) == 3 and chart["count"] == 3
    assert all(0 <= x <= CHART_WIDTH and 0 <= y <= CHART_HEIGHT for x, y in points)
    assert [x for x, _ in points] == sorted(x for x, _ in points)
    assert points[1][1] < points[2][1] < points[0][1] or points[1][1] == min(y for _, y in points)
    assert (chart["first_step"], chart["last_step"], chart["high"], chart["low"]) == ("1", "9", "2", "0.5")
    assert loss_chart([]) is None
    flat = loss_chart([[1, 0.3], [2, 0.3]])
    assert len(flat["points"].split()) == 2
