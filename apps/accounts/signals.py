"""Derived state kept honest: the API key cache (any change to a key or its owner drops the cached rows at once)
and the object permissions derived from owner names."""

from __future__ import annotations

from django.apps import AppConfig
from django.apps import apps as django_apps
from django.core.cache import cache
from django.db import connections
from django.db.models import Model
from django.db.models.signals import post_delete, post_migrate, post_save, pre_save
from django.dispatch import receiver
from guardian.utils import get_group_obj_perms_model, get_user_obj_perms_model

from apps.accounts import grants
from apps.accounts.models import ApiKey, Role, User, key_cache_name
from esd.owners import owners_changed


@receiver([post_save, post_delete], sender=ApiKey)
def forget_key(sender: type[ApiKey], instance: ApiKey, **kwargs) -> None:
    cache.delete(key_cache_name(instance.digest))


@receiver(post_save, sender=User)
def forget_keys_of_user(sender: type[User], instance: User, **kwargs) -> None:
    """Deactivation, promotion or renaming must reach requests made with the user's keys immediately."""
    digests = list(ApiKey.objects.filter(user_id=instance.pk).values_list("digest", flat=True))
    if digests:
        cache.delete_many([key_cache_name(d) for d in digests])


# Object permissions follow owner names (apps.accounts.grants) --------------------------------------------------


@receiver(owners_changed)
def grant_from_owner_names(sender: type[Model], resource: Model, **kwargs) -> None:
    grants.sync_objects(sender, [resource.pk])


def _name_field(sender: type[Model]) -> str:
    return "name" if sender is Role else "username"


@receiver(pre_save, sender=User)
@receiver(pre_save, sender=Role)
def remember_name(sender: type[Model], instance: Model, raw: bool = False, update_fields=None, **kwargs) -> None:
    """Saving a user or role re-derives grants only when its name is new (created or renamed); a save of other
    fields (``last_login``) costs nothing."""
    field = _name_field(sender)
    if raw or (update_fields is not None and field not in update_fields):
        instance._esd_name_before_save = getattr(instance, field)
        return
    old = sender.objects.filter(pk=instance.pk).values_list(field, flat=True) if instance.pk else []
    instance._esd_name_before_save = next(iter(old), None)


@receiver(post_save, sender=User)
@receiver(post_save, sender=Role)
def grant_new_name(sender: type[Model], instance: Model, raw: bool = False, **kwargs) -> None:
    """A new or renamed user or role earns the grants its name was kept for."""
    if not raw and getattr(instance, "_esd_name_before_save", None) != getattr(instance, _name_field(sender)):
        grants.sync_principal(instance)


def grant_new_object(sender: type[Model], instance: Model, created: bool, raw: bool = False, **kwargs) -> None:
    """A new shared object's creator and owner field earn their grants (``loaddata`` rows are repaired by
    ``sync_object_permissions``)."""
    if created and not raw:
        grants.sync_objects(sender, [instance.pk])


def connect_shared_models() -> None:
    """Called from the app's ``ready()``, when every shared model is known."""
    for model in grants.shared_models():
        post_save.connect(grant_new_object, sender=model, dispatch_uid=f"esd-grants-{model._meta.label}")


@receiver(post_migrate)
def repair_grants(sender: AppConfig, plan: list | None = None, using: str = "default", **kwargs) -> None:
    """Grants are derived data: a ``migrate`` that applied migrations (an upgrade) verifies and repairs them, once,
    after the last app with models, when every grant table exists. A backward or empty plan leaves them to
    ``manage.py sync_object_permissions``."""
    grants.forget_permission_ids()  # a flush or migrate may have recreated the permission rows
    with_models = [config for config in django_apps.get_app_configs() if config.models_module is not None]
    if sender is not with_models[-1] or not plan or any(backwards for _, backwards in plan):
        return
    tables = set(connections[using].introspection.table_names())
    models = grants.shared_models()
    needed = {m._meta.db_table for m in models} | {
        grant._meta.db_table for m in models for grant in (get_user_obj_perms_model(m), get_group_obj_perms_model(m))
    }
    if needed <= tables:
        grants.sync_all()
