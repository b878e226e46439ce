"""Role quotas: GPU-seconds per day and concurrent jobs per member, the most generous of a user's roles; a job at
the limit is refused at creation by the real API with 400 ``quota exceeded: …`` and nothing is created; just below
it is accepted. Operators set quotas in the admin and on the console's role page and see their use on the
dashboard."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.models import UNLIMITED, Quota, Role, RoleQuota, quota_of
from apps.accounts.permissions import ADMIN_PERMISSIONS
from apps.endpoints import usage
from apps.inference.models import InferenceJob
from apps.models_registry.models import Checkpoint
from apps.training.models import TrainingJob
from esd.storage import blob_store
from tests.conftest import Api, make_key, make_role, make_user
from tests.inference.test_inference_api import create as create_inference
from tests.inference.test_inference_api import endpoint
from tests.models_registry.test_checkpoints import register
from tests.training.test_trainings_api import native

pytestmark = pytest.mark.django_db


def limit(role: str, gpu: int | None = None, concurrent: int | None = None) -> RoleQuota:
    return RoleQuota.objects.create(
        role=Role.objects.get(name=role), gpu_seconds_per_day=gpu, concurrent_jobs=concurrent
    )


# --- whose limit -----------------------------------------------------------------------------------------------------


def test_a_users_limit_is_the_most_generous_of_their_roles():
    for name in ("small", "big", "free"):
        make_role(name, ["inference:all"])
    limit("small", gpu=100, concurrent=2)
    limit("big", gpu=300, concurrent=None)  # unlimited jobs at once
    assert quota_of(make_user("s", roles=("small",))) == Quota(100, "small", 2, "small")
    assert quota_of(make_user("sb", roles=("small", "big"))) == Quota(300, "big", None, None)
    assert quota_of(make_user("sf", roles=("small", "free"))) == UNLIMITED  # "free" has no quota row: no limit
    assert quota_of(make_user("nobody")) == UNLIMITED
    limit("free", gpu=100, concurrent=5)
    assert quota_of(make_user("sf2", roles=("small", "free"))) == Quota(100, "free", 5, "free")  # tie: first name


# --- refusals through the API ----------------------------------------------------------------------------------------


@pytest.fixture
def member(api: Api, admin_key, disk_store):
    """A member of role ``team`` (which may do everything an operator may) with a key, a model, an endpoint and a
    dataset to run inference and trainings with."""
    make_role("team", list(ADMIN_PERMISSIONS))
    user = make_user("member", roles=("team",))
    register("tiny.safetensors")
    register("v1-5.safetensors", data=b"weights")
    endpoint("esd-async-a")
    dataset = {
        "dataset_name": "lego",
        "prefix": "10_technic",
        "params": {},
        "creator": "admin",
        "content": [{"filename": "1.png", "name": "1.png", "type": "image", "params": {}}],
    }
    assert api.post("datasets", dataset, key=admin_key).status == 201
    disk_store.put_bytes("dataset/lego/10_technic/1.png", b"png")
    return user, make_key(user)


def create_training(api: Api, key: str, name: str):
    config = {
        "saving_arguments": {"output_name": name, "save_every_n_epochs": 1},
        "training_arguments": {"max_train_epochs": 1},
    }
    return api.post("trainings", native(config_params=config), key=key)


def refused(answer, message: str) -> None:
    assert answer.status == 400, answer.body
    assert answer.body == {"statusCode": 400, "message": message}


def counts() -> tuple[int, int, int, int]:
    stored = len(list(blob_store().list("kohya/train/")))
    return InferenceJob.objects.count(), TrainingJob.objects.count(), Checkpoint.objects.count(), stored


def running_training(owner: str) -> TrainingJob:
    params = {"config_params": {"saving_arguments": {"output_name": f"lora_{owner}"}}}
    return TrainingJob.objects.create(
        id=uuid.uuid4(), owner=owner, backend="self-hosted", status="Training", params=params
    )


def test_concurrent_jobs_refused_at_the_limit_accepted_below(api: Api, member):
    _, key = member
    limit("team", concurrent=3)
    first = create_inference(api, key)  # a created job is unfinished: it counts until it succeeds or fails
    assert first.status == 201, first.body
    assert create_training(api, key, "lora_one").status == 201  # 2 of 3: accepted
    assert create_inference(api, key).status == 201  # 3 of 3 now

    before = counts()
    message = "quota exceeded: 3 of 3 concurrent jobs running (role team)"
    refused(create_inference(api, key), message)
    refused(create_training(api, key, "lora_two"), message)
    assert counts() == before  # nothing was created: no job, no training, no output checkpoint, no files

    InferenceJob.objects.filter(pk=first.body["data"]["inference"]["id"]).update(status="succeed")
    assert create_training(api, key, "lora_two").status == 201  # a job ended: 2 of 3 again, accepted
    refused(create_inference(api, key), message)
    # other users are not limited by the team's quota
    assert create_inference(api, make_key(make_user("other", roles=("IT Operator",)))).status == 201


def test_gpu_seconds_per_day_refused_at_the_limit_accepted_below(api: Api, member):
    user, key = member
    limit("team", gpu=3600)
    midnight = usage.day_start(usage.today())
    InferenceJob.objects.create(
        task_type="txt2img",
        inference_type="Async",
        owner="member",
        status="succeed",
        complete_time=midnight,
        gpu_seconds=3000.0,
    )
    done = TrainingJob.objects.create(
        id=uuid.uuid4(),
        owner="member",
        backend="self-hosted",
        status="Completed",
        params={},
        finished=midnight,
        gpu_seconds=599.9,
    )
    TrainingJob.objects.create(  # yesterday's GPU time is not today's
        id=uuid.uuid4(),
        owner="member",
        backend="self-hosted",
        status="Completed",
        params={},
        finished=midnight - timedelta(seconds=1),
        gpu_seconds=10_000.0,
    )
    assert create_inference(api, key).status == 201  # 3599.9 of 3600: below, accepted
    assert create_training(api, key, "lora_below").status == 201

    TrainingJob.objects.filter(pk=done.pk).update(gpu_seconds=600.0)  # exactly at the limit
    before = counts()
    message = "quota exceeded: 3600.0 of 3600 GPU-seconds used today (role team)"
    refused(create_inference(api, key), message)
    refused(create_training(api, key, "lora_at"), message)
    assert counts() == before

    # a second role with a bigger budget lifts the limit (the most generous role wins)
    make_role("power", ["inference:all"])
    limit("power", gpu=7200)
    user.groups.add(Role.objects.get(name="power"))
    assert create_inference(api, key).status == 201


def test_quota_check_costs_the_same_whatever_the_jobs(member):
    user, _ = member
    limit("team", gpu=10**6, concurrent=10**6)
    with CaptureQueriesContext(connection) as few:
        usage.check_quota(user)
    for _ in range(30):
        running_training("member")
        InferenceJob.objects.create(task_type="txt2img", inference_type="Async", owner="member", gpu_seconds=1.0)
    with CaptureQueriesContext(connection) as many:
        usage.check_quota(user)
    assert len(few) == len(many)


# --- where operators set and see quotas ------------------------------------------------------------------------------


def test_role_page_sets_the_quota_for_role_all_only(admin, client):
    make_role("team", ["inference:all"])
    client.force_login(admin)
    page = client.get("/roles/team/").content.decode()
    assert 'id="role-quota-form"' in page and "unlimited" in page
    answer = client.post("/roles/team/", {"action": "quota", "gpu_seconds_per_day": "3600", "concurrent_jobs": "2"})
    assert answer.status_code == 302
    quota = RoleQuota.objects.get(role__name="team")
    assert (quota.gpu_seconds_per_day, quota.concurrent_jobs) == (3600, 2)
    assert "3600 GPU-seconds per day, 2 concurrent jobs per member" in client.get("/roles/team/").content.decode()
    client.post("/roles/team/", {"action": "quota", "gpu_seconds_per_day": "", "concurrent_jobs": ""})
    assert not RoleQuota.objects.filter(role__name="team").exists()  # both empty: unlimited, no row
    client.post("/roles/team/", {"action": "quota", "gpu_seconds_per_day": "-1", "concurrent_jobs": ""})
    assert not RoleQuota.objects.filter(role__name="team").exists()

    make_role("role-editors", ["role:list", "role:create"], creator="admin")
    editor = make_user("editor", roles=("role-editors",), password="editor-password-1")
    make_role("mine", ["inference:list"], creator="editor")
    client.force_login(editor)
    assert 'id="role-quota-form"' not in client.get("/roles/mine/").content.decode()
    answer = client.post("/roles/mine/", {"action": "quota", "gpu_seconds_per_day": "99999"})
    assert answer.status_code == 403 and not RoleQuota.objects.exists()


def test_admin_edits_the_quota_inline_on_the_role(admin, client):
    make_role("team", ["inference:all"])
    role = Role.objects.get(name="team")
    admin.is_staff = True  # an IT Operator with admin access (no Django superuser: ESD permissions decide)
    admin.save()
    client.force_login(admin)
    url = f"/admin/accounts/role/{role.pk}/change/"
    page = client.get(url)
    assert page.status_code == 200 and b"quota-0-gpu_seconds_per_day" in page.content
    form = {
        "esd_permissions": ["inference:all"],
        "quota-TOTAL_FORMS": "1",
        "quota-INITIAL_FORMS": "0",
        "quota-MIN_NUM_FORMS": "0",
        "quota-MAX_NUM_FORMS": "1",
        "quota-0-role": str(role.pk),
        "quota-0-gpu_seconds_per_day": "1800",
        "quota-0-concurrent_jobs": "",
    }
    answer = client.post(url, form)
    assert answer.status_code == 302, answer.content.decode()[:3000]
    quota = RoleQuota.objects.get(role=role)
    assert (quota.gpu_seconds_per_day, quota.concurrent_jobs) == (1800, None)
    assert set(role.permissions.values_list("codename", flat=True)) == {"inference:all"}


def test_dashboard_lists_users_near_or_at_their_limits(admin, client):
    make_role("team", ["inference:all"])
    limit("team", gpu=1000, concurrent=2)
    now = usage.day_start(usage.today()) + timedelta(seconds=1)
    for name, seconds, running in (("full", 1000.0, 0), ("near", 850.0, 0), ("busy", 0.0, 2), ("idle", 10.0, 0)):
        make_user(name, roles=("team",))
        InferenceJob.objects.create(
            task_type="txt2img",
            inference_type="Async",
            owner=name,
            status="succeed",
            complete_time=now,
            gpu_seconds=seconds,
        )
        for _ in range(running):
            running_training(name)
    client.force_login(admin)
    with CaptureQueriesContext(connection) as few:
        html = client.get("/dashboard/live").content.decode()
    assert 'id="quota-use"' in html
    assert '<tr class="at-limit"><td>full</td>' in html and "1000.0 / 1000" in html
    assert '<tr class="at-limit"><td>busy</td>' in html and "2 / 2" in html
    assert '<tr class="near-limit"><td>near</td>' in html and "850.0 / 1000" in html
    assert "<td>idle</td>" not in html
    for n in range(20):
        make_user(f"more{n}", roles=("team",))
        running_training(f"more{n}")
    with CaptureQueriesContext(connection) as many:
        client.get("/dashboard/live")
    assert len(few) == len(many)  # the quota card costs the same whatever the number of users

    outsider = make_user("viewer", roles=("team",), password="viewer-password-1")
    client.force_login(outsider)
    assert 'id="quota-use"' not in client.get("/dashboard/live").content.decode()  # operators (user:all) only
