"""Restore test (scheduled monthly): restore the latest backup into a scratch instance and compare it.

Runbook (continuity plans: "Testing Schedule & Procedures" - restoration test; "Backup Restoration Test"):
  1. mark a named restore point on the source and archive the WAL holding it: that is the target
  2. restore the latest backup plus WAL up to the restore point into a NEW scratch instance
  3. verify it (pg_amcheck) and compare row counts and sentinel queries with the source
  4. always clean up: stop the scratch instance and delete its directory, also when a step failed
     (a cleanup that fails is a failed critical check: the run fails and alerts)
  5. report (time to restore against the objective); a failure alerts on-call
"""

from __future__ import annotations

from prefect import get_run_logger, runtime
from prefect.states import State

from blocks import PostgresCluster, VerificationQuery
from blocks.backup_sources import BackupCheck
from blocks.errors import InvalidInput
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, utcnow
from runbook.parameters import recovery_flow
from runbook.run import Recovery, state_for
from tasks.backups import (
    check_primary_reachable,
    compare_with_source,
    count_rows,
    discard_scratch_instance,
    mark_restore_point,
)
from tasks.notify import initial_alert, send_notification
from tasks.postgres import archive_current_wal, measure_data_loss, restore_to_point_in_time, verify_restored_instance

SCENARIO = "restore-test"


@recovery_flow(name="restore-test", description="Restore the latest backup into a scratch instance, compare with the source, clean up.")
def restore_check(
    cluster_block: str,
    row_count_tables: list[str] | None = None,
    verification_queries: list[VerificationQuery] | None = None,
    notifier: str | None = None,
    objectives_block: str = "default",
    business_function: str = "database",
) -> State:
    """Prove the latest backup restores and holds what the source holds.

    Args:
        cluster_block: name of the PostgresCluster block.
        row_count_tables: tables whose row counts must match the source's.
        verification_queries: sentinel queries whose answers must match the source's (and ``expected``).
        notifier: notification block ('<block-type-slug>/<name>') alerted on failure; defaults to ``dr_notifier``.
        objectives_block: name of the RecoveryObjectives block; the restore time is judged against its RTO.
        business_function: which objective applies.
    """
    tables = list(row_count_tables or [])
    queries = list(verification_queries or [])
    started = utcnow()
    run_id = str(runtime.flow_run.id) if runtime.flow_run.id else "local"
    scratch_id = f"{SCENARIO}-{started:%Y%m%dT%H%M%SZ}-{run_id[:8]}"
    run = Recovery(SCENARIO, target=cluster_block, detected_at=started, approval=None, drill=True,
                   objectives_block=objectives_block, business_function=business_function, incident_id=scratch_id)
    report = run.report
    cluster = None
    with run:
        try:
            # 0. Preflight: the source answers and has every table to compare.
            with run.preflight("Preflight: source reachable, tables exist") as step:
                cluster = load_block(PostgresCluster, cluster_block)
                if not check_primary_reachable(cluster):
                    raise InvalidInput(f"cluster {cluster_block!r}: primary {cluster.primary.address} is unreachable")
                for table in tables:
                    count_rows(cluster, table)  # refuses a table the source does not have, before restoring
                step.detail = f"{len(tables)} tables, {len(queries)} sentinel queries"

            # 1. A named restore point, archived: the restore target.
            with run.step("Mark a restore point and archive it (restore target)") as step:
                lsn = mark_restore_point(cluster, scratch_id)
                archived = archive_current_wal(cluster) or utcnow()
                report.recovery_target = scratch_id
                step.detail = f"restore point {scratch_id} at LSN {lsn}, archived {archived.isoformat()}"

            # 2. The latest backup plus WAL, restored into a new scratch instance.
            with run.step("Restore the latest backup into a scratch instance") as step:
                restore_started = utcnow()
                candidate = restore_to_point_in_time(cluster, scratch_id, scratch_id)
                report.candidate = {"data_directory": candidate.data_directory, "port": candidate.port,
                                    "backup_set": candidate.backup_set}
                report.service_restored_at = utcnow()
                report.rto_seconds = (report.service_restored_at - restore_started).total_seconds()
                step.detail = f"backup {candidate.backup_set} restored in {report.rto_seconds:.1f} s on port {candidate.port}"

            # 3. Verified, and compared with the source.
            with run.step("Compare with the source") as step:
                report.add_checks("scratch", verify_restored_instance(cluster, candidate.port, [], []))
                report.add_checks("scratch", compare_with_source(cluster, candidate.port, tables, queries))
                loss = measure_data_loss(cluster, candidate.port, archived)
                report.last_restored_commit, report.rpo_seconds = loss.last_restored_commit, loss.seconds
                failed = report.failed_critical("scratch")
                step.outcome = "ok" if not failed else "failed"
                step.detail = f"{len(report.checks)} checks, {len(failed)} critical failures"
            if failed:
                run.finish("RestoreTestFailed", "The restored copy differs from the source: " + "; ".join(
                    f"{c.name} ({c.detail})" for c in failed[:5]))
            else:
                run.finish("Restored", f"Backup {candidate.backup_set} of {cluster_block} restored in "
                           f"{report.rto_seconds:.1f} s and matched the source on {len(report.checks)} checks.")
        except BaseException as exc:
            report.summary = f"The restore test stopped: {exc}"
            raise
        finally:
            # 4. Always clean up once anything beyond the preflight ran; 5. a failure alerts on-call.
            if cluster is not None and report.changed_anything():
                _clean_up(cluster, scratch_id, report)
            if report.outcome != "Restored":
                _alert(notifier, report, started)

    get_run_logger().info(report.summary)
    return state_for(report.outcome, report.summary)


def _clean_up(cluster: PostgresCluster, scratch_id: str, report: RecoveryReport) -> None:
    """Remove the scratch instance; a cleanup that fails is a failed critical check, never a silent leftover."""
    try:
        with report.step("Clean up the scratch instance") as step:
            removed = discard_scratch_instance(cluster, scratch_id)
            step.detail = "removed " + (", ".join(removed) if removed else "nothing (no scratch was created)")
    except Exception as exc:  # recorded as a failed check and alerted: the run must still report and alert
        report.add_checks("cleanup", [BackupCheck(
            "", "scratch instance removed", False, f"{scratch_id} may be left behind: {type(exc).__name__}: {exc}")])
        if report.outcome == "Restored":
            report.outcome = "RestoreTestFailed"
        report.summary += f" The scratch instance {scratch_id} could not be removed: {exc}"


def _alert(notifier: str | None, report: RecoveryReport, started) -> None:
    send_notification(notifier, initial_alert(
        severity="P2", service=f"backups of {report.target}", impact=f"restore test failed: {report.summary}",
        started_at=started, war_room=f"flow run {report.flow_run_id}"))
