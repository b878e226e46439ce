"""GPU-seconds accounting (apps.endpoints.usage): totals by user, role, endpoint and day equal the sum of the jobs'
``gpu_seconds``, counted on the server's day of each job's end; the report command, the console page and its chart.

The rows are made as the services leave them when jobs end (``gpu_seconds`` and the end time set); how they get
filled from real runs is tested in tests/training/test_training_accounting.py and tests/esd/test_metrics.py."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.accounts.models import RoleQuota
from apps.endpoints import usage
from apps.inference.models import InferenceJob
from apps.training.models import TrainingJob
from tests.conftest import make_role, make_user

pytestmark = pytest.mark.django_db

ZONE = "Europe/Berlin"  # not UTC, so a wrong day boundary shows
BERLIN = ZoneInfo(ZONE)
DAY1, DAY2, DAY3 = date(2026, 3, 2), date(2026, 3, 3), date(2026, 3, 4)


def at(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=BERLIN)


def inference(owner: str, endpoint: str, ended: datetime | None, seconds: float | None, status: str = "succeed"):
    return InferenceJob.objects.create(
        task_type="txt2img",
        inference_type="Async",
        owner=owner,
        endpoint_name=endpoint,
        status=status,
        complete_time=ended,
        gpu_seconds=seconds,
    )


def training(
    owner: str, ended: datetime | None, seconds: float | None, status: str = "Completed", backend="self-hosted"
):
    return TrainingJob.objects.create(
        id=uuid.uuid4(), owner=owner, backend=backend, status=status, finished=ended, gpu_seconds=seconds, params={}
    )


@pytest.fixture
def jobs(settings):
    """Two teams; carol is in both; dave has no role. Jobs just either side of midnight in Berlin."""
    settings.TIME_ZONE = ZONE
    make_role("artists", ["inference:all"])
    make_role("trainers", ["train:all"])
    make_user("alice", roles=("artists",))
    make_user("bob", roles=("trainers",))
    make_user("carol", roles=("artists", "trainers"))
    made = [
        inference("alice", "ep-a", at(DAY1, 23, 59, 59), 10.0),  # DAY1 in Berlin (22:59:59 UTC)
        inference("alice", "ep-a", at(DAY2, 0, 0, 0), 2.5),  # DAY2 in Berlin, still DAY1 in UTC
        inference("alice", "ep-b", at(DAY2, 12), 1.5, status="failed"),  # failed jobs used the GPU too
        inference("bob", "ep-b", at(DAY2, 13), 4.0),
        inference("carol", "ep-a", at(DAY3, 9), 8.0),
        inference("dave", "ep-b", at(DAY3, 10), 0.5),
        inference("carol", "ep-a", at(DAY3, 11), None, status="failed"),  # nothing reported: counts, adds 0
        training("bob", at(DAY2, 18), 100.0),
        training("carol", at(DAY3, 20), 50.0, status="Stopped", backend="sagemaker"),
    ]
    # outside the period, or not ended: never counted
    inference("alice", "ep-a", at(DAY1 - timedelta(days=1), 23, 59), 1000.0)
    inference("alice", "ep-a", at(DAY3 + timedelta(days=1), 0, 0), 1000.0)
    inference("alice", "ep-a", None, None, status="inprogress")
    training("bob", None, None, status="Training")
    return made


def expected(made, key) -> dict[str, float]:
    """The sum of the jobs' gpu_seconds per group, computed from the rows one by one."""
    sums: dict[str, float] = {}
    for job in made:
        for k in key(job):
            sums[k] = sums.get(k, 0.0) + (job.gpu_seconds or 0.0)
    return sums


def ended_day(job) -> str:
    ended = job.complete_time if isinstance(job, InferenceJob) else job.finished
    return timezone.localtime(ended, BERLIN).date().isoformat()


ROLES = {"alice": ["artists"], "bob": ["trainers"], "carol": ["artists", "trainers"], "dave": ["(no role)"]}


