"""Reversible password storage for the opt-in WebUI password sync (contract §9.3, ``ESD_WEBUI_PASSWORD_SYNC``).

Off by default: then nothing reversible is ever stored. When on, passwords are also kept Fernet-encrypted with
``ESD_PASSWORD_ENCRYPTION_KEY`` so that an administrator's trusted front end can read them back.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def _fernet() -> Fernet | None:
    if not settings.ESD_WEBUI_PASSWORD_SYNC:
        return None
    key = settings.ESD_PASSWORD_ENCRYPTION_KEY
    if not key:
        raise ImproperlyConfigured("ESD_WEBUI_PASSWORD_SYNC needs ESD_PASSWORD_ENCRYPTION_KEY (a Fernet key)")
    return Fernet(key.encode())


def encrypt_password(raw_password: str | None) -> str:
    fernet = _fernet()
    if fernet is None or raw_password is None:
        return ""
    return fernet.encrypt(raw_password.encode()).decode()


def decrypt_password(token: str) -> str | None:
    fernet = _fernet()
    if fernet is None or not token:
        return None
    try:
        return fernet.decrypt(token.encode()).decode()
    except InvalidToken:
        return None
