"""Endpoint backends, chosen per endpoint by its ``backend`` field."""

from __future__ import annotations

from apps.endpoints.backends.base import EndpointBackend


def get_backend(name: str) -> EndpointBackend:
    if name == "sagemaker":
        from apps.endpoints.backends.sagemaker import backend
    else:
        from apps.endpoints.backends.selfhosted import backend
    return backend
