"""Every endpoint lifecycle rule of contract §10.2, as one pure function.

``transition(current, remote)`` says what an endpoint's status becomes when its backend reports ``remote``, and
which side effects that change needs. It touches no database and no network, so each row of the table is a unit
test; the reconcile actor applies its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from apps.endpoints.backends.base import GONE, NO_WORKERS, STARTUP_TIMEOUT, RemoteStatus
from apps.endpoints.choices import EndpointStatus as S

# Effects, applied by apps.endpoints.services.apply_transition.
MARK_READY = "mark_ready"  # first InService: endTime
ENABLE_AUTOSCALING = "enable_autoscaling"  # first InService, when the endpoint asked for autoscaling
FAIL_JOBS = "fail_jobs"  # the endpoint is gone: its in-progress jobs cannot finish

_SAGEMAKER = {
    "Creating": S.CREATING,
    "InService": S.IN_SERVICE,
    "Updating": S.UPDATING,
    "SystemUpdating": S.UPDATING,
    "RollingBack": S.ROLLING_BACK,
    "Deleting": S.DELETING,
    "Failed": S.FAILED,
    "OutOfService": S.FAILED,
    "UpdateRollbackFailed": S.FAILED,
}


@dataclass(frozen=True)
class Current:
    """The parts of an endpoint the rules depend on."""

    status: str
    ready_before: bool  # endTime already set: it has been InService once
    autoscaling: bool


@dataclass(frozen=True)
class Outcome:
    """``error``: the reason to record, ``""`` to clear it, None to keep what is there."""

    status: str
    instances: int
    error: str | None
    effects: tuple[str, ...]


def transition(current: Current, remote: RemoteStatus) -> Outcome:
    """The new status, instance count, error and effects for an endpoint in ``current`` seeing ``remote``."""
    if current.status == S.DELETED:
        return Outcome(S.DELETED, 0, None, ())
    if remote.state == GONE:
        return Outcome(S.DELETED, 0, None, (FAIL_JOBS,))
    if remote.state == NO_WORKERS:
        # Self-hosted with nobody listening: a creating endpoint keeps waiting, a serving one stays InService at
        # "0" (its jobs wait in the queue), a failed one stays failed.
        return Outcome(current.status, 0, None, ())
    if remote.state == STARTUP_TIMEOUT:
        if current.status == S.CREATING:
            return Outcome(S.FAILED, 0, remote.reason, ())
        return Outcome(current.status, 0, None, ())
    new = _SAGEMAKER.get(remote.state)
    if new is None:  # a state this version does not know: keep ours, refresh the count
        return Outcome(current.status, remote.instances, None, ())
    if new == S.IN_SERVICE:
        effects: tuple[str, ...] = ()
        if not current.ready_before:
            effects = (MARK_READY, ENABLE_AUTOSCALING) if current.autoscaling else (MARK_READY,)
        return Outcome(S.IN_SERVICE, remote.instances, "", effects)
    if new == S.ROLLING_BACK and current.status not in (S.IN_SERVICE, S.UPDATING, S.ROLLING_BACK):
        return Outcome(current.status, remote.instances, None, ())
    if new == S.FAILED:
        return Outcome(S.FAILED, remote.instances, remote.reason or f"SageMaker reports {remote.state}", ())
    if new == S.DELETING:
        return Outcome(S.DELETING, 0, None, ())
    return Outcome(new, remote.instances, None, ())


TERMINAL = frozenset({S.DELETED})
# Statuses a monitor polls with back-off; the others are only re-checked by the periodic sweep.
SETTLING = frozenset({S.CREATING, S.UPDATING, S.ROLLING_BACK, S.DELETING})
