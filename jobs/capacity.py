"""Can the cluster ever hold a job's workers at once? Its alive nodes, and the node groups its autoscaler
may add, counted in workers of the job's size (`compound job submit` and a sweep's concurrency check)."""

from __future__ import annotations

import logging
import math
import socket

from jobs.spec import JobSpec

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


def autoscaling_groups(gcs_address: str) -> list[tuple[dict[str, float], int]]:
    """The node groups the cluster's autoscaler may add: (resources of one node, most nodes; -1: no
    limit). None configured (the local stack), or the config cannot be read: []."""
    host, _, port = gcs_address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
        from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE, GcsClient
        from ray.core.generated import autoscaler_pb2

        data = GcsClient(address=gcs_address).internal_kv_get(
            GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode(), timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - without it the check counts the alive nodes, as documented
        log.info("could not read the autoscaling config at %s (%s): counting the alive nodes only", gcs_address,
                 first_line(error))
        return []
    if not data:
        return []
    config = autoscaler_pb2.ClusterConfig.FromString(data)
    return [(dict(group.resources), group.max_count) for group in config.node_group_configs]


def worker_slots(spec: JobSpec, nodes: list[dict[str, float]],
                 groups: list[tuple[dict[str, float], int]] = ()) -> int | None:
    """How many of the job's workers the alive nodes, and any the autoscaler may add, hold at once
    (None: no limit)."""
    need = spec.scaling.worker_resources

    def workers_on(node: dict[str, float]) -> int:
        return min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in need.items())

    room = sum(workers_on(node) for node in nodes)
    for resources, most in groups:
        if workers_on(resources) > 0:
            if most < 0:
                return None
            room += most * workers_on(resources)
    return room


def job_needs(spec: JobSpec) -> dict[str, float]:
    """What the job's workers hold together when it starts (an elastic job: its fewest)."""
    return scaled(spec.scaling.worker_resources, spec.scaling.min_workers)


def scaled(resources: dict[str, float], times: int) -> dict[str, float]:
    return {name: amount * times for name, amount in resources.items()}


def fits(spec: JobSpec, nodes: list[dict[str, float]],
         groups: list[tuple[dict[str, float], int]] = ()) -> str | None:
    """Why the alive nodes, and any the autoscaler may add, can never hold the job's workers at once;
    None if they can."""
    room = worker_slots(spec, nodes, groups)
    scaling = spec.scaling
    if room is None or room >= scaling.min_workers:  # an elastic job starts with its fewest
        return None
    need = spec.scaling.worker_resources
    wanted = ", ".join(_amount(name, amount) for name, amount in need.items())
    totals = ", ".join(_amount(name, sum(node.get(name, 0.0) for node in nodes)) for name in need)
    scaled = " and the node groups its autoscaler may add" if groups else ""
    return (f"it needs {scaling.min_workers} workers of {wanted} each, and its {len(nodes)} node(s){scaled} hold at "
            f"most {room} (alive now: {totals}); lower scaling.num_workers or the resources per worker, or add nodes")


def _amount(name: str, value: float) -> str:
    if name == "memory":
        return f"{value / 2**30:g} GiB memory"
    return f"{value:g} {name}"


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:300]
