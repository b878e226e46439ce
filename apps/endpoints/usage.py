"""GPU-seconds accounting and role quotas: who used how much GPU time, where and when, and the check that refuses a
new job to a user at their role's limit.

What is counted: an inference job's ``gpu_seconds`` (the worker's generation time; a batched call's time shared
per image) and a training's ``gpu_seconds`` (the seconds its runs trained, all attempts of a resumed job; SageMaker:
training time x instances). Jobs count when they **end**, on the server's day (``TIME_ZONE``) of their end:
``complete_time`` for inference, ``finished`` for trainings (a resumed training counts, with all its runs, on the
day it last ended). A job still running counts nothing yet.

Groupings: ``user`` (the job's owner), ``endpoint`` (an inference job's endpoint name as it was at creation;
trainings are ``training:<backend>``, e.g. ``training:self-hosted``), ``day``, and ``role``: the roles the owner
holds *now*; a user in two roles counts in both role totals (so role totals may add up to more than the whole),
a user without roles (or deleted) under ``(no role)``.

Every figure comes from two GROUP BY queries (inference and trainings by day, owner and endpoint) plus one for the
memberships when grouping by role: the cost does not grow with the number of jobs. This module reads the jobs of
two apps and the roles of a third, which is why it lives beside the dashboard (DESIGN.md §2).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Count, F, Q, Sum, Value
from django.db.models.functions import Coalesce, Concat, TruncDate
from django.utils import timezone

from apps.accounts.models import Quota, User, quota_of, quotas_of
from apps.inference.choices import TERMINAL
from apps.inference.models import InferenceJob
from apps.training.choices import TERMINAL_TRAINING
from apps.training.models import TrainingJob
from esd.api.errors import BadRequest

GROUPINGS = ("user", "role", "endpoint", "day")
NO_ROLE = "(no role)"
TRAINING_ENDPOINT = "training:"  # + the training's backend


# --- the period ------------------------------------------------------------------------------------------------------


def server_tz():
    """The zone whose days usage and quotas count in: settings ``TIME_ZONE``."""
    return timezone.get_default_timezone()


def today() -> date:
    return timezone.localdate(timezone.now(), server_tz())


def day_start(day: date) -> datetime:
    """Midnight of ``day`` in the server's zone, as an aware datetime (right across DST changes with zoneinfo)."""
    return datetime.combine(day, time.min, tzinfo=server_tz())


@dataclass(frozen=True)
class Period:
    """Whole server days, both ends included."""

    since: date
    until: date

    def __post_init__(self) -> None:
        if self.until < self.since:
            raise BadRequest(f"the period ends ({self.until}) before it starts ({self.since})")

    @property
    def bounds(self) -> tuple[datetime, datetime]:
        return day_start(self.since), day_start(self.until + timedelta(days=1))

    @property
    def days(self) -> list[date]:
        return [self.since + timedelta(days=n) for n in range((self.until - self.since).days + 1)]


# --- the figures -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """GPU-seconds of one (day, owner, endpoint, kind): the finest grain every grouping is summed from."""

    day: date
    owner: str
    endpoint: str
    kind: str  # "inference" | "training"
    gpu_seconds: float
    jobs: int


@dataclass
class Row:
    """One group's totals."""

    key: str
    gpu_seconds: float = 0.0
    inference_jobs: int = 0
    trainings: int = 0

    def add(self, cell: Cell) -> None:
        self.gpu_seconds += cell.gpu_seconds
        if cell.kind == "inference":
            self.inference_jobs += cell.jobs
        else:
            self.trainings += cell.jobs


def cells(period: Period, owner: str | None = None) -> list[Cell]:
    """The period's jobs summed by day, owner and endpoint: one GROUP BY query per kind of job."""
    start, end = period.bounds
    tz = server_tz()
    inference = InferenceJob.objects.filter(complete_time__gte=start, complete_time__lt=end)
    trainings = TrainingJob.objects.filter(finished__gte=start, finished__lt=end, status__in=TERMINAL_TRAINING)
    if owner is not None:
        inference, trainings = inference.filter(owner=owner), trainings.filter(owner=owner)
    found: list[Cell] = []
    rows = (
        inference.annotate(day=TruncDate("complete_time", tzinfo=tz), where=F("endpoint_name"))
        .values("day", "owner", "where")
        .annotate(seconds=Coalesce(Sum("gpu_seconds"), Value(0.0)), n=Count("id"))
        .values_list("day", "owner", "where", "seconds", "n")
    )
    found += [Cell(day, who, where or "(none)", "inference", float(s), n) for day, who, where, s, n in rows]
    rows = (
        trainings.annotate(day=TruncDate("finished", tzinfo=tz), where=Concat(Value(TRAINING_ENDPOINT), "backend"))
        .values("day", "owner", "where")
        .annotate(seconds=Coalesce(Sum("gpu_seconds"), Value(0.0)), n=Count("id"))
        .values_list("day", "owner", "where", "seconds", "n")
    )
    found += [Cell(day, who, where, "training", float(s), n) for day, who, where, s, n in rows]
    return found


