"""Keep the API key cache honest: any change to a key or its owner drops the cached rows at once."""

from __future__ import annotations

from django.core.cache import cache
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from apps.accounts.models import ApiKey, User, key_cache_name


@receiver([post_save, post_delete], sender=ApiKey)
def forget_key(sender: type[ApiKey], instance: ApiKey, **kwargs) -> None:
    cache.delete(key_cache_name(instance.digest))


@receiver(post_save, sender=User)
def forget_keys_of_user(sender: type[User], instance: User, **kwargs) -> None:
    """Deactivation, promotion or renaming must reach requests made with the user's keys immediately."""
    digests = list(ApiKey.objects.filter(user_id=instance.pk).values_list("digest", flat=True))
    if digests:
        cache.delete_many([key_cache_name(d) for d in digests])
