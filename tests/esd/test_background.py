"""Background work through the configured broker: in-process (embedded) or Redis/RabbitMQ (CI sets Redis)."""

import os
import time
import uuid

import dramatiq
import pytest
from django.conf import settings
from django.db import connection, transaction
from dramatiq import Worker

from apps.accounts.models import User
from esd import tasks
from tests.conftest import stop_worker

pytestmark = pytest.mark.django_db(transaction=True)  # worker threads must see committed rows


@pytest.fixture
def worker_and_actor():
    broker = dramatiq.get_broker()
    queue = f"esd-test-{uuid.uuid4().hex[:8]}"

    @dramatiq.actor(queue_name=queue, max_retries=0, time_limit=10_000, actor_name=f"mark_{queue}")
    def mark(user_id: int, value: str) -> None:
        User.objects.filter(pk=user_id).update(first_name=value)

    worker = Worker(broker, queues={queue}, worker_threads=1, worker_timeout=100)
    worker.start()
    yield mark
    stop_worker(worker)
    broker.flush(queue)


def wait_for_first_name(user_id: int, value: str, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if User.objects.filter(pk=user_id, first_name=value).exists():
            return True
        time.sleep(0.05)
    return False


def test_enqueue_sends_after_commit_and_a_worker_runs_it(worker_and_actor):
    user = User.objects.create(username="bg")
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(last_name="x")
        tasks.enqueue(worker_and_actor, user.pk, "done")
    assert wait_for_first_name(user.pk, "done")


def test_enqueue_in_a_rolled_back_transaction_sends_nothing(worker_and_actor):
    user = User.objects.create(username="bg2")
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.enqueue(worker_and_actor, user.pk, "never")
        raise RuntimeError("rollback")
    assert not wait_for_first_name(user.pk, "never", timeout=1)


def test_recover_unfinished_work_runs_every_registered_recoverer(db):
    calls = []

    @tasks.recoverer("test-ok")
    def ok() -> int:
        calls.append("ok")
        return 3

    @tasks.recoverer("test-broken")
    def broken() -> int:
        raise RuntimeError("boom")

    try:
        counts = tasks.recover_unfinished_work()
        assert counts["test-ok"] == 3 and counts["test-broken"] == -1
        assert calls == ["ok"]
    finally:
        tasks._RECOVERERS.pop("test-ok")
        tasks._RECOVERERS.pop("test-broken")


@pytest.mark.skipif(
    not os.environ.get("DRAMATIQ_BROKER_URL"),
    reason="DRAMATIQ_BROKER_URL is not set: the embedded in-process broker is in use (CI sets Redis)",
)
def test_configured_broker_is_the_real_one():
    broker = dramatiq.get_broker()
    url = settings.DRAMATIQ_BROKER_URL
    expected = "RedisBroker" if url.startswith(("redis", "unix")) else "RabbitmqBroker"
    assert type(broker).__name__ == expected


@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL"),
    reason="DATABASE_URL is not set: tests run on SQLite (CI also runs them on PostgreSQL)",
)
def test_configured_database_is_the_real_one():
    assert connection.vendor == "postgresql"
