"""Tasks over an RdsDatabase: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.rds import RdsDatabase, RdsPromotion
from tasks._policy import policy


@task(name="describe-rds-instance", **policy(timeout_seconds=60))
def describe_rds_instance(database: RdsDatabase, identifier: str | None = None) -> dict:
    """Status, endpoint and replication links of one instance."""
    return database.describe(identifier)


@task(name="read-rds-replica-lag", **policy(timeout_seconds=60))
def read_rds_replica_lag(database: RdsDatabase) -> float | None:
    """The replica's latest ReplicaLag in seconds, None when CloudWatch has no datapoint."""
    return database.replica_lag_seconds()


@task(name="check-rds-promoted", **policy(timeout_seconds=60))
def check_rds_promoted(database: RdsDatabase) -> bool:
    """True when the read replica no longer replicates from its source (promoted by an earlier run)."""
    return database.is_promoted()


@task(name="promote-rds-replica", **policy(timeout_seconds=3600, retries=2))
def promote_rds_replica(database: RdsDatabase) -> RdsPromotion:
    """Promote the read replica and wait until available; no second promotion on a re-run."""
    promotion = database.promote_read_replica()
    get_run_logger().info("RDS %s promoted (already: %s)", promotion.identifier, promotion.already_promoted)
    return promotion
