"""Time left from reported steps: one estimate for every kind of job (trainings, inference jobs).

Workers report only steps; the wall clock is the control plane's. So the estimate needs nothing from the runtime,
survives a worker restart, and means the same wherever it is shown.
"""

from __future__ import annotations

from typing import Any


def with_eta(progress: dict[str, Any], now: float) -> dict[str, Any]:
    """Add ``eta_seconds`` from the step rate since the first step this server heard of (``rate_mark`` =
    ``[time, step]``, kept in ``progress``); a step below the mark (a resumed or restarted run) starts a new mark.

    The mark is the first report, so the first estimate needs a second report with a higher step."""
    step, steps = progress.get("step"), progress.get("steps")
    if not isinstance(step, int) or not isinstance(steps, int):
        return progress
    mark = progress.get("rate_mark")
    if not isinstance(mark, list) or len(mark) != 2 or step < mark[1]:
        progress["rate_mark"] = [now, step]
        progress.pop("eta_seconds", None)
    elif step > mark[1]:
        seconds_per_step = (now - mark[0]) / (step - mark[1])
        progress["eta_seconds"] = round(seconds_per_step * max(steps - step, 0), 1)
    return progress
