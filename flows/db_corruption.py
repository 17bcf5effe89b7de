"""Database corruption: point-in-time restore beside the primary, verify, approve, promote.

Runbook (continuity plans: "Database Corruption", "Database Failure Response", "Point-in-Time Recovery"):
  1. preflight: the target is tz-aware, inside the recoverable window, the restore point exists
  2. stop all writes to prevent further corruption (fence)
  3. restore the last clean backup plus WAL up to the target into a NEW instance
  4. verify integrity (pg_amcheck, row counts, sentinel queries) and measure the data loss
  5. a named approver approves, seeing the evidence
  6. promote: the endpoint applications use is served by the restored instance; the old
     primary's data directory is kept aside
  7. post-checks at the endpoint, a fresh full backup, and the incident report
"""

from __future__ import annotations

from datetime import datetime

from prefect.states import State

from blocks import PostgresCluster, VerificationQuery
from blocks.errors import InvalidInput, RecoveryError
from blocks.loading import load_block
from runbook.parameters import recovery_flow
from runbook.restore import (
    aside_directory,
    post_checks,
    rebuild_replicas,
    record_promotion,
    restore_verify_promote,
    resume_promotion,
)
from runbook.run import Approval, ApprovalPolicy, Recovery, refuse_future
from tasks.postgres import (
    archive_current_wal,
    assess_corruption,
    check_database_inputs,
    check_target_in_window,
    fence_writes,
    find_restore_point,
    list_backups,
    parse_recovery_target,
    take_full_backup,
)

SCENARIO = "db-corruption"


@recovery_flow(name="database-corruption-recovery", description="Point-in-time restore beside the primary, verify, approve, promote.")
def db_corruption(
    cluster_block: str,
    recovery_target: str,
    incident_detected_at: datetime,
    verification_queries: list[VerificationQuery] | None = None,
    row_count_tables: list[str] | None = None,
    approval_policy: ApprovalPolicy = "required",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 3600,
    severity: str | None = None,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "database",
    incident_id: str | None = None,
    lock_wait_seconds: int = 30,
    take_backup_after: bool = True,
    approval_poll_seconds: float = 5,
) -> State:
    """Recover a corrupted PostgreSQL cluster to a point in time before the corruption.

    Args:
        cluster_block: name of the PostgresCluster block.
        recovery_target: ISO-8601 time with a UTC offset, or the name of a restore point.
        incident_detected_at: when the corruption was detected (tz-aware); RTO and data loss count from it.
        verification_queries: sentinel queries the restored instance must answer as expected.
        row_count_tables: tables whose row counts go into the evidence.
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the promotion.
        approval_timeout_seconds: how long to wait for approval before giving up without promoting.
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the inputs when empty, so a re-run resumes.
        lock_wait_seconds: how long to wait for another recovery of the same cluster to finish.
        take_backup_after: take a full backup of the recovered primary at the end.
        approval_poll_seconds: how often a paused run checks for an answer.
    """
    queries, tables = list(verification_queries or []), list(row_count_tables or [])
    run = Recovery(
        SCENARIO, target=cluster_block, severity=severity, detected_at=incident_detected_at, recovery_target=recovery_target,
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        incident_id=incident_id,
    )
    with run:
        # 1. Preflight: the target is tz-aware and not in the future; the cluster is known.
        with run.preflight() as step:
            target = parse_recovery_target(recovery_target)
            if isinstance(target, datetime):
                refuse_future("recovery target", target, run.started_at)
            cluster = load_block(PostgresCluster, cluster_block)
            run.refuse_unsafe_policy(cluster_block, cluster.environment)
            run.assign_incident(incident_id, cluster_block, target)
            step.detail = f"target {recovery_target}; incident {run.incident_id}"

        with run.locks(cluster_block, wait_seconds=lock_wait_seconds):
            progress = cluster.promotion_progress(run.incident_id)
            if progress is not None and dry_run:
                return _dry_run_resume(run, cluster, progress, queries, take_backup_after)
            if progress is not None:
                _resume(run, cluster, progress)
            else:
                stopped = _restore(run, cluster, target, queries, tables)
                if stopped is not None:
                    return stopped

            # 7. Replicas, post-checks at the endpoint, a fresh full backup.
            if cluster.replicas:
                rebuild_replicas(run, cluster)
            if not post_checks(run, cluster, queries):
                return run.finish("PostCheckFailed", "The restored instance serves the endpoint but post-checks "
                                  "failed; see Verification Results.")
            run.mark_restored()
            if take_backup_after:
                _full_backup(run, cluster)
            return run.finish("Recovered", f"The database {cluster_block} was restored to {recovery_target} and "
                              f"serves applications again at {cluster.primary.address}.")


