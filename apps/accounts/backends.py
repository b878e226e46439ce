"""``user.has_perm(perm, obj)`` for shared resources: exactly which objects the API shows and lets the user change.

It answers the object-level question only; a route also needs its ESD permission string (``train:all``,
``checkpoint:create`` for a creator's change, contract §4.1), which the API's permission classes and the admin's
``has_*_permission`` check beside it.

Guardian's own backend answers from the grant rows alone; the contract's rules add role-wide permissions
(``checkpoint:all`` sees and changes everything), roles the caller created, and public checkpoints (owners empty
or ``*``). This backend asks the model's visibility queryset, which reads the same grant tables, so the API, the
console, the admin and the commands cannot disagree. Objects of other models keep guardian's answer.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model
from guardian.backends import ObjectPermissionBackend

from apps.accounts.grants import ACTIONS, permitted


def _shared(obj: Any) -> bool:
    return isinstance(obj, Model) and hasattr(type(obj), "grant_policy")


class SharedResourceBackend(ObjectPermissionBackend):
    def has_perm(self, user_obj: Any, perm: str, obj: Any = None) -> bool:
        if not _shared(obj):
            return super().has_perm(user_obj, perm, obj)
        if user_obj is None or not user_obj.is_active or not getattr(user_obj, "pk", None):
            return False
        app_label, _, codename = perm.rpartition(".")
        action, _, model_name = codename.partition("_")
        if action not in ACTIONS or model_name != obj._meta.model_name or app_label not in ("", obj._meta.app_label):
            return False
        return permitted(type(obj), user_obj, action).filter(pk=obj.pk).exists()

    def get_all_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        if not _shared(obj):
            return super().get_all_permissions(user_obj, obj)
        meta = obj._meta
        return {
            f"{meta.app_label}.{action}_{meta.model_name}"
            for action in ACTIONS
            if self.has_perm(user_obj, f"{meta.app_label}.{action}_{meta.model_name}", obj)
        }
