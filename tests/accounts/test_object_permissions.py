"""Object permissions (django-guardian grants derived from owner names) answer exactly what the API shows.

The property test builds random worlds (users, roles some of them created, owner lists naming roles, users, `*`,
nobody, or roles that do not exist yet) and checks, for every user and object, that ``user.has_perm(view)``
equals both the contract's §4.2 rule written out here from its table and what the API's list routes return.
"""

from __future__ import annotations

import re
import uuid

import pytest
from django.core.management import call_command
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.accounts.grants import sync_all
from apps.accounts.models import Role, User, permissions_of
from apps.endpoints.models import Endpoint, EndpointOwner, EndpointUserObjectPermission
from apps.inference.models import InferenceJob
from apps.models_registry.choices import CheckpointStatus
from apps.models_registry.models import Checkpoint, CheckpointGroupObjectPermission, CheckpointOwner
from apps.models_registry.services import new_checkpoint
from apps.training.models import Dataset, DatasetOwner, TrainingJob
from esd.owners import save_owners
from tests.conftest import Api, make_key, make_role, make_user

pytestmark = pytest.mark.django_db

PERMISSION_POOL = [
    "user:all",
    "checkpoint:all",
    "checkpoint:list",
    "sagemaker_endpoint:all",
    "sagemaker_endpoint:list",
    "inference:all",
    "inference:list",
    "train:all",
]
USERS = ["u0", "u1", "u2", "u3"]
ROLES = ["r0", "r1", "r2"]
GHOST = "r-not-yet"  # an owner name with no role behind it
NAMES = [*USERS, *ROLES, GHOST, "*"]


def checkpoint(owners, creator: str) -> Checkpoint:
    row = new_checkpoint("Stable-diffusion", creator, {}, status=CheckpointStatus.ACTIVE)
    row.save()
    save_owners(CheckpointOwner, row, owners)
    return row


def endpoint(owners, creator: str, index: int) -> Endpoint:
    row = Endpoint.objects.create(
        name=f"esd-async-p{index}", endpoint_type="Async", backend="self-hosted", status="InService",
        instance_type="cpu", creator=creator,
    )  # fmt: skip
    save_owners(EndpointOwner, row, owners)
    return row


def dataset(owners, creator: str, index: int) -> Dataset:
    row = Dataset.objects.create(name=f"set{index}", status="Enabled", creator=creator)
    save_owners(DatasetOwner, row, owners)
    return row


def training(owner: str) -> TrainingJob:
    return TrainingJob.objects.create(id=uuid.uuid4(), owner=owner, backend="self-hosted", status="Complete", params={})


def inference(owner: str) -> InferenceJob:
    return InferenceJob.objects.create(task_type="txt2img", inference_type="Async", owner=owner, status="succeed")


# The contract's table (§4.2), written from the document, with names only -------------------------------------


def oracle_view(user: User, obj, owners: list[str]) -> bool:
    perms = permissions_of(user)
    held = set(user.groups.values_list("name", flat=True))
    created = set(Role.objects.filter(creator=user.username).values_list("name", flat=True))
    name = user.username
    if isinstance(obj, Checkpoint):
        return (
            "user:all" in perms or not owners or "*" in owners or name in owners or bool(set(owners) & (held | created))
        )
    if isinstance(obj, Endpoint):
        return "sagemaker_endpoint:all" in perms or name in owners or bool(set(owners) & (held | created))
    if isinstance(obj, Dataset | TrainingJob):
        return "user:all" in perms or name in owners or bool(set(owners) & held)
    return "inference:all" in perms or owners == [name]


def oracle_change(user: User, obj, owners: list[str]) -> bool:
    if not oracle_view(user, obj, owners):
        return False
    perms = permissions_of(user)
    if isinstance(obj, Checkpoint):
        return "checkpoint:all" in perms or obj.creator == user.username
    if isinstance(obj, Endpoint):
        return "sagemaker_endpoint:all" in perms or obj.creator == user.username
    return True


LISTS = [  # route, list key, id key, the permission that lets a user call it
    (Checkpoint, "/api/checkpoints?per_page=-1", "checkpoints", "id", ("checkpoint:all", "checkpoint:list")),
    (Endpoint, "/api/endpoints?limit=-1", "endpoints", "EndpointDeploymentJobId", ("sagemaker_endpoint:all",)),
    (Dataset, "/api/datasets?limit=-1", "datasets", "datasetName", ("train:all",)),
    (TrainingJob, "/api/trainings?limit=-1", "trainings", "id", ("train:all",)),
    (InferenceJob, "/api/inferences?limit=-1", "inferences", "InferenceJobId", ("inference:all", "inference:list")),
]


def api_ids(api: Api, key: str, route: str, list_key: str, id_key: str) -> set[str]:
    answer = api.get(route, key=key)
    assert answer.status == 200, answer.body
    return {str(item[id_key]) for item in answer.body["data"][list_key]}