def _restore(run: Recovery, cluster: PostgresCluster, target: datetime | str, queries: list[VerificationQuery],
             tables: list[str]) -> State | None:
    """Steps 1-6: the window, the fence, the restore beside, verification, approval, promotion."""
    report = run.report
    with run.step("Preflight: recoverable window") as step:
        if not cluster.is_reachable():
            raise InvalidInput(f"cluster {report.target!r}: primary {cluster.primary.address} is unreachable")
        check_database_inputs(cluster, verification_queries=queries, row_count_tables=tables)
        # A real run closes and archives the current WAL segment first, so "now" is reachable;
        # a dry run changes nothing and judges the target against that same bound.
        archived = run.started_at if run.dry_run else archive_current_wal(cluster)
        window = list_backups(cluster, archived)
        report.recoverable_window = window.as_dict()
        if isinstance(target, datetime):
            check_target_in_window(target, window)
        else:
            find_restore_point(cluster, target)
        step.detail = f"window {window.earliest.isoformat()} .. {window.latest.isoformat()}"

    plan = [
        f"fence writes on {cluster.primary.address}: connection limit 0 on every database, "
        "default_transaction_read_only=on, end client sessions",
        f"restore the newest backup before the target plus WAL to {report.recovery_target} into "
        f"{cluster.candidate_directory(run.incident_id)}",
        f"verify the restored instance: pg_amcheck, row counts of {tables or 'no tables'}, {len(queries)} sentinel queries",
        run.approval.describe(),
        f"stop {cluster.primary.address}, move {cluster.primary.data_directory} to "
        f"{aside_directory(cluster, run.incident_id)}, start the restored instance there",
        *([f"rebuild the replicas {', '.join(r.address for r in cluster.replicas)} from the restored primary: "
           "one not streaming from it on its timeline is stopped, its data directory moved aside, and cloned "
           "afresh"] if cluster.replicas else []),
        "check the endpoint and take a fresh full backup",
    ]
    if run.dry_run:
        return run.planned(plan)
    report.plan = plan

    # 2. Stop all writes to prevent further corruption.
    with run.step("Fence writes") as step:
        step.detail = f"{fence_writes(cluster)} client sessions ended; no new connections; primary read-only"
    with run.step("Assess damage on the primary") as step:
        damage = assess_corruption(cluster)
        report.add_checks("primary", [damage])
        step.detail = damage.detail

    # 3-6. Restore beside, verify, approve, promote.
    return restore_verify_promote(
        run, cluster, target, tables=tables, queries=queries, loss_until=run.detected_at,
        preview=lambda candidate: _preview(run, cluster, candidate.port, candidate.backup_set),
        stop_items=lambda candidate: [f"unfence the primary with `dr unfence {report.target}` if it should take "
                                      "writes again"],
    )


def _resume(run: Recovery, cluster: PostgresCluster, progress: str) -> None:
    """An earlier run of this incident was approved and journalled its promotion: finish or confirm it."""
    name = "Resume: promotion already done" if progress == "promoted" else "Resume: finish the interrupted promotion"
    promotion = resume_promotion(run, cluster, name)
    marker = cluster.promoted_incident() or {}
    record_promotion(run, promotion, already=promotion.already_promoted)
    report = run.report
    report.promotion.update(endpoint=cluster.primary.address, data_directory=cluster.primary.data_directory,
                            old_primary_aside=marker.get("old_primary_aside"), promoted_at=marker.get("promoted_at"))
    report.candidate = {"data_directory": cluster.primary.data_directory, "port": cluster.primary.port,
                        "backup_set": marker.get("backup_set")}
    last = marker.get("last_restored_commit")
    report.last_restored_commit = datetime.fromisoformat(last) if last else None
    if report.last_restored_commit is not None:
        report.rpo_seconds = max(0.0, (run.detected_at - report.last_restored_commit).total_seconds())


