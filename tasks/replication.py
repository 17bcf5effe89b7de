"""Tasks over a PostgresCluster's replication: thin, verb-first wrappers of the block's replication verbs."""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task

from blocks._pg_replication import ReplicaLag, ReplicaPromotion, Resync
from blocks.errors import PostgresError
from blocks.postgres import PostgresCluster
from tasks._policy import policy


@task(name="measure-replica-lag", **policy(timeout_seconds=60))
def measure_replica_lag(cluster: PostgresCluster, port: int, primary_port: int | None = None,
                        primary_lost_at: datetime | None = None) -> ReplicaLag:
    """How far the replica on ``port`` is behind, in bytes and seconds (an upper bound of the data loss)."""
    return cluster.replica_lag(port, primary_port, primary_lost_at)


@task(name="rank-replicas", **policy(timeout_seconds=120))
def rank_replicas(cluster: PostgresCluster, failed_port: int, primary_lost_at: datetime | None = None) -> list[ReplicaLag]:
    """The reachable standbys other than ``failed_port``, least behind first (unknown lag last)."""
    lags = []
    for inst in cluster.instances():
        if inst.port == failed_port or cluster.role(inst.port) != "standby":
            continue
        lags.append(cluster.replica_lag(inst.port, failed_port, primary_lost_at))
    return sorted(lags, key=lambda lag: (lag.seconds is None, lag.seconds or 0.0, lag.bytes or 0))


@task(name="read-roles", **policy(timeout_seconds=60))
def read_roles(cluster: PostgresCluster) -> dict[int, str]:
    """Port -> 'primary', 'standby' or 'unreachable' for every known instance."""
    return {inst.port: cluster.role(inst.port) for inst in cluster.instances()}


@task(name="list-writers", **policy(timeout_seconds=60))
def list_writers(cluster: PostgresCluster) -> list[int]:
    """Ports of the instances that accept writes now."""
    return cluster.writers()


@task(name="fence-old-primary", **policy(timeout_seconds=300, retries=1))
def fence_old_primary(cluster: PostgresCluster, port: int, stop: bool = True) -> dict:
    """Fence (and stop, when local) the old primary, or record that it is unreachable."""
    result = cluster.fence_old_primary(port, stop)
    get_run_logger().info("Old primary %s: %s", result["address"], result["state"])
    return result


@task(name="promote-replica", **policy(timeout_seconds=300, retries=1))
def promote_replica(cluster: PostgresCluster, port: int, timeout_seconds: int = 60) -> ReplicaPromotion:
    """Promote the replica on ``port`` and open it for writes; a primary is left as it is."""
    promotion = cluster.promote(port, timeout_seconds)
    get_run_logger().info("Promoted %s (already primary: %s)", promotion.address, promotion.already_primary)
    return promotion


@task(name="resync-standby", **policy(timeout_seconds=1800, retries=1))
def resync_standby(cluster: PostgresCluster, port: int, source_port: int, allow_clone: bool = True) -> Resync:
    """Make the instance on ``port`` a streaming standby of ``source_port`` (pg_rewind, else a fresh clone)."""
    result = cluster.resync_as_standby(port, source_port, allow_clone)
    get_run_logger().info("%s follows %s (%s)", result.address, result.source, result.method)
    return result


@task(name="switchover-primary", **policy(timeout_seconds=1800, retries=1))
def switchover_primary(cluster: PostgresCluster, to_port: int) -> dict:
    """Hand the primary role to the standby on ``to_port`` without losing a commit."""
    return cluster.switchover(to_port)


@task(name="start-instance", **policy(timeout_seconds=600))
def start_instance(cluster: PostgresCluster, port: int) -> None:
    """Start the local instance on ``port`` unless it runs."""
    cluster.start_at(port)


def require_single_writer(writers: list[int], allowed_port: int) -> None:
    """Raise when an instance other than ``allowed_port`` accepts writes."""
    extra = [p for p in writers if p != allowed_port]
    if extra:
        raise PostgresError(f"instances on ports {extra} accept writes beside port {allowed_port}: two writers")
