"""Wire formats of times (contract §1): ESD printed UTC strings and epoch seconds as strings."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_string(moment: datetime | None) -> str | None:
    """``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC (``startTime``, ``createTime``, a checkpoint's ``params.created``)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def epoch_string(moment: datetime) -> str:
    """Epoch seconds with six decimals, as a string (``created``, ``timestamp``)."""
    return f"{moment.timestamp():.6f}"
