"""The Usage page in a real browser: the per-day stacked bars are drawn (no chart library, nothing fetched from
the internet) and the grouping form changes them. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

from datetime import timedelta

import pytest

from apps.accounts.models import Role, RoleQuota
from apps.endpoints import usage
from apps.inference.models import InferenceJob
from tests.conftest import make_role, make_user
from tests.console.test_browser import (  # noqa: F401 - fixtures
    CHROMIUM,
    browser_type_launch_args,
    offline_page,
    shot,
    sign_in,
)

pytestmark = [
    pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
    pytest.mark.django_db(transaction=True),
]


def test_operator_sees_usage_by_user_and_by_role(offline_page, live_server):  # noqa: F811
    make_role("artists", ["inference:all"])
    make_role("trainers", ["train:all"])
    make_user("boss", roles=("IT Operator",), password="boss-password-1")
    for name, roles in (("alice", ("artists",)), ("bob", ("trainers",)), ("carol", ("artists", "trainers"))):
        make_user(name, roles=roles)
    RoleQuota.objects.create(role=Role.objects.get(name="artists"), gpu_seconds_per_day=12, concurrent_jobs=5)
    today = usage.day_start(usage.today()) + timedelta(hours=1)
    for days_ago in range(6):
        for index, name in enumerate(("alice", "bob", "carol")):
            InferenceJob.objects.create(
                task_type="txt2img",
                inference_type="Async",
                owner=name,
                endpoint_name=f"ep-{index % 2}",
                status="succeed",
                complete_time=today - timedelta(days=days_ago),
                gpu_seconds=10.0 * (index + 1) + days_ago,
            )
    page, base = offline_page, live_server.url
    sign_in(page, base, "boss", "boss-password-1")
    page.click("nav.menu >> text=Usage")
    page.wait_for_selector("#usage-chart")
    assert page.locator("#usage-chart rect.bar").count() == 18
    box = page.locator("#usage-chart rect.bar").first.bounding_box()
    assert box["width"] > 5 and box["height"] > 1
    assert "alice" in page.locator("#usage-legend").inner_text()
    shot(page, "usage-by-user")

    page.select_option("select[name=by]", "role")
    page.click("#usage-form button")
    page.wait_for_url("**by=role**")
    table = page.locator("#usage-table").inner_text()
    assert "artists" in table and "trainers" in table
    shot(page, "usage-by-role")

    page.goto(f"{base}/")
    # alice used 10 of 12 today; carol is also a trainer, a role without a quota, so she has no limit
    quota = page.locator("#quota-use").inner_text()
    assert "alice" in quota and "10.0 / 12" in quota and "carol" not in quota and "bob" not in quota
    shot(page, "dashboard-quota-use")
