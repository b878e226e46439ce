"""Contract §10.2, row by row, on the pure ``transition`` function."""

import pytest

from apps.endpoints.backends.base import GONE, NO_WORKERS, STARTUP_TIMEOUT, RemoteStatus
from apps.endpoints.lifecycle import ENABLE_AUTOSCALING, FAIL_JOBS, MARK_READY, Current, transition


def run(status: str, remote: str, *, ready=False, autoscaling=False, instances=1, reason=""):
    return transition(Current(status, ready, autoscaling), RemoteStatus(remote, instances, reason))


def test_creating_to_in_service_marks_ready():
    outcome = run("Creating", "InService", instances=2)
    assert (outcome.status, outcome.instances, outcome.effects, outcome.error) == ("InService", 2, (MARK_READY,), "")


def test_first_in_service_enables_autoscaling_when_asked():
    assert run("Creating", "InService", autoscaling=True).effects == (MARK_READY, ENABLE_AUTOSCALING)


def test_later_in_service_has_no_effects():
    assert run("Updating", "InService", ready=True, autoscaling=True).effects == ()
    assert run("InService", "InService", ready=True, autoscaling=True).effects == ()


def test_creating_stays_creating():
    assert run("Creating", "Creating", instances=0).status == "Creating"


def test_creating_failed_records_the_reason():
    outcome = run("Creating", "Failed", instances=0, reason="CannotStartContainerError")
    assert (outcome.status, outcome.error) == ("Failed", "CannotStartContainerError")


def test_failed_without_reason_gets_one():
    assert run("Creating", "Failed", instances=0).error == "SageMaker reports Failed"


@pytest.mark.parametrize("remote", ["Updating", "SystemUpdating"])
def test_in_service_updating_and_back(remote):
    assert run("InService", remote, ready=True).status == "Updating"
    assert run("Updating", "InService", ready=True).status == "InService"


@pytest.mark.parametrize("current", ["InService", "Updating", "RollingBack"])
def test_rolling_back_from_serving_states(current):
    assert run(current, "RollingBack", ready=True).status == "RollingBack"


def test_rolling_back_ends_in_service_or_failed():
    assert run("RollingBack", "InService", ready=True).status == "InService"
    assert run("RollingBack", "Failed", ready=True, reason="x").status == "Failed"


def test_rolling_back_while_creating_keeps_creating():
    assert run("Creating", "RollingBack").status == "Creating"


@pytest.mark.parametrize("remote", ["OutOfService", "UpdateRollbackFailed"])
def test_out_of_service_and_rollback_failure_are_failed(remote):
    assert run("InService", remote, ready=True).status == "Failed"


def test_deleting_remotely():
    outcome = run("InService", "Deleting", ready=True, instances=3)
    assert (outcome.status, outcome.instances) == ("Deleting", 0)


@pytest.mark.parametrize("current", ["Creating", "InService", "Updating", "Failed", "Deleting"])
def test_vanished_outside_is_deleted_and_fails_jobs(current):
    outcome = run(current, GONE, instances=0)
    assert (outcome.status, outcome.instances, outcome.effects) == ("Deleted", 0, (FAIL_JOBS,))


def test_deleted_is_terminal():
    assert run("Deleted", "InService").status == "Deleted"


def test_self_hosted_first_heartbeat_and_recovery_from_failed():
    assert run("Creating", "InService").status == "InService"
    outcome = run("Failed", "InService", ready=False)
    assert (outcome.status, outcome.error) == ("InService", "")


@pytest.mark.parametrize("current", ["Creating", "InService", "Failed"])
def test_self_hosted_silence_keeps_the_status_at_zero(current):
    outcome = run(current, NO_WORKERS, instances=0)
    assert (outcome.status, outcome.instances, outcome.error) == (current, 0, None)


def test_self_hosted_startup_timeout_fails_only_a_creating_endpoint():
    outcome = run("Creating", STARTUP_TIMEOUT, instances=0, reason="no worker")
    assert (outcome.status, outcome.error) == ("Failed", "no worker")
    assert run("InService", STARTUP_TIMEOUT, ready=True).status == "InService"


def test_unknown_remote_state_keeps_ours():
    assert run("InService", "SomethingNew", ready=True, instances=4).status == "InService"
