"""Object permissions on shared resources (django-guardian), derived from the resources' ESD owner names.

ESD sends and returns owners as names (``allowed_roles_or_users``, ``owner_group_or_role``): names of roles or of
users, ``*``, and names of roles that do not exist yet. Those names stay the wire data, in order. What a caller may
do with one object is a guardian object permission (``view_``/``change_``/``delete_``) in the model's direct-FK
grant tables (``<Model>UserObjectPermission``/``<Model>GroupObjectPermission``, indexed joins as in paperless-ngx):

- each owner name that is a role grants the policy's ``owner_actions`` to that role (a Django group), each owner
  name that is a user grants them to that user;
- the creator gets ``creator_actions`` (changing or deleting a checkpoint or endpoint needs being its creator).

This module is the one place that turns names into grants. It runs when owner names are written (``save_owners``
sends ``owners_changed``), when a shared object is created, and when a role or user is created or renamed (a name
kept for a role that did not exist is granted then); ``manage.py sync_object_permissions`` and ``migrate`` verify
and repair everything. The models' visibility querysets read the grant tables (``granted``), and the
authentication backend answers ``user.has_perm(perm, obj)`` with those same querysets, so the API, the console,
the admin and the commands ask one question.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

from django.apps import apps
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import models, transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from guardian.utils import get_group_obj_perms_model, get_user_obj_perms_model

ACTIONS = ("view", "change", "delete")


@dataclass(frozen=True)
class GrantPolicy:
    """How a shared model's owner names become object permissions, and which queryset answers each action.

    ``owner_lookup`` reads the names (``owners__name`` for an owner table, ``owner`` for a field);
    ``rules`` names the queryset method (``visible_to``, ``changeable_by``) that decides each action.
    """

    owner_lookup: str
    owner_actions: tuple[str, ...] = ("view",)
    # Checkpoints: no owner names means everyone (contract §4.2), so sharing must not empty or start a list.
    empty_is_public: bool = False
    roles_may_own: bool = True
    creator_field: str | None = None
    creator_actions: tuple[str, ...] = ()
    rules: dict[str, str] = field(default_factory=lambda: dict.fromkeys(ACTIONS, "visible_to"))


def shared_models() -> list[type[models.Model]]:
    """Every model that declares a ``grant_policy`` (checkpoints, endpoints, datasets, trainings, inferences)."""
    return [model for model in apps.get_models() if isinstance(getattr(model, "grant_policy", None), GrantPolicy)]


def policy_of(model: type[models.Model]) -> GrantPolicy:
    return model.grant_policy  # type: ignore[attr-defined]


def codename(model: type[models.Model], action: str) -> str:
    return f"{action}_{model._meta.model_name}"


def granted(model: type[models.Model], action: str, user: models.Model, roles: QuerySet | None) -> Q:
    """Rows on which ``user``, or one of ``roles`` (a queryset of role/group ids), holds the ``action`` grant."""
    name = codename(model, action)
    user_grants = get_user_obj_perms_model(model).objects.filter(
        content_object=OuterRef("pk"), user=user, permission__codename=name
    )
    condition = Q(Exists(user_grants))
    if roles is not None:
        group_grants = get_group_obj_perms_model(model).objects.filter(
            content_object=OuterRef("pk"), group__in=roles, permission__codename=name
        )
        condition |= Q(Exists(group_grants))
    return condition


def permitted(model: type[models.Model], user: models.Model, action: str) -> QuerySet:
    """The rows ``user`` may ``action``: the same queryset the API reads (``has_perm`` asks this)."""
    from apps.accounts.models import permissions_of

    method = policy_of(model).rules[action]
    return getattr(model.objects, method)(user, permissions_of(user))


# Deriving grants from names --------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    added: int = 0
    removed: int = 0

    def __iadd__(self, other: SyncReport) -> SyncReport:
        self.added += other.added
        self.removed += other.removed
        return self


@cache
def _permission_ids(model: type[models.Model]) -> dict[str, int]:
    """The model's view/change/delete permission ids, cached per process (``migrate`` and a test flush, which may
    recreate them, clear the cache through ``forget_permission_ids``)."""
    content_type = ContentType.objects.get_for_model(model)
    rows = Permission.objects.filter(content_type=content_type, codename__in=[codename(model, a) for a in ACTIONS])
    by_codename = dict(rows.values_list("codename", "pk"))
    return {action: by_codename[codename(model, action)] for action in ACTIONS}


def forget_permission_ids() -> None:
    _permission_ids.cache_clear()


def _desired(model: type[models.Model], pks: list) -> tuple[set[tuple], set[tuple]]:
    """(user grants, group grants) as (principal id, permission id, object pk) derived from names."""
    from apps.accounts.models import Role, User

    policy = policy_of(model)
    perm_ids = _permission_ids(model)
    names: dict[object, list[str]] = defaultdict(list)
    for pk, name in model.objects.filter(pk__in=pks).values_list("pk", policy.owner_lookup):
        if name:
            names[pk].append(name)
    creators: dict[object, str] = {}
    if policy.creator_field:
        creators = dict(model.objects.filter(pk__in=pks).values_list("pk", policy.creator_field))
    wanted = {n for owned in names.values() for n in owned} | set(creators.values())
    user_ids = dict(User.objects.filter(username__in=wanted).values_list("username", "pk"))
    role_ids = dict(Role.objects.filter(name__in=wanted).values_list("name", "pk")) if policy.roles_may_own else {}
    users: set[tuple] = set()
    groups: set[tuple] = set()
    for pk, owned in names.items():
        for name in owned:
            for action in policy.owner_actions:
                if name in user_ids:
                    users.add((user_ids[name], perm_ids[action], pk))
                if name in role_ids:
                    groups.add((role_ids[name], perm_ids[action], pk))
    for pk, creator in creators.items():
        if creator in user_ids:
            for action in policy.creator_actions:
                users.add((user_ids[creator], perm_ids[action], pk))
    return users, groups


def _apply(grant_model: type[models.Model], principal: str, pks: list, desired: set[tuple], repair: bool) -> SyncReport:
    rows = grant_model.objects.filter(content_object_id__in=pks)
    current = {
        (principal_id, perm_id, obj_pk): grant_pk
        for grant_pk, principal_id, perm_id, obj_pk in rows.values_list(
            "pk", f"{principal}_id", "permission_id", "content_object_id"
        )
    }
    extra = [grant_pk for key, grant_pk in current.items() if key not in desired]
    missing = [key for key in desired if key not in current]
    if not repair:
        return SyncReport(added=len(missing), removed=len(extra))
    if extra:
        grant_model.objects.filter(pk__in=extra).delete()
    grant_model.objects.bulk_create(
        [
            grant_model(**{f"{principal}_id": principal_id, "permission_id": perm_id, "content_object_id": obj_pk})
            for principal_id, perm_id, obj_pk in missing
        ],
        ignore_conflicts=True,
    )
    return SyncReport(added=len(missing), removed=len(extra))


def sync_objects(model: type[models.Model], pks: Iterable, *, repair: bool = True) -> SyncReport:
    """Make the grants of these objects exactly what their names say (idempotent; a few queries per call).
    ``repair=False`` only counts what would change."""
    pks = list(pks)
    report = SyncReport()
    if not pks:
        return report
    users, groups = _desired(model, pks)
    with transaction.atomic():
        report += _apply(get_user_obj_perms_model(model), "user", pks, users, repair)
        if policy_of(model).roles_may_own:
            report += _apply(get_group_obj_perms_model(model), "group", pks, groups, repair)
    return report


def sync_principal(principal: models.Model) -> None:
    """A user or role was created or renamed: re-derive the grants of every object that names it, or on which it
    holds a grant (a renamed principal loses what its new name does not earn)."""
    from apps.accounts.models import Role

    is_role = isinstance(principal, Role)
    name = principal.name if is_role else principal.username
    for model in shared_models():
        policy = policy_of(model)
        if is_role and not policy.roles_may_own:
            continue
        match = Q(**{policy.owner_lookup: name})
        if not is_role and policy.creator_field:
            match |= Q(**{policy.creator_field: name})
        pks = set(model.objects.filter(match).values_list("pk", flat=True))
        if is_role:
            held = get_group_obj_perms_model(model).objects.filter(group_id=principal.pk)
        else:
            held = get_user_obj_perms_model(model).objects.filter(user_id=principal.pk)
        pks |= set(held.values_list("content_object_id", flat=True))
        sync_objects(model, pks)


def sync_all(*, repair: bool = True, chunk: int = 500) -> dict[str, SyncReport]:
    """Verify and repair every shared object's grants (``manage.py sync_object_permissions``, ``migrate``)."""
    reports: dict[str, SyncReport] = {}
    for model in shared_models():
        report = SyncReport()
        pks = list(model.objects.order_by("pk").values_list("pk", flat=True))
        for start in range(0, len(pks), chunk):
            report += sync_objects(model, pks[start : start + chunk], repair=repair)
        reports[model._meta.label] = report
    return reports


