"""Tasks over a PostgresCluster's replication: thin, verb-first wrappers of the block's replication verbs."""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task

from blocks._pg_replication import ReplicaLag, ReplicaPromotion, Resync
from blocks.postgres import PostgresCluster
from tasks._policy import policy


@task(name="measure-replica-lag", **policy(timeout_seconds=60))
def measure_replica_lag(cluster: PostgresCluster, port: int, primary_port: int | None = None,
                        primary_lost_at: datetime | None = None) -> ReplicaLag:
    """How far the replica on ``port`` is behind, in bytes and seconds (an upper bound of the data loss)."""
    return cluster.replica_lag(port, primary_port, primary_lost_at)


@task(name="rank-replicas", **policy(timeout_seconds=120))
def rank_replicas(cluster: PostgresCluster, failed_port: int, primary_lost_at: datetime | None = None) -> list[ReplicaLag]:
    """The reachable standbys other than ``failed_port``, the best promotion candidate first.

    Standbys on the primary's timeline and history come first (only they may be promoted; the others
    are listed last, ``on_history`` False, their detail naming both timelines). When the failed primary
    answered, they are ranked by how far they are behind it; when it could not be asked, by the WAL
    position each has received (highest first), then by the data-loss window.
    """
    lags = []
    for inst in cluster.instances():
        if inst.port == failed_port or cluster.role(inst.port) != "standby":
            continue
        lags.append(cluster.replica_lag(inst.port, failed_port, primary_lost_at))
    return order_candidates(lags)


def order_candidates(lags: list[ReplicaLag]) -> list[ReplicaLag]:
    """Standbys the best promotion candidate first: on the primary's timeline, then least behind the primary,
    or most WAL received without it."""
    eligible = [lag for lag in lags if lag.on_history]
    refused = [lag for lag in lags if not lag.on_history]
    if eligible and all(lag.measured_from == "primary" for lag in eligible):
        ranked = sorted(eligible, key=lambda lag: (lag.bytes is None, lag.bytes or 0, lag.seconds is None, lag.seconds or 0.0))
    else:
        ranked = sorted(eligible, key=lambda lag: (-lag.received_position, lag.seconds is None, lag.seconds or 0.0))
    return ranked + refused


@task(name="read-roles", **policy(timeout_seconds=60))
def read_roles(cluster: PostgresCluster) -> dict[int, str]:
    """Port -> 'primary', 'standby' or 'unreachable' for every known instance."""
    return {inst.port: cluster.role(inst.port) for inst in cluster.instances()}


@task(name="check-streaming", **policy(timeout_seconds=60))
def check_streaming(cluster: PostgresCluster, port: int, source_port: int) -> bool:
    """True when the instance on ``port`` streams WAL from the instance on ``source_port``."""
    return cluster.follows(port, source_port)


@task(name="list-writers", **policy(timeout_seconds=60))
def list_writers(cluster: PostgresCluster) -> list[int]:
    """Ports of the instances that accept writes now."""
    return cluster.writers()


def fence_limit(cluster: PostgresCluster) -> float:
    """Seconds fencing may take: status checks, sessions, the fence statements and a bounded stop."""
    return (2 * cluster.start_timeout_seconds + 4 * cluster.connect_timeout_seconds
            + 2 * cluster.statement_timeout_seconds + 90)


def resync_limit(cluster: PostgresCluster, follow_timeout_seconds: float = 120) -> float:
    """Seconds a resync may take: stop, pg_rewind, a fresh clone (four start bounds), start and catching up."""
    return 7 * cluster.start_timeout_seconds + cluster.statement_timeout_seconds + follow_timeout_seconds + 120


def fence_old_primary(cluster: PostgresCluster, port: int, stop: bool = True) -> dict:
    """Fence (and stop, when local) the old primary, or record that it is unreachable (time limit from the block)."""
    return fence_old_primary_task.with_options(timeout_seconds=fence_limit(cluster))(cluster, port, stop)


def resync_standby(cluster: PostgresCluster, port: int, source_port: int, allow_clone: bool = True) -> Resync:
    """Make ``port`` a streaming standby of ``source_port`` (time limit from the block's own bounds)."""
    return resync_standby_task.with_options(timeout_seconds=resync_limit(cluster))(cluster, port, source_port, allow_clone)


def switchover_primary(cluster: PostgresCluster, to_port: int) -> dict:
    """Hand the primary role to ``to_port`` (time limit: fencing, a catch-up, a promotion and every resync)."""
    limit = fence_limit(cluster) + 120 + 60 + resync_limit(cluster) * max(len(cluster.instances()) - 1, 1)
    return switchover_primary_task.with_options(timeout_seconds=limit)(cluster, to_port)


@task(name="fence-old-primary", **policy(timeout_seconds=300, retries=1))
def fence_old_primary_task(cluster: PostgresCluster, port: int, stop: bool = True) -> dict:
    """Fence (and stop, when local) the old primary, or record that it is unreachable."""
    result = cluster.fence_old_primary(port, stop)
    get_run_logger().info("Old primary %s: %s", result["address"], result["state"])
    return result


@task(name="wait-for-replay", **policy(timeout_seconds=660))
def wait_for_replay(cluster: PostgresCluster, port: int, lsn: str, timeout_seconds: float = 60) -> bool:
    """Wait (bounded) until the instance on ``port`` has replayed WAL up to ``lsn``; False when it has not."""
    return cluster.replayed(port, lsn, min(timeout_seconds, 600))


@task(name="promote-replica", **policy(timeout_seconds=300, retries=1))
def promote_replica(cluster: PostgresCluster, port: int, timeout_seconds: int = 60) -> ReplicaPromotion:
    """Promote the replica on ``port`` and open it for writes; a primary is left as it is."""
    promotion = cluster.promote(port, timeout_seconds)
    get_run_logger().info("Promoted %s (already primary: %s)", promotion.address, promotion.already_primary)
    return promotion


@task(name="resync-standby", **policy(timeout_seconds=1800, retries=1))
def resync_standby_task(cluster: PostgresCluster, port: int, source_port: int, allow_clone: bool = True) -> Resync:
    """Make the instance on ``port`` a streaming standby of ``source_port`` (pg_rewind, else a fresh clone)."""
    result = cluster.resync_as_standby(port, source_port, allow_clone)
    get_run_logger().info("%s follows %s (%s)", result.address, result.source, result.method)
    return result


def rebuild_replica(cluster: PostgresCluster, port: int) -> Resync:
    """Make the replica on ``port`` a standby of the restored primary: kept when it follows it on its timeline,
    else moved aside and cloned afresh (time limit from the block's own bounds)."""
    return rebuild_replica_task.with_options(timeout_seconds=resync_limit(cluster))(cluster, port)


@task(name="rebuild-replica", **policy(timeout_seconds=1800, retries=0))
def rebuild_replica_task(cluster: PostgresCluster, port: int) -> Resync:
    """Make the replica on ``port`` a standby of the restored primary (a fresh clone unless it follows it already)."""
    result = cluster.rebuild_from_primary(port)
    get_run_logger().info("%s follows %s (%s)", result.address, result.source, result.method)
    return result


@task(name="switchover-primary", **policy(timeout_seconds=1800, retries=1))
def switchover_primary_task(cluster: PostgresCluster, to_port: int) -> dict:
    """Hand the primary role to the standby on ``to_port`` without losing a commit."""
    return cluster.switchover(to_port)


@task(name="start-instance", **policy(timeout_seconds=600))
def start_instance(cluster: PostgresCluster, port: int) -> None:
    """Start the local instance on ``port`` unless it runs."""
    cluster.start_at(port)

