"""Startup checks: refuse a configuration that would fail on the first request."""

from django.conf import settings
from django.core.checks import Error, register


@register()
def password_sync_needs_a_key(app_configs, **kwargs) -> list[Error]:
    if not settings.ESD_WEBUI_PASSWORD_SYNC:
        return []
    from cryptography.fernet import Fernet

    try:
        Fernet(settings.ESD_PASSWORD_ENCRYPTION_KEY.encode())
    except ValueError:
        return [
            Error(
                "ESD_WEBUI_PASSWORD_SYNC is on but ESD_PASSWORD_ENCRYPTION_KEY is not a Fernet key",
                hint='Generate one: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"',
                id="accounts.E001",
            )
        ]
    return []


@register()
def revocation_within_a_second(app_configs, **kwargs) -> list[Error]:
    """A revoked key or a deleted user must be refused by every server process within 1 s (issue 13)."""
    if settings.ESD_KEY_CACHE_SECONDS > 1:
        return [
            Error(
                f"ESD_KEY_CACHE_SECONDS={settings.ESD_KEY_CACHE_SECONDS} lets a revoked key work that long in other "
                "processes",
                hint="Use 0 or 1: a key cache hit saves one indexed query, and a second already serves bursts.",
                id="accounts.E002",
            )
        ]
    return []
