"""Serializer plumbing for response shapes: the envelope around each route's ``data`` (contract §2).

Each app's ``api/serializers.py`` declares the ``data`` of its responses as DRF serializers, which both render
the response and document it (drf-spectacular reads them). The envelope itself is built by ``envelope()`` in
``esd.api.views``; ``envelope_serializer`` describes the same shape to the OpenAPI document.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from rest_framework import serializers

from esd.api.errors import DEFAULT_MESSAGES


class FreeObjectField(serializers.DictField):
    """A JSON object whose keys the client chose (``params``, ``payload``): passed through as stored."""

    def to_representation(self, value: Any) -> Any:
        return value


class StringListField(serializers.ListField):
    """A list of strings rendered as stored (names, permissions, URLs)."""

    child = serializers.CharField()

    def to_representation(self, data: Any) -> Any:
        return list(data)


def _camel(text: str) -> str:
    return "".join(word.capitalize() for word in re.findall(r"[A-Za-z0-9]+", text))


@cache
def envelope_serializer(
    status: int,
    data: type[serializers.Serializer] | None = None,
    message: str | None = None,
    data_required: bool = True,
) -> type[serializers.Serializer]:
    """``{"statusCode": status, "data": data, "message": ...}`` as a named component of the document."""
    message = message or DEFAULT_MESSAGES.get(status, "")
    fields: dict[str, serializers.Field] = {"statusCode": serializers.IntegerField(min_value=status, max_value=status)}
    if data is not None:
        fields["data"] = data(required=data_required)
    fields["message"] = serializers.CharField(required=False, help_text=f'"{message}"' if message else "")
    if data is not None:
        name = f"{data.__name__.removesuffix('Serializer')}{status}"
        if not data_required:
            name += "Optional"
    else:
        name = f"Message{status}{_camel(message)}"
    return type(f"{name}Envelope", (serializers.Serializer,), {**fields, "__module__": __name__})
