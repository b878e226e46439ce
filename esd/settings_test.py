"""Test settings: the real settings plus what must differ under pytest.

The var dir is a throw-away temp directory (tests never touch a developer's embedded data) and passwords use a
fast hasher. The broker comes from ``DRAMATIQ_BROKER_URL`` exactly as in production: django_dramatiq builds it when
the app registry loads, so the in-process StubBroker is used unless CI points the variable at Redis.
"""

import os
import tempfile

os.environ.setdefault("ESD_VAR_DIR", tempfile.mkdtemp(prefix="esd-test-"))
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")

from esd.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A file, not Django's shared-cache in-memory database: worker threads and the live server then get SQLite's
    # real locking (WAL, busy timeout) instead of "database table is locked" errors.
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(os.environ["ESD_VAR_DIR"], "test.sqlite3")}  # noqa: F405

# Sign-in throttling needs the request, which the test client's login() does not pass; the tests that are about
# throttling switch it on (tests/accounts/test_sign_in_throttle.py).
AXES_ENABLED = False
