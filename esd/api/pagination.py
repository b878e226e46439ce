"""Pagination helpers (contract §6): keyset for the DynamoDB-style routes, page numbers for checkpoints.

Keyset pages cost one query of ``limit + 1`` rows on an index, however deep the page: the token carries the
ordering values of the last row returned, not an offset.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet

from esd.api.errors import BadRequest

INVALID_KEY = "exclusive_start_key is invalid"


@dataclass(frozen=True)
class KeysetPage:
    rows: list[Any]
    last_evaluated_key: str | None


def _encode(values: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode(token: str, queryset: QuerySet, fields: tuple[str, ...]) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        values = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest(INVALID_KEY) from None
    if not isinstance(values, list) or len(values) != len(fields) or not all(isinstance(v, str) for v in values):
        raise BadRequest(INVALID_KEY)
    model = queryset.model
    try:
        return [model._meta.get_field(name).to_python(value) for name, value in zip(fields, values, strict=True)]
    except (ValidationError, ValueError, TypeError):
        raise BadRequest(INVALID_KEY) from None


def _value(row: Any, name: str) -> str:
    value = getattr(row, name)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def keyset_page(queryset: QuerySet, *, order: tuple[str, str], limit: int, start_key: str | None) -> KeysetPage:
    """Newest first by ``order`` (a time field, then a unique tie-breaker), ``limit`` rows after ``start_key``."""
    first, tie = order
    if start_key:
        after_first, after_tie = _decode(start_key, queryset, order)
        queryset = queryset.filter(
            Q(**{f"{first}__lt": after_first}) | Q(**{first: after_first, f"{tie}__lt": after_tie})
        )
    rows = list(queryset.order_by(f"-{first}", f"-{tie}")[: limit + 1])
    if len(rows) <= limit:
        return KeysetPage(rows, None)
    rows = rows[:limit]
    return KeysetPage(rows, _encode([_value(rows[-1], first), _value(rows[-1], tie)]))


@dataclass(frozen=True)
class NumberedPage:
    rows: list[Any]
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return math.ceil(self.total / self.per_page) if self.total else 0


def numbered_page(queryset: QuerySet, *, page: int, per_page: int) -> NumberedPage:
    """Page ``page`` (from 1) of ``per_page`` rows; a page past the end is empty. Two queries: count and slice."""
    total = queryset.count()
    start = (page - 1) * per_page
    rows = list(queryset[start : start + per_page]) if start < total else []
    return NumberedPage(rows, page, per_page, total)
