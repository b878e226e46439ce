"""Production settings plus the bench's bare comparison views (never part of the product's URLs)."""

from esd.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
DEBUG = False
