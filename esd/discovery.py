"""Finding the apps' plug-in modules (``tasks``, ``metrics``, ...) without naming any app: the plumbing under
``esd/`` imports no app, so an app plugs in by having a module of the agreed name."""

from __future__ import annotations

import importlib

from django.apps import apps


def import_app_modules(name: str) -> list[str]:
    """Import ``<app>.<name>`` for every installed app of ours that has one; returns the modules imported. A module
    that exists but fails to import raises (a missing one is simply skipped)."""
    loaded = []
    for config in apps.get_app_configs():
        if not config.name.startswith(("apps.", "esd")):
            continue
        module = f"{config.name}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        loaded.append(module)
    return loaded
