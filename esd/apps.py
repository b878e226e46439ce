from django.apps import AppConfig


class EsdConfig(AppConfig):
    """The project package as an app: it owns the shared management commands (`runesd`) and no models."""

    name = "esd"
    verbose_name = "ESD Server"