def _full_backup(run: Recovery, cluster: PostgresCluster) -> None:
    """Outside the RTO: service is restored; a backup that fails is an action item."""
    try:
        with run.step("Full backup of the recovered primary") as step:
            step.detail = f"backup set {take_full_backup(cluster).label}"
    except RecoveryError as exc:
        run.report.action_items.append(f"take a full backup of {run.report.target}: the one after recovery failed ({exc})")


def _preview(run: Recovery, cluster: PostgresCluster, port: int, backup_set: str) -> str:
    report = run.report
    window = report.recoverable_window
    failed = report.failed_critical()
    loss = (f"- **Data-loss window**: {report.rpo_seconds:.1f} s of commits (objective {report.rpo_objective_seconds} s); "
            f"last restored commit {report.last_restored_commit.isoformat() if report.last_restored_commit else 'none'}"
            if report.rpo_seconds is not None else "- **Data-loss window**: unknown")
    lines = [
        f"## Promote the restored database for `{report.target}`?",
        "",
        f"- **Recovery target**: {report.recovery_target}",
        f"- **Recoverable window**: {window['earliest']} .. {window['latest']}" if window else "- **Recoverable window**: -",
        f"- **Restored instance**: port {port}, backup set {backup_set}",
        loss,
        "",
        *report.checks_markdown(),
        "",
        f"Approving stops the primary at {cluster.primary.address}, moves its data directory to "
        f"`{aside_directory(cluster, run.incident_id)}` and serves the endpoint from the restored instance. "
        "Rejecting keeps the restored instance for inspection and promotes nothing.",
        "" if not failed else f"**{len(failed)} critical check(s) failed.**",
    ]
    return "\n".join(lines)


def _dry_run_resume(run: Recovery, cluster: PostgresCluster, progress: str, queries: list[VerificationQuery],
                    take_backup_after: bool) -> State:
    """What a real re-run of an incident whose promotion was journalled would do; reads only, changes nothing."""
    primary_dir, aside = cluster.primary.data_directory, aside_directory(cluster, run.incident_id)
    verb = "confirm" if progress == "promoted" else "finish"
    head = (f"the promotion of incident {run.incident_id} was journalled ({progress}); a real run would {verb} "
            "it and restore nothing again")
    with run.step("Resume: promotion journalled (dry run)") as step:
        candidate = cluster.candidate_for(run.incident_id)
        step.detail = f"the promotion of incident {run.incident_id} was journalled ({progress}); a real run would {verb} it"
    if candidate is None:
        plan = [head, f"its candidate is gone: a real run would stop and change nothing; inspect {primary_dir} "
                f"and {aside} by hand"]
    elif progress == "promoted":
        plan = [head, f"make sure {cluster.primary.address} runs from {primary_dir} (the restored instance) "
                "and its new timeline is archived"]
    else:
        plan = [head, f"stop {cluster.primary.address} if it runs, move {primary_dir} to {aside} unless it is "
                f"there already, move the candidate {candidate.data_directory} to {primary_dir} unless it is "
                "there already, start it there and archive its new timeline"]
    if candidate is not None:
        plan += [f"rebuild the replicas {', '.join(r.address for r in cluster.replicas)} from "
                 f"{cluster.primary.address} unless they stream from it on its timeline"] if cluster.replicas else []
        plan += [f"post-checks at {cluster.primary.address}: {len(queries)} verification queries",
                 "take a fresh full backup" if take_backup_after else "no backup afterwards (take_backup_after off)"]
    return run.planned(plan, f"Dry run: the promotion of incident {run.incident_id} was journalled ({progress}); a "
                       f"real run would {verb} it. Nothing was changed.")
