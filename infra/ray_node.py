"""Ray worker nodes beside the local stack's head, on the same machine: the drills of a changing cluster.

    python -m infra.ray_node start RAY_START_ARGS...     `ray start --address …` for one more node
    python -m infra.ray_node wait ADDRESS NAME SECONDS   until the head has it (exit 1 if not in time)
    python -m infra.ray_node drain ADDRESS NAME SECONDS  drain it as a preemption would, with that deadline

Both run with the cluster's token in the environment (`Stack.add_node` and `Stack.drain_node` start them).
A node joining a head on 127.0.0.1 needs Ray's multi-node switch, which also makes Ray rewrite the
head's loopback address to the host's public one, where the head does not listen: the rewrite is
turned off here, in this process only.
"""

from __future__ import annotations

import sys
import time


def _start(args: list[str]) -> None:
    from ray._private import services

    services.resolve_ip_for_localhost = lambda host: host
    from ray.scripts.scripts import main

    sys.argv = ["ray", "start", *args]
    main()


def _alive(gcs) -> dict[str, object]:
    """Alive nodes by name → node id."""
    return {info.node_name: node_id for node_id, info in gcs.get_all_node_info().items() if info.state == 0}


def _wait(address: str, name: str, seconds: float) -> None:
    from ray._raylet import GcsClient

    gcs, deadline = GcsClient(address=address), time.monotonic() + seconds
    while name not in _alive(gcs):
        if time.monotonic() > deadline:
            sys.exit(f"Ray node {name} did not join the cluster at {address} in {seconds:.0f} s")
        time.sleep(0.5)


def _drain(address: str, name: str, seconds: float) -> None:
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    gcs = GcsClient(address=address)
    alive = _alive(gcs)
    if name not in alive:
        sys.exit(f"no alive Ray node named {name!r} at {address} (alive: {', '.join(sorted(alive))})")
    accepted, why = gcs.drain_node(alive[name].hex(), autoscaler_pb2.DrainNodeReason.Value(
        "DRAIN_NODE_REASON_PREEMPTION"), "compound drill", int((time.time() + seconds) * 1000))
    if not accepted:
        sys.exit(f"Ray refused to drain node {name}: {why}")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "start":
        _start(rest)
    else:
        {"wait": _wait, "drain": _drain}[command](rest[0], rest[1], float(rest[2]))