def roles_of_owners(owners: set[str]) -> dict[str, list[str]]:
    """The roles each owner holds now, in one query (owners are usernames on the job rows)."""
    table: dict[str, list[str]] = defaultdict(list)
    memberships = User.groups.through.objects.filter(user__username__in=owners)
    for username, role in memberships.values_list("user__username", "group__name"):
        table[username].append(role)
    return table


def keys_of(cell: Cell, by: str, roles: dict[str, list[str]]) -> list[str]:
    """The group(s) a cell counts in: one, except by role, where it counts in each of the owner's roles."""
    if by == "user":
        return [cell.owner]
    if by == "endpoint":
        return [cell.endpoint]
    if by == "day":
        return [cell.day.isoformat()]
    if by == "role":
        return sorted(roles.get(cell.owner) or [NO_ROLE])
    raise BadRequest(f"cannot group usage by {by!r}: the groupings are {', '.join(GROUPINGS)}")


@dataclass
class Usage:
    """A period's usage grouped one way: totals per group (largest first) and per day per group (the chart)."""

    period: Period
    by: str
    rows: list[Row]
    total: Row  # the whole period: every job once, also by role (where rows may overlap)
    per_day: dict[date, dict[str, float]] = field(default_factory=dict)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([self.by, "gpu_seconds", "inference_jobs", "trainings"])
        for row in self.rows:
            writer.writerow([row.key, f"{row.gpu_seconds:.3f}", row.inference_jobs, row.trainings])
        return out.getvalue()


