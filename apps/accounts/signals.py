"""Derived state kept honest: the API key cache (any change to a key or its owner drops the cached rows at once)
and the object permissions derived from owner names."""

from __future__ import annotations

from django.apps import AppConfig
from django.apps import apps as django_apps
from django.core.cache import cache
from django.db.models import Model
from django.db.models.signals import post_delete, post_migrate, post_save, pre_save
from django.dispatch import receiver

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


def _name(instance: Model) -> str:
    return instance.name if isinstance(instance, Role) else instance.username


@receiver(pre_save)
def remember_name(sender: type[Model], instance: Model, raw: bool = False, **kwargs) -> None:
    """Saving a user or role re-derives grants only when its name is new (created or renamed)."""
    if (sender is User or sender is Role) and not raw:
        old = sender.objects.filter(pk=instance.pk).values_list("name" if sender is Role else "username", flat=True)
        instance._esd_name_before_save = next(iter(old), None) if instance.pk else None


@receiver(post_save)
def grant_on_create(sender: type[Model], instance: Model, created: bool, raw: bool = False, **kwargs) -> None:
    """A new shared object's creator and owner field earn their grants; a new or renamed user or role earns the
    grants its name was kept for (``loaddata`` rows are repaired by ``sync_object_permissions``)."""
    if raw:
        return
    if isinstance(getattr(sender, "grant_policy", None), grants.GrantPolicy):
        if created:
            grants.sync_objects(sender, [instance.pk])
    elif (sender is User or sender is Role) and getattr(instance, "_esd_name_before_save", None) != _name(instance):
        grants.sync_principal(instance)


@receiver(post_migrate)
def repair_grants(sender: AppConfig, **kwargs) -> None:
    """Grants are derived data: every ``migrate`` (an upgrade included) verifies and repairs them, once, after
    the last app (when every model's permissions exist)."""
    grants.forget_permission_ids()
    last = list(django_apps.get_app_configs())[-1]
    if sender is last and kwargs.get("using", "default") == "default":
        grants.sync_all()
