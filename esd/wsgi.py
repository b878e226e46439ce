"""WSGI entry point for gunicorn (scaled-out web processes) and the embedded `runesd` server."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "esd.settings")

application = get_wsgi_application()
