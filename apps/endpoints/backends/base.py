"""What every endpoint backend provides (SageMaker, self-hosted GPU workers).

The lifecycle rules live in ``apps.endpoints.lifecycle``; a backend only does the remote work and reports what it
sees as a ``RemoteStatus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from apps.endpoints.models import Endpoint


# Remote states a backend can report besides SageMaker's own EndpointStatus values.
GONE = "Gone"  # the endpoint vanished outside ESD Server
NO_WORKERS = "NoWorkers"  # self-hosted: nobody heard from within the heartbeat TTL
STARTUP_TIMEOUT = "StartupTimeout"  # self-hosted: no worker ever came within the startup timeout


@dataclass(frozen=True)
class RemoteStatus:
    """What the backend sees now: a state (SageMaker's ``EndpointStatus`` or one of the constants above), the
    running instance count, and a failure reason when there is one."""

    state: str
    instances: int = 0
    reason: str = ""


class BackendError(Exception):
    """A remote refusal about a request the caller shaped: answered 400 with ``message`` (contract §5.2)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class EndpointBackend(Protocol):
    name: str

    def configured(self) -> bool:
        """Whether this deployment can use the backend at all (settings present)."""

    def provision(self, endpoint: Endpoint) -> None:
        """Create the remote endpoint; undo partial work and raise ``BackendError`` on refusal."""

    def describe(self, endpoint: Endpoint) -> RemoteStatus: ...

    def enable_autoscaling(self, endpoint: Endpoint) -> None:
        """Configure scaling on the first ``InService`` (only when the endpoint asked for it)."""

    def teardown(self, endpoint: Endpoint) -> None:
        """Remove everything remote; tolerant of what is already gone."""