# Grants made by an operator (the admin's object permissions page) -------------------------------------------------


def _owner_model(obj: models.Model) -> type[models.Model]:
    policy = policy_of(type(obj))
    if "__" not in policy.owner_lookup:
        raise ValueError(f"the owner of a {type(obj)._meta.verbose_name} is its creator; it cannot be shared")
    return type(obj)._meta.get_field(policy.owner_lookup.split("__", 1)[0]).related_model


def owner_names(obj: models.Model) -> list[str]:
    """The owner names in their wire order."""
    rows = _owner_model(obj).objects.filter(resource=obj).order_by("position")
    return list(rows.values_list("name", flat=True))


def sharing_problem(obj: models.Model, name: str, *, shared: bool) -> str | None:
    """Why sharing (or unsharing) would not do what an operator means, or None: a checkpoint without owner names is
    public, so the first name would hide it from everyone else and removing the last would publish it."""
    if not policy_of(type(obj)).empty_is_public:
        return None
    names = owner_names(obj)
    if shared and not names:
        return "this checkpoint has no owners, so everyone may use it; sharing it with one role would restrict it"
    if not shared and names == [name]:
        return f"{name} is the only owner; removing it would make the checkpoint public (owners empty)"
    return None


def share(obj: models.Model, name: str, *, shared: bool) -> None:
    """Add ``name`` to (or remove it from) the object's owner names, then derive the grants: a grant given in the
    admin is an owner name like any other, so the wire data, the grants and the API agree. Only owner lists can
    take several names; a job's owner is its creator."""
    from esd.owners import save_owners

    problem = sharing_problem(obj, name, shared=shared)
    if problem is not None:
        raise ValueError(problem)
    names = owner_names(obj)
    if shared and name not in names:
        names.append(name)
    elif not shared:
        names = [n for n in names if n != name]
    save_owners(_owner_model(obj), obj, names)