@pytest.mark.parametrize(
    "by, key",
    [
        ("user", lambda job: [job.owner]),
        ("endpoint", lambda job: [job.endpoint_name if isinstance(job, InferenceJob) else f"training:{job.backend}"]),
        ("day", lambda job: [ended_day(job)]),
        ("role", lambda job: ROLES[job.owner]),
    ],
)
def test_totals_equal_the_sum_of_the_jobs(jobs, by, key):
    result = usage.usage(usage.Period(DAY1, DAY3), by)
    assert {row.key: row.gpu_seconds for row in result.rows} == pytest.approx(expected(jobs, key))
    assert result.total.gpu_seconds == pytest.approx(sum(job.gpu_seconds or 0 for job in jobs))
    assert result.total.inference_jobs == 7 and result.total.trainings == 2
    if by != "role":  # every job in exactly one group
        assert sum(row.gpu_seconds for row in result.rows) == pytest.approx(result.total.gpu_seconds)
        assert sum(row.inference_jobs + row.trainings for row in result.rows) == 9


def test_day_boundaries_follow_the_server_time_zone(jobs, settings):
    by_day = {row.key: row.gpu_seconds for row in usage.usage(usage.Period(DAY1, DAY3), "day").rows}
    assert by_day == {"2026-03-02": 10.0, "2026-03-03": 2.5 + 1.5 + 4.0 + 100.0, "2026-03-04": 8.0 + 0.5 + 50.0}
    one_day = usage.usage(usage.Period(DAY2, DAY2), "user")
    assert {row.key: row.gpu_seconds for row in one_day.rows} == {"bob": 104.0, "alice": 4.0}

    settings.TIME_ZONE = "UTC"  # the same jobs on UTC days: the one at Berlin's midnight moves to DAY1
    by_day = {row.key: row.gpu_seconds for row in usage.usage(usage.Period(DAY1, DAY3), "day").rows}
    assert by_day["2026-03-02"] == 12.5


def test_a_user_in_two_roles_counts_in_both(jobs):
    rows = {row.key: row for row in usage.usage(usage.Period(DAY3, DAY3), "role").rows}
    # carol's job (8) and training (50) in each of her roles; the whole day once
    assert rows["artists"].gpu_seconds == rows["trainers"].gpu_seconds == 58.0
    assert rows["artists"].trainings == rows["trainers"].trainings == 1 and rows["(no role)"].gpu_seconds == 0.5
    assert usage.usage(usage.Period(DAY3, DAY3), "role").total.gpu_seconds == 58.5


def test_one_users_own_usage(jobs):
    mine = usage.usage(usage.Period(DAY1, DAY3), "endpoint", owner="carol")
    assert {row.key: row.gpu_seconds for row in mine.rows} == {"training:sagemaker": 50.0, "ep-a": 8.0}
    assert mine.total.inference_jobs == 2 and mine.total.trainings == 1


@pytest.mark.parametrize("by, queries", [("user", 2), ("endpoint", 2), ("day", 2), ("role", 3)])
def test_queries_do_not_grow_with_the_jobs(jobs, by, queries):
    period = usage.Period(DAY1, DAY3)
    with CaptureQueriesContext(connection) as few:
        usage.usage(period, by)
    for n in range(40):
        inference(f"user{n % 7}", f"ep-{n % 3}", at(DAY2, 8, n), 1.0)
        training("alice", at(DAY3, 8, n), 2.0)
    with CaptureQueriesContext(connection) as many:
        result = usage.usage(period, by)
    assert len(few) == len(many) == queries
    assert result.total.gpu_seconds == pytest.approx(sum(j.gpu_seconds or 0 for j in jobs) + 40 * 3.0)


def test_an_unknown_grouping_or_reversed_period_is_refused():
    with pytest.raises(usage.BadRequest, match="cannot group usage by 'team'"):
        usage.usage(usage.Period(DAY1, DAY2), "team")
    with pytest.raises(usage.BadRequest, match="ends"):
        usage.Period(DAY2, DAY1)