def object_id(obj) -> str:
    return obj.name if isinstance(obj, Dataset) else str(obj.pk)


world = st.fixed_dictionaries(
    {
        "role_perms": st.lists(st.lists(st.sampled_from(PERMISSION_POOL), max_size=3), min_size=3, max_size=3),
        "role_creators": st.lists(st.sampled_from(USERS), min_size=3, max_size=3),
        "memberships": st.lists(st.lists(st.sampled_from(ROLES), max_size=2), min_size=4, max_size=4),
        "owner_lists": st.lists(
            st.tuples(st.lists(st.sampled_from(NAMES), max_size=3), st.sampled_from(USERS)), min_size=1, max_size=4
        ),
        "owners": st.lists(st.sampled_from([*USERS, *ROLES]), min_size=1, max_size=3),
        "ghost_created_late": st.booleans(),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=world)
def test_has_perm_equals_the_contract_rule_and_the_api(api: Api, spec):
    with transaction.atomic():
        for index, role in enumerate(ROLES):
            make_role(role, spec["role_perms"][index] or ["inference:create"], creator=spec["role_creators"][index])
        users = [make_user(name, roles=tuple(spec["memberships"][i])) for i, name in enumerate(USERS)]
        objects: list[tuple[object, list[str]]] = []
        for index, (owners, creator) in enumerate(spec["owner_lists"]):
            owners = list(dict.fromkeys(owners))
            objects.append((checkpoint(owners, creator), owners))
            no_star = [n for n in owners if n != "*"]
            objects.append((endpoint(no_star, creator, index), no_star))
            objects.append((dataset(no_star, creator, index), no_star))
        for owner in spec["owners"]:
            objects.append((training(owner), [owner]))
            if owner in USERS:
                objects.append((inference(owner), [owner]))
        if spec["ghost_created_late"]:  # a role named in owner lists before it existed is granted when created
            make_role(GHOST, ["checkpoint:list"], creator="u0")
            users[0].groups.add(Role.objects.get(name=GHOST))

        for user in users:
            user = User.objects.get(pk=user.pk)  # fresh: no permission cache
            shown: dict[type, set[str]] = {}
            perms = permissions_of(user)
            key = make_key(user)
            for model, route, list_key, id_key, needed in LISTS:
                if not perms.isdisjoint(needed):
                    shown[model] = api_ids(api, key, route, list_key, id_key)
            for obj, owners in objects:
                meta = obj._meta
                view = user.has_perm(f"{meta.app_label}.view_{meta.model_name}", obj)
                assert view == oracle_view(user, obj, owners), (user.username, meta.model_name, owners)
                change = user.has_perm(f"{meta.app_label}.change_{meta.model_name}", obj)
                assert change == oracle_change(user, obj, owners), (user.username, meta.model_name, owners)
                if type(obj) in shown:
                    assert (object_id(obj) in shown[type(obj)]) == view, (user.username, meta.model_name, owners)
        transaction.set_rollback(True)


def test_a_grant_made_in_the_admin_shows_the_object_to_that_role_through_the_api(client, api: Api):
    operator = make_user("operator", password="op-pass-123", is_staff=True, is_superuser=True)
    painters = make_role("Painter", ["checkpoint:list"])
    painter = make_user("painter", roles=("Painter",))
    key = make_key(painter)
    row = checkpoint(["IT Operator"], "operator")
    assert not painter.has_perm("models_registry.view_checkpoint", row)
    assert api_ids(api, key, "/api/checkpoints", "checkpoints", "id") == set()

    client.force_login(operator)
    page = f"/admin/models_registry/checkpoint/{row.pk}/permissions/"
    assert client.get(page).status_code == 200
    manage = f"{page}group-manage/{painters.pk}/"
    response = client.post(manage, {"permissions": ["view_checkpoint"]})
    assert response.status_code == 302, response.content[:500]

    painter = User.objects.get(pk=painter.pk)
    assert painter.has_perm("models_registry.view_checkpoint", row)
    assert CheckpointGroupObjectPermission.objects.filter(content_object=row, group=painters).exists()
    assert api_ids(api, key, "/api/checkpoints", "checkpoints", "id") == {str(row.pk)}
    listed = api.get("/api/checkpoints", key=key).body["data"]["checkpoints"][0]
    assert listed["allowed_roles_or_users"] == ["IT Operator", "Painter"]  # the wire owner list agrees
    assert re.search(r"Painter", client.get(page).content.decode())

    # Nothing selected: a browser posts only its CSRF token. Revoking removes the name and the grant.
    assert client.post(manage, {"csrfmiddlewaretoken": "token"}).status_code == 302
    assert api_ids(api, key, "/api/checkpoints", "checkpoints", "id") == set()
    assert list(CheckpointOwner.objects.filter(resource=row).values_list("name", flat=True)) == ["IT Operator"]


def test_sharing_in_the_admin_needs_the_objects_change_permission(client):
    make_role("Viewer", ["checkpoint:all"])
    make_role("Lister", ["checkpoint:list", "checkpoint:create"])
    lister = make_user("lister", roles=("Lister",), password="pw-123456-x", is_staff=True)
    row = checkpoint(["Lister"], "someone-else")
    client.force_login(lister)
    page = f"/admin/models_registry/checkpoint/{row.pk}/permissions/"
    assert client.get(page).status_code == 403  # visible, but not theirs to change or share


def test_sync_object_permissions_repairs_and_is_idempotent():
    make_role("Painter", ["checkpoint:list"])
    painter = make_user("painter", roles=("Painter",))
    row = checkpoint(["Painter"], "admin")
    job = endpoint(["painter"], "admin", 1)
    CheckpointGroupObjectPermission.objects.filter(content_object=row).delete()  # drift: a lost grant
    EndpointUserObjectPermission.objects.create(  # drift: a grant no name earns
        user=make_user("stranger"), content_object=job, permission_id=EndpointUserObjectPermission.objects.filter(
            content_object=job, user=painter).values_list("permission_id", flat=True)[0],
    )  # fmt: skip
    assert not painter.has_perm("models_registry.view_checkpoint", row)

    with pytest.raises(Exception, match="differ from the owner names"):
        call_command("sync_object_permissions", "--check")
    call_command("sync_object_permissions")
    assert User.objects.get(pk=painter.pk).has_perm("models_registry.view_checkpoint", row)
    assert not EndpointUserObjectPermission.objects.filter(user__username="stranger").exists()
    assert all(r.added == r.removed == 0 for r in sync_all().values())
    call_command("sync_object_permissions", "--check")


def test_deleting_a_role_keeps_its_name_and_recreating_it_restores_access(api: Api):
    make_role("Painter", ["checkpoint:list"])
    painter = make_user("painter", roles=("Painter",))
    row = checkpoint(["Painter"], "admin")
    Role.objects.get(name="Painter").delete()
    assert list(row.owners.values_list("name", flat=True)) == ["Painter"]
    painters = make_role("Painter", ["checkpoint:list"])
    painter.groups.add(painters)
    assert User.objects.get(pk=painter.pk).has_perm("models_registry.view_checkpoint", row)
    assert api_ids(api, make_key(painter), "/api/checkpoints", "checkpoints", "id") == {str(row.pk)}


def test_renaming_a_role_moves_its_grants_to_what_its_new_name_earns():
    painters = make_role("Painter", ["checkpoint:list"])
    painter = make_user("painter", roles=("Painter",))
    row = checkpoint(["Painter"], "admin")
    other = checkpoint(["Sculptor"], "admin")
    painters.name = "Sculptor"
    painters.save()
    painter = User.objects.get(pk=painter.pk)
    assert not painter.has_perm("models_registry.view_checkpoint", row)
    assert painter.has_perm("models_registry.view_checkpoint", other)


def test_sharing_never_publishes_or_hides_a_public_checkpoint_by_accident(client):
    operator = make_user("operator", password="op-pass-123", is_staff=True, is_superuser=True)
    painters = make_role("Painter", ["checkpoint:list"])
    public = checkpoint([], "operator")
    only_painters = checkpoint(["Painter"], "operator")
    client.force_login(operator)
    answer = client.post(
        f"/admin/models_registry/checkpoint/{public.pk}/permissions/group-manage/{painters.pk}/",
        {"permissions": ["view_checkpoint"]},
    )
    assert answer.status_code == 200 and "everyone may use it" in answer.content.decode()
    assert list(public.owners.values_list("name", flat=True)) == []
    answer = client.post(
        f"/admin/models_registry/checkpoint/{only_painters.pk}/permissions/group-manage/{painters.pk}/",
        {"csrfmiddlewaretoken": "token"},
    )
    assert answer.status_code == 200 and "would make the checkpoint public" in answer.content.decode()
    assert list(only_painters.owners.values_list("name", flat=True)) == ["Painter"]
    assert client.get("/admin/models_registry/checkpoint/not-a-uuid/permissions/").status_code == 404


def test_an_action_without_its_permission_strings_is_refused_when_defined():
    from django.core.exceptions import ImproperlyConfigured

    from esd.api.views import EsdViewSet, operation

    with pytest.raises(ImproperlyConfigured, match=r"Forgetful\.list acts for a user but is missing from `required`"):

        class Forgetful(EsdViewSet):
            @operation(operation_id="Forgetful", summary="s", tags=["Test"], responses={200: None})
            def list(self, request):
                raise AssertionError