def usage(period: Period, by: str, owner: str | None = None) -> Usage:
    """Usage in ``period`` grouped ``by`` user, role, endpoint or day; ``owner`` limits it to one user's jobs."""
    if by not in GROUPINGS:
        raise BadRequest(f"cannot group usage by {by!r}: the groupings are {', '.join(GROUPINGS)}")
    found = cells(period, owner)
    roles = roles_of_owners({c.owner for c in found}) if by == "role" else {}
    rows: dict[str, Row] = {}
    per_day: dict[date, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    total = Row("total")
    for cell in found:
        total.add(cell)
        for key in keys_of(cell, by, roles):
            rows.setdefault(key, Row(key)).add(cell)
            per_day[cell.day][key] += cell.gpu_seconds
    ordered = sorted(rows.values(), key=lambda r: (r.key,) if by == "day" else (-r.gpu_seconds, r.key))
    return Usage(period, by, ordered, total, {day: dict(groups) for day, groups in per_day.items()})


# --- the chart -------------------------------------------------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT = 1000, 220
CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 64, 12, 12, 28
CHART_SERIES = 8  # the largest groups get a colour each; the rest are stacked as "other"
PALETTE = ("#2f6fde", "#e07b39", "#3aa676", "#c94f6d", "#8a63d2", "#d4a72c", "#4bb3c8", "#7a8699", "#b9bfcc")
OTHER = "other"


def chart(result: Usage) -> dict[str, Any] | None:
    """GPU-seconds per day as stacked bars in SVG coordinates, computed here so the page needs no chart library
    (as the training page's loss curve). None when nothing was used."""
    if not result.rows or result.total.gpu_seconds <= 0:
        return None
    series = [row.key for row in sorted(result.rows, key=lambda r: -r.gpu_seconds)[:CHART_SERIES]]
    shown = set(series)
    days = result.period.days
    stacks = []
    for day in days:
        groups = result.per_day.get(day, {})
        values = [(key, groups.get(key, 0.0)) for key in series]
        other = sum(v for k, v in groups.items() if k not in shown)
        if other:
            values.append((OTHER, other))
        stacks.append((day, values))
    high = max((sum(v for _, v in values) for _, values in stacks), default=0.0) or 1.0
    inner_w = CHART_WIDTH - CHART_LEFT - CHART_RIGHT
    inner_h = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    slot = inner_w / len(days)
    width = max(slot * 0.8, 1.0)
    colours = {key: PALETTE[i % len(PALETTE)] for i, key in enumerate(series)} | {OTHER: PALETTE[-1]}
    bars = []
    for index, (day, values) in enumerate(stacks):
        y = float(CHART_TOP + inner_h)
        x = CHART_LEFT + index * slot + (slot - width) / 2
        for key, value in values:
            if value <= 0:
                continue
            height = value / high * inner_h
            y -= height
            bars.append(
                {
                    "x": round(x, 1),
                    "y": round(y, 1),
                    "width": round(width, 1),
                    "height": round(height, 1),
                    "colour": colours[key],
                    "title": f"{day.isoformat()} {key}: {value:.1f} GPU-seconds",
                }
            )
    every = max(1, len(days) // 10)  # at most about ten day labels
    labels = [
        {"x": round(CHART_LEFT + i * slot + slot / 2, 1), "text": day.strftime("%m-%d")}
        for i, day in enumerate(days)
        if i % every == 0
    ]
    legend = [{"key": key, "colour": colours[key]} for key in series]
    if any(k == OTHER for _, values in stacks for k, _ in values):
        legend.append({"key": OTHER, "colour": colours[OTHER]})
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "left": CHART_LEFT,
        "right": CHART_WIDTH - CHART_RIGHT,
        "top": CHART_TOP,
        "bottom": CHART_HEIGHT - CHART_BOTTOM,
        "label_y": CHART_HEIGHT - 8,
        "high": f"{high:.0f}",
        "bars": bars,
        "labels": labels,
        "legend": legend,
        "days": len(days),
    }


# --- quotas ----------------------------------------------------------------------------------------------------------


def running_jobs(owners: list[str]) -> dict[str, int]:
    """Unfinished inference jobs plus trainings per owner (what the concurrent-jobs limit counts): two queries."""
    counts: dict[str, int] = defaultdict(int)
    jobs = InferenceJob.objects.filter(owner__in=owners).exclude(status__in=TERMINAL)
    for who, n in jobs.values("owner").annotate(n=Count("id")).values_list("owner", "n"):
        counts[who] += n
    trainings = TrainingJob.objects.filter(owner__in=owners).exclude(status__in=TERMINAL_TRAINING)
    for who, n in trainings.values("owner").annotate(n=Count("id")).values_list("owner", "n"):
        counts[who] += n
    return counts


def used_today(owners: list[str]) -> dict[str, float]:
    """GPU-seconds of the jobs each owner's ended today (the server's day): two queries."""
    start = day_start(today())
    used: dict[str, float] = defaultdict(float)
    for model, ended in ((InferenceJob, "complete_time"), (TrainingJob, "finished")):
        rows = (
            model.objects.filter(Q(owner__in=owners), **{f"{ended}__gte": start})
            .values("owner")
            .annotate(s=Coalesce(Sum("gpu_seconds"), Value(0.0)))
            .values_list("owner", "s")
        )
        for who, seconds in rows:
            used[who] += float(seconds)
    return used


def check_quota(user: User) -> None:
    """Refuse a new job (inference or training) to a user at a limit of their roles' quota, naming the limit.

    Called by the one place each kind of job is created, inside its transaction: the user's row is locked first,
    so two requests of the same user cannot both pass at the last free slot. A limit is reached *at* it: with 3
    of 3 jobs running, or 3600 of 3600 GPU-seconds used today, the next job is refused. GPU time counts when a job
    ends, so jobs running now may take a user past the daily limit; the next one is then refused.
    """
    quota = quota_of(user)
    if not quota.limited:
        return
    if transaction.get_connection().in_atomic_block:
        list(User.objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True))
    if quota.concurrent_jobs is not None:
        running = running_jobs([user.username]).get(user.username, 0)
        if running >= quota.concurrent_jobs:
            raise BadRequest(
                f"quota exceeded: {running} of {quota.concurrent_jobs} concurrent jobs running "
                f"(role {quota.concurrent_role})"
            )
    if quota.gpu_seconds_per_day is not None:
        used = used_today([user.username]).get(user.username, 0.0)
        if used >= quota.gpu_seconds_per_day:
            raise BadRequest(
                f"quota exceeded: {round(used, 1)} of {quota.gpu_seconds_per_day} GPU-seconds used today "
                f"(role {quota.gpu_role})"
            )


@dataclass(frozen=True)
class QuotaUse:
    """One limited user's use of their quota, for the dashboard."""

    username: str
    quota: Quota
    used: float
    running: int

    @property
    def gpu_share(self) -> float | None:
        limit = self.quota.gpu_seconds_per_day
        return None if limit is None else (self.used / limit if limit else 1.0)

    @property
    def running_share(self) -> float | None:
        limit = self.quota.concurrent_jobs
        return None if limit is None else (self.running / limit if limit else 1.0)

    @property
    def share(self) -> float:
        return max(self.gpu_share or 0.0, self.running_share or 0.0)

    @property
    def at_limit(self) -> bool:
        return self.share >= 1.0


NEAR = 0.8  # the dashboard lists users at 80 % of a limit or more


def quota_use(limit: int = 20, near: float = NEAR) -> list[QuotaUse]:
    """Users with a quota at ``near`` of a limit or beyond, fullest first: five queries whatever the user count."""
    limited = quotas_of()
    names = [username for username, _ in limited.values()]
    if not names:
        return []
    used, running = used_today(names), running_jobs(names)
    uses = [QuotaUse(name, quota, used.get(name, 0.0), running.get(name, 0)) for name, quota in limited.values()]
    close = [use for use in uses if use.share >= near]
    return sorted(close, key=lambda use: (-use.share, use.username))[:limit]
