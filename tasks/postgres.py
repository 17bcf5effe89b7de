"""Tasks over a PostgresCluster: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prefect import get_run_logger, task

from blocks.errors import InvalidInput, PostgresError, PostgresUnavailable, RecoveryError
from blocks.inputs import refuse_future
from blocks.pgbackrest import BackupSet
from blocks.postgres import Candidate, PostgresCluster, Promotion, VerificationQuery
from blocks.results import CheckResult
from tasks._policy import policy


@dataclass(frozen=True)
class RecoverableWindow:
    """What can be restored: from the end of the oldest usable backup to the newest archived WAL."""

    earliest: datetime
    latest: datetime
    backups: list[BackupSet] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "earliest": self.earliest.isoformat(),
            "latest": self.latest.isoformat(),
            "backups": [
                {"label": b.label, "type": b.type, "stopped_at": b.stopped_at.isoformat(), "error": b.error}
                for b in self.backups
            ],
        }


@dataclass(frozen=True)
class DataLoss:
    """The data-loss window: commits after the last one restored, up to the incident, are lost."""

    last_restored_commit: datetime | None
    incident_at: datetime
    seconds: float | None


@task(name="check-database-inputs", **policy(timeout_seconds=600))
def check_database_inputs(
    cluster: PostgresCluster,
    verification_queries: list[VerificationQuery] | None = None,
    row_count_tables: list[str] | None = None,
    smoke_queries: list[str] | None = None,
    roles: list[str] | None = None,
    roles_parameter: str = "roles",
    port: int | None = None,
) -> int:
    """Refuse, before any change, a query, table, database or role the instance at ``port`` (the primary) lacks.

    Every query is parsed and planned (never run) as one statement in a read-only transaction
    that is rolled back; each table must be countable; each query's database and each role must
    exist; so must the block's ``application_roles``. Returns how many names and queries were checked.

    Raises:
        InvalidInput: naming the parameter, the value and why it was refused.
    """
    address = cluster.instance_at(port).address if port is not None else cluster.primary.address
    checked = 0
    if (verification_queries or smoke_queries or row_count_tables) and cluster.query_role \
            and not cluster.role_exists(cluster.query_role, port):
        raise InvalidInput(f"query_role of the cluster block: role {cluster.query_role!r} does not exist on {address} "
                           "(expected a role that may read the checked tables, or empty for the superuser)")
    for index, query in enumerate(verification_queries or []):
        where = f"verification_queries[{index}] ({query.name!r})"
        if query.database is not None and not cluster.database_exists(query.database, port):
            raise InvalidInput(f"{where}: database {query.database!r} does not exist on {address} "
                               "(expected a database that accepts connections)")
        why = cluster.query_refusal(query.sql, port, query.database)
        if why:
            raise InvalidInput(f"{where}: query {query.sql!r} is refused on {address}: {why}")
        checked += 1
    for index, statement in enumerate(smoke_queries or []):
        why = cluster.query_refusal(statement, port)
        if why:
            raise InvalidInput(f"smoke_queries[{index}]: query {statement!r} is refused on {address}: {why}")
        checked += 1
    for table in row_count_tables or []:
        why = cluster.table_refusal(table, port)
        if why:
            raise InvalidInput(f"row_count_tables: table {table!r} cannot be counted on {address}: {why}")
        checked += 1
    named = [(roles_parameter, role) for role in roles or []]
    named += [(f"application_roles of the cluster block ({address})", role) for role in cluster.application_roles]
    for parameter, role in named:
        if not cluster.role_exists(role, port):
            raise InvalidInput(f"{parameter}: role {role!r} does not exist on {address} (expected an existing role)")
        checked += 1
    return checked


@task(name="take-full-backup", **policy(timeout_seconds=3600, retries=1))
def take_full_backup(cluster: PostgresCluster) -> BackupSet:
    """Take a full pgBackRest backup of the primary."""
    backup = cluster.backup("full")
    get_run_logger().info("Full backup %s finished at %s", backup.label, backup.stopped_at.isoformat())
    return backup


@task(name="archive-current-wal", **policy(timeout_seconds=120))
def archive_current_wal(cluster: PostgresCluster) -> datetime | None:
    """Close the current WAL segment and wait until the archive holds it."""
    return cluster.archive_wal()


@task(name="list-backups", **policy(timeout_seconds=300))
def list_backups(cluster: PostgresCluster, archived_through: datetime | None = None) -> RecoverableWindow:
    """List usable backups and the recoverable window (earliest..latest recoverable point)."""
    backups = [b for b in cluster.backups() if not b.error]
    if not backups:
        raise InvalidInput(
            f"stanza {cluster.pgbackrest_stanza!r} in {cluster.pgbackrest_config} has no usable backup; "
            "take a full backup before a point-in-time recovery"
        )
    latest = archived_through or cluster.latest_archived_time() or backups[-1].stopped_at
    latest = max(latest, backups[-1].stopped_at)
    # pgBackRest records a backup's stop time in whole seconds and only picks a backup whose stop
    # time is strictly before the target: the first usable target is one second after it.
    earliest = backups[0].stopped_at + timedelta(seconds=1)
    return RecoverableWindow(earliest=earliest, latest=latest, backups=backups)


@task(name="find-restore-point", **policy(timeout_seconds=600))
def find_restore_point(cluster: PostgresCluster, name: str) -> str:
    """The backup a restore to point ``name`` starts from; refuses a point not archived or older than every backup."""
    return cluster.backup_before_restore_point(name)


@task(name="assess-corruption", **policy(timeout_seconds=1800, retries=0))
def assess_corruption(cluster: PostgresCluster) -> CheckResult:
    """Run pg_amcheck on the primary to record the extent of the damage (evidence, not a gate)."""
    result = cluster.amcheck(install_missing=False)
    return CheckResult("pg_amcheck of the primary before restore", result.passed, result.detail, critical=False)


@task(name="fence-writes", **policy(timeout_seconds=60))
def fence_writes(cluster: PostgresCluster) -> int:
    """Make the primary read-only and end client sessions; returns how many were ended."""
    ended = cluster.fence()
    get_run_logger().info("Primary %s fenced; %d client sessions ended", cluster.primary.address, ended)
    return ended


@task(name="unfence-writes", **policy(timeout_seconds=60))
def unfence_writes(cluster: PostgresCluster) -> None:
    """Let writes into the primary again."""
    cluster.unfence()


@task(name="restore-to-point-in-time", **policy(timeout_seconds=7200, retries=1))
def restore_to_point_in_time(
    cluster: PostgresCluster, incident_id: str, target: datetime | str, port: int | None = None
) -> Candidate:
    """Restore into a NEW data directory (on ``port``, or a free one) up to ``target``: a tz-aware time or a restore point name."""
    candidate = cluster.restore_beside(incident_id, target, port)
    get_run_logger().info(
        "Restored %s (backup %s) to %s %s into %s on port %d",
        incident_id, candidate.backup_set, candidate.target_type, candidate.target, candidate.data_directory, candidate.port,
    )
    return candidate


@task(name="verify-restored-instance", **policy(timeout_seconds=3600))
def verify_restored_instance(
    cluster: PostgresCluster, port: int, tables: list[str], queries: list[VerificationQuery]
) -> list[CheckResult]:
    """pg_amcheck, row counts and sentinel queries against the instance on ``port``."""
    results = [cluster.amcheck(port)]
    for table in tables:
        try:
            results.append(CheckResult(f"row count: {table}", True, str(cluster.row_count(table, port)), critical=False))
        except PostgresUnavailable:
            raise
        except (InvalidInput, PostgresError) as exc:
            results.append(CheckResult(f"row count: {table}", False, str(exc)))
    results.extend(cluster.run_sentinel(q, port) for q in queries)
    return results


@task(name="measure-data-loss", **policy(timeout_seconds=60))
def measure_data_loss(cluster: PostgresCluster, port: int, incident_at: datetime) -> DataLoss:
    """Data-loss window: from the last commit the restored instance holds to the incident."""
    last = cluster.last_replayed_commit(port)
    seconds = None if last is None else max(0.0, (incident_at - last).total_seconds())
    return DataLoss(last_restored_commit=last, incident_at=incident_at, seconds=seconds)


@task(name="promote-restored-instance", **policy(timeout_seconds=900, retries=1))
def promote_restored_instance(cluster: PostgresCluster, candidate: Candidate) -> Promotion:
    """Serve the endpoint from the restored instance; the old data directory is kept aside."""
    promotion = cluster.promote_candidate(candidate)
    logger = get_run_logger()
    if promotion.already_promoted:
        logger.info("Endpoint %s already serves the restore of %s; not promoted again", promotion.endpoint, candidate.incident_id)
    else:
        logger.info("Endpoint %s now serves the restored instance; old primary kept at %s", promotion.endpoint, promotion.old_primary_aside)
    return promotion


@task(name="stop-restored-instance", **policy(timeout_seconds=300))
def stop_restored_instance(cluster: PostgresCluster, candidate: Candidate) -> None:
    """Stop a candidate that will not be promoted; its data directory is kept for inspection."""
    cluster.stop_instance(candidate.data_directory)


@task(name="check-endpoint", **policy(timeout_seconds=300))
def check_endpoint(cluster: PostgresCluster, queries: list[VerificationQuery]) -> list[CheckResult]:
    """Post-promotion checks at the address applications use: read-write, open to the application roles, which
    can log in and write, and the sentinel queries."""
    results = []
    writable = not cluster.is_in_recovery() and not cluster.is_fenced()
    results.append(CheckResult("endpoint accepts writes", writable, f"{cluster.primary.address} read-write={writable}"))
    results.extend(cluster.application_access())
    results.extend(cluster.run_sentinel(q) for q in queries)
    try:
        streaming = cluster.streaming_replicas()
        results.append(
            CheckResult(
                "replicas streaming", streaming >= len(cluster.replicas),
                f"{streaming} of {len(cluster.replicas)} replicas stream from the new primary"
                + ("" if streaming >= len(cluster.replicas) else "; rebuild the others from it"),
                critical=False,
            )
        )
    except RecoveryError as exc:  # evidence only; never fails the recovery
        results.append(CheckResult("replicas streaming", False, str(exc), critical=False))
    return results


def parse_recovery_target(value: str) -> datetime | str:
    """A recovery target: an ISO-8601 time with a UTC offset, or the name of a restore point."""
    text = (value or "").strip()
    if not text:
        raise InvalidInput("recovery target is empty; give an ISO-8601 time with offset or a restore point name")
    looks_like_time = text[:4].isdigit() and len(text) >= 10 and text[4] == "-"
    if not looks_like_time:
        return text
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"recovery target {text!r} is not a valid ISO-8601 time") from exc
    if moment.tzinfo is None:
        raise InvalidInput(f"recovery target {text!r} has no time zone; add an offset such as +00:00")
    return moment


def check_target_in_window(target: datetime, window: RecoverableWindow, now: datetime | None = None) -> None:
    """Refuse a target in the future, before the oldest backup ended, or past the archived WAL."""
    refuse_future("recovery target", target, now)
    if target < window.earliest:
        raise InvalidInput(
            f"recovery target {target.isoformat()} is before the earliest recoverable point "
            f"{window.earliest.isoformat()} (just after the end of the oldest backup)"
        )
    if target > window.latest:
        raise InvalidInput(
            f"recovery target {target.isoformat()} is after the latest recoverable point "
            f"{window.latest.isoformat()} (newest archived WAL)"
        )
