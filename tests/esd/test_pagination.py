"""Contract §6: keyset pages walk every row once, newest first, ties by id, one query per page."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.accounts.models import User
from esd.api.errors import BadRequest
from esd.api.pagination import keyset_page, numbered_page

pytestmark = pytest.mark.django_db


@pytest.fixture
def users():
    base = timezone.now()
    # Groups of three share a timestamp, so the id tie-breaker matters.
    User.objects.bulk_create(
        User(username=f"u{i:02d}", date_joined=base - timedelta(seconds=i // 3)) for i in range(25)
    )
    return User.objects.filter(username__startswith="u")


def test_keyset_walks_all_rows_in_order(users):
    expected = list(users.order_by("-date_joined", "-id").values_list("id", flat=True))
    seen, key, pages = [], None, 0
    while True:
        with CaptureQueriesContext(connection) as queries:
            page = keyset_page(users, order=("date_joined", "id"), limit=10, start_key=key)
        assert len(queries) == 1
        seen += [row.id for row in page.rows]
        pages += 1
        key = page.last_evaluated_key
        if key is None:
            break
    assert seen == expected
    assert pages == 3


def test_exact_multiple_has_no_empty_last_page(users):
    first = keyset_page(
        users.exclude(username__in=["u20", "u21", "u22", "u23", "u24"]),
        order=("date_joined", "id"),
        limit=10,
        start_key=None,
    )
    second = keyset_page(
        users.exclude(username__in=["u20", "u21", "u22", "u23", "u24"]),
        order=("date_joined", "id"),
        limit=10,
        start_key=first.last_evaluated_key,
    )
    assert len(second.rows) == 10
    assert second.last_evaluated_key is None


@pytest.mark.parametrize("token", ["%%%", "bm90IGpzb24", "WyJ4Il0", "WyJub3QgYSBkYXRlIiwgIjEiXQ"])
def test_unreadable_start_key(users, token):
    with pytest.raises(BadRequest) as caught:
        keyset_page(users, order=("date_joined", "id"), limit=10, start_key=token)
    assert caught.value.message == "exclusive_start_key is invalid"


def test_numbered_pages(users):
    page = numbered_page(users.order_by("username"), page=3, per_page=10)
    assert (page.total, page.pages, len(page.rows)) == (25, 3, 5)
    assert numbered_page(users, page=9, per_page=10).rows == []
    assert numbered_page(users.none(), page=1, per_page=10).pages == 0
    # An exact multiple: 20 rows are 2 pages (ESD reported 3).
    assert numbered_page(users.filter(username__lt="u20"), page=1, per_page=10).pages == 2
