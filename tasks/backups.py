"""Backup validation tasks: thin wrappers over the BackupSources block's checks."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from blocks.backup_sources import BackupCheck, BackupSources, ObjectPrefixSource, PgBackRestSource
from blocks.backup_sources import compare_with_source as _compare
from blocks.backup_sources import discard_scratch as _discard
from blocks.postgres import PostgresCluster
from tasks._policy import policy
from blocks.loading import load_block


@task(name="check-pgbackrest-backups", **policy(timeout_seconds=3600))
def check_pgbackrest_backups(sources: BackupSources, source: PgBackRestSource) -> list[BackupCheck]:
    """Exists, non-empty, fresh within its RPO, ``pgbackrest verify`` clean, retention respected."""
    cluster = load_block(PostgresCluster, source.cluster_block)
    return sources.check_pgbackrest(source, cluster)


@task(name="check-object-backups", **policy(timeout_seconds=1800))
def check_object_backups(sources: BackupSources, source: ObjectPrefixSource) -> list[BackupCheck]:
    """Exists, non-empty, fresh within its RPO, sha256 checksums match, retention respected."""
    return sources.check_object_prefix(source)


@task(name="publish-backup-checks", **policy(timeout_seconds=60))
def publish_backup_checks(checks: list[BackupCheck], key: str = "backup-validation") -> None:
    """The checks as a table artifact: source, check, result, critical, detail."""
    rows = [{"source": c.source, "check": c.check, "result": "pass" if c.passed else "FAIL",
             "critical": "yes" if c.critical else "no", "detail": c.detail} for c in checks]
    failed = sum(1 for c in checks if c.critical and not c.passed)
    create_table_artifact(table=rows, key=key,
                          description=f"Backup validation: {len(checks)} checks, {failed} critical failures")


@task(name="compare-with-source", **policy(timeout_seconds=3600))
def compare_with_source(cluster: PostgresCluster, port: int, tables: list[str], queries: list) -> list[BackupCheck]:
    """Row counts and sentinel answers of the scratch instance against the primary."""
    return _compare(cluster, port, tables, queries)


@task(name="discard-scratch-instance", **policy(timeout_seconds=600))
def discard_scratch_instance(cluster: PostgresCluster, scratch_id: str) -> list[str]:
    """Stop the scratch instance and delete its directories; returns the removed paths."""
    return _discard(cluster, scratch_id)


@task(name="mark-restore-point", **policy(timeout_seconds=60))
def mark_restore_point(cluster: PostgresCluster, name: str) -> str:
    """Record a named restore point on the primary; returns its LSN."""
    return cluster.create_restore_point(name)


@task(name="check-primary-reachable", **policy(timeout_seconds=60))
def check_primary_reachable(cluster: PostgresCluster) -> bool:
    """True when the primary accepts a session."""
    return cluster.is_reachable()


@task(name="count-rows", **policy(timeout_seconds=600))
def count_rows(cluster: PostgresCluster, table: str) -> int:
    """Exact row count of ``table`` on the primary; refuses (InvalidInput) a table it does not have."""
    return cluster.row_count(table)
