"""Serializer plumbing for response shapes: the envelope around each route's ``data`` (contract §2).

Each app's ``api/serializers.py`` declares the ``data`` of its responses as DRF serializers, which both render
the response and document it (drf-spectacular reads them). The envelope itself is built by ``envelope()`` in
``esd.api.views``; ``envelope_serializer`` describes the same shape to the OpenAPI document.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from rest_framework import serializers
from rest_framework.fields import SkipField

from esd.api.errors import DEFAULT_MESSAGES

# Fields whose DRF ``to_representation`` is exactly this builtin.
_PLAIN: dict[type, Callable[[Any], Any]] = {
    serializers.CharField: str,
    serializers.IntegerField: int,
    serializers.FloatField: float,
    serializers.UUIDField: str,
}


class EsdSerializer(serializers.Serializer):
    """A response shape. Renders as DRF does, but reads a field's value directly when its source is one plain
    name: list routes render hundreds of rows, and DRF's per-field machinery cost more than the rest of the
    request (``bench/api_bench.py``)."""

    @classmethod
    def render(cls, data: Any) -> dict[str, Any]:
        """``data`` in this shape. One instance per class renders every request: DRF would deep-copy every
        declared field for each new instance, and rendering keeps no state on the instance."""
        return _shared_instance(cls).to_representation(data)

    def _plan(self) -> list[tuple[serializers.Field, str | None, Callable[[Any], Any]]]:
        plan = getattr(self, "_esd_plan", None)
        if plan is None:
            plan = []
            for field in self._readable_fields:
                attrs = getattr(field, "source_attrs", [])
                direct = attrs[0] if len(attrs) == 1 else None
                plan.append((field, direct, _PLAIN.get(type(field), field.to_representation)))
            self._esd_plan = plan
        return plan

    def to_representation(self, instance: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        is_mapping = isinstance(instance, Mapping)
        for field, direct, convert in self._plan():
            try:
                if direct is None:
                    raise KeyError(field.field_name)
                value = instance[direct] if is_mapping else getattr(instance, direct)
            except (KeyError, AttributeError):
                try:  # DRF's own lookup: defaults, optional fields, ``source="*"``, method fields
                    value = field.get_attribute(instance)
                except SkipField:
                    continue
                convert = field.to_representation
            out[field.field_name] = None if value is None else convert(value)
        return out


@cache
def _shared_instance(cls: type[EsdSerializer]) -> EsdSerializer:
    return cls()


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
