"""How many GPU workers a self-hosted endpoint should run: one rule shared by the console's hint, ``manage.py
endpoint_status`` and the KEDA ``ScaledObject`` that ``manage.py k8s_manifests`` renders.

KEDA hands the queue length to a HorizontalPodAutoscaler as an ``AverageValue`` metric, so the cluster runs
``ceil(backlog / target)`` workers clamped to ``[minReplicaCount, maxReplicaCount]``; the hint computes exactly that
with the same target and bounds, so the console and the cluster agree by construction.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apps.endpoints.models import Endpoint

# Queued jobs one worker is expected to keep up with (contract §12.2: ceil(backlog / 3)).
BACKLOG_PER_WORKER = 3


def backlog_per_worker(endpoint: Endpoint) -> int:
    """The target backlog per worker (KEDA's ``listLength`` / ``value``); the same for every endpoint today."""
    return BACKLOG_PER_WORKER


def replica_bounds(endpoint: Endpoint) -> tuple[int, int]:
    """(fewest, most) workers: the autoscaling range, or exactly ``initial_instance_count`` without autoscaling."""
    if endpoint.autoscaling:
        return endpoint.min_instance_number, endpoint.max_instance_number
    return endpoint.initial_instance_count, endpoint.initial_instance_count


def may_scale_to_zero(endpoint: Endpoint) -> bool:
    """Autoscaling down to no worker at all (SageMaker async endpoints at zero): such an endpoint serves with
    ``current_instance_count`` 0, its jobs wait in the queue, and no startup timeout applies."""
    return replica_bounds(endpoint)[0] == 0


def desired_workers(endpoint: Endpoint, backlog: int) -> int:
    """clamp(ceil(backlog / target), fewest, most): what KEDA's HPA computes for the endpoint's queue."""
    fewest, most = replica_bounds(endpoint)
    return max(fewest, min(most, math.ceil(max(backlog, 0) / backlog_per_worker(endpoint))))