# --- the report command ----------------------------------------------------------------------------------------------


def test_usage_report_csv_and_table(jobs):
    out = io.StringIO()
    call_command("usage_report", "--since", "2026-03-02", "--until", "2026-03-04", "--by", "user", "--csv", stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == ["user", "gpu_seconds", "inference_jobs", "trainings"]
    table = {row["user"]: float(row["gpu_seconds"]) for row in rows}
    assert table == pytest.approx(expected(jobs, lambda job: [job.owner]))
    assert rows[0]["user"] == "bob"  # largest first
    assert {row["user"]: int(row["trainings"]) for row in rows}["bob"] == 1

    out = io.StringIO()
    call_command("usage_report", "--since", "2026-03-02", "--until", "2026-03-04", "--by", "endpoint", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["endpoint", "gpu_seconds", "inference_jobs", "trainings"]
    assert lines[-1].split() == ["total", "176.5", "7", "2"]  # 10 + 2.5 + 1.5 + 4 + 8 + 0.5 + 100 + 50
    assert any(line.split()[:2] == ["training:self-hosted", "100.0"] for line in lines)


def test_usage_report_refuses_bad_input(jobs):
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="not a day"):
        call_command("usage_report", "--since", "yesterday")
    with pytest.raises(CommandError, match="ends"):
        call_command("usage_report", "--since", "2026-03-04", "--until", "2026-03-02")


# --- the console page ------------------------------------------------------------------------------------------------


def test_usage_page_draws_the_chart_for_operators(jobs, admin, client):
    client.force_login(admin)
    page = client.get("/usage/", {"since": "2026-03-02", "until": "2026-03-04", "by": "user"})
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="usage-chart"' in html and html.count('<rect class="bar"') == 5  # alice on 2 days, bob, carol, dave
    assert "2026-03-03 bob: 104.0 GPU-seconds" in html
    assert 'id="usage-total"><th>total</th><th>176.5</th>' in html
    for name in ("alice", "bob", "carol", "dave"):
        assert f"<td>{name}</td>" in html

    by_role = client.get("/usage/", {"since": "2026-03-02", "until": "2026-03-04", "by": "role"}).content.decode()
    assert "<td>artists</td>" in by_role and "<td>(no role)</td>" in by_role

    download = client.get("/usage/", {"since": "2026-03-02", "until": "2026-03-04", "by": "day", "format": "csv"})
    assert download["Content-Type"].startswith("text/csv")
    assert download.content.decode().splitlines()[1] == "2026-03-02,10.000,1,0"

    bad = client.get("/usage/", {"since": "2026-03-04", "until": "2026-03-02"})
    assert bad.status_code == 400 and "ends before it starts" in bad.content.decode()
    assert client.get("/usage/", {"by": "team"}).status_code == 400


def test_usage_page_shows_others_only_their_own(jobs, client):
    carol = make_user("carol2", roles=("artists",), password="carol-password-1")
    inference("carol2", "ep-a", at(DAY2, 10), 7.0)
    RoleQuota.objects.create(role_id=carol.groups.get().pk, gpu_seconds_per_day=3600, concurrent_jobs=2)
    client.force_login(carol)
    html = client.get("/usage/", {"since": "2026-03-01", "until": "2026-03-05", "user": "alice"}).content.decode()
    assert "<td>ep-a</td><td>7.0</td>" in html  # by endpoint by default, and only carol2's job
    assert "alice" not in html and "176.5" not in html
    assert 'id="my-quota"' in html and "of 3600 GPU-seconds used today (role artists)" in html
    assert "0 of 2 concurrent jobs running (role artists)" in html


def test_empty_period_has_no_chart(admin, client):
    client.force_login(admin)
    html = client.get("/usage/").content.decode()
    assert 'id="usage-empty"' in html and 'id="usage-chart"' not in html
