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

import hashlib
import re
from datetime import datetime, timezone

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State

from blocks import PostgresCluster, RecoveryObjectives, VerificationQuery
from blocks.errors import InvalidInput, RecoveryError
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalPolicy, approval_step, check_approval_settings
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from runbook.locks import recovery_lock
from tasks.postgres import (
    archive_current_wal,
    assess_corruption,
    check_database_inputs,
    check_endpoint,
    check_target_in_window,
    fence_writes,
    find_restore_point,
    list_backups,
    measure_data_loss,
    parse_recovery_target,
    refuse_future,
    promote_restored_instance,
    require_aware,
    restore_to_point_in_time,
    stop_restored_instance,
    take_full_backup,
    verify_restored_instance,
)
from tasks.replication import rebuild_replica

SCENARIO = "db-corruption"


def incident_key(cluster_block: str, recovery_target: str, incident_detected_at: datetime) -> str:
    """A stable id for one incident, so a re-run of the same recovery finds its earlier work."""
    detected = incident_detected_at.astimezone(timezone.utc)
    target = parse_recovery_target(recovery_target)
    target_text = target.astimezone(timezone.utc).isoformat() if isinstance(target, datetime) else target
    digest = hashlib.sha256(f"{cluster_block}|{target_text}|{detected.isoformat()}".encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", cluster_block).strip("-.")[:80] or "cluster"
    return f"{name}-{detected:%Y%m%dT%H%M%SZ}-{digest[:6]}"


def _preview(report: RecoveryReport, cluster: PostgresCluster) -> str:
    failed = report.failed_critical()
    lines = [
        f"## Promote the restored database for `{report.target}`?",
        "",
        f"- **Recovery target**: {report.recovery_target}",
        f"- **Recoverable window**: {report.recoverable_window['earliest']} .. {report.recoverable_window['latest']}"
        if report.recoverable_window else "- **Recoverable window**: -",
        f"- **Restored instance**: port {report.candidate['port']}, backup set {report.candidate['backup_set']}",
        f"- **Data-loss window**: {report.rpo_seconds:.1f} s of commits (objective {report.rpo_objective_seconds} s); "
        f"last restored commit {report.last_restored_commit.isoformat() if report.last_restored_commit else 'none'}"
        if report.rpo_seconds is not None else "- **Data-loss window**: unknown",
        "",
        "| Check | Result | Detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in report.checks]
    lines += [
        "",
        f"Approving stops the primary at {cluster.primary.address}, moves its data directory to "
        f"`{cluster.primary.data_directory}.replaced-{report.incident_id}` and serves the endpoint from the "
        "restored instance. Rejecting keeps the restored instance for inspection and promotes nothing.",
        "" if not failed else f"**{len(failed)} critical check(s) failed.**",
    ]
    return "\n".join(lines)


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
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the inputs when empty, so a re-run resumes.
        lock_wait_seconds: how long to wait for another recovery of the same cluster to finish.
        take_backup_after: take a full backup of the recovered primary at the end.
        approval_poll_seconds: how often a paused run checks for an answer.
    """
    logger = get_run_logger()
    queries = list(verification_queries or [])
    tables = list(row_count_tables or [])
    approvers = list(allowed_approvers or [])
    started = utcnow()
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=cluster_block,
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None,
        drill=drill, dry_run=dry_run, incident_detected_at=incident_detected_at, started_at=started,
        recovery_target=recovery_target, rto_objective_seconds=0, rpo_objective_seconds=0,
    )
    try:
        with report.step("Preflight: validate inputs") as step:
            check_parameters()
            require_aware("incident_detected_at", incident_detected_at)
            refuse_future("incident_detected_at", incident_detected_at, started)
            check_approval_settings(approval_policy, approvers, approval_timeout_seconds, drill)
            target = parse_recovery_target(recovery_target)
            if isinstance(target, datetime):
                refuse_future("recovery target", target, started)
            objectives = load_block(
                RecoveryObjectives, objectives_block,
                default=RecoveryObjectives() if objectives_block == "default" else None,
            )
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            cluster = load_block(PostgresCluster, cluster_block)
            if approval_policy == "auto" and cluster.environment == "production":
                raise InvalidInput(
                    f"approval policy 'auto' is refused for {cluster_block!r}: its environment is production"
                )
            if incident_id:
                cluster.candidate_directory(incident_id)  # refuses an id that is not a plain name
            report.incident_id = incident_id or incident_key(cluster_block, recovery_target, incident_detected_at)
            step.detail = f"target {recovery_target}; incident {report.incident_id}"

        with recovery_lock(cluster_block, lock_wait_seconds, runtime.flow_run.id) as lock:
            logger.info("Holding %s for incident %s", lock, report.incident_id)
            return _recover(cluster, report, target, queries, tables, approval_policy, approvers,
                            approval_timeout_seconds, approval_poll_seconds, dry_run, take_backup_after)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The recovery stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        publish_evidence(report)


def _recover(
    cluster: PostgresCluster,
    report: RecoveryReport,
    target: datetime | str,
    queries: list[VerificationQuery],
    tables: list[str],
    approval_policy: str,
    approvers: list[str],
    approval_timeout_seconds: int,
    approval_poll_seconds: float,
    dry_run: bool,
    take_backup_after: bool,
) -> State:
    progress = cluster.promotion_progress(report.incident_id)
    if progress is not None and dry_run:
        return _dry_run_resume(cluster, report, progress, queries, take_backup_after)
    if progress is not None:
        step_name = ("Resume: promotion already done" if progress == "promoted"
                     else "Resume: finish the interrupted promotion")
        with report.step(step_name) as step:
            candidate = cluster.candidate_for(report.incident_id)
            if candidate is None:
                raise RecoveryError(f"promotion of {report.incident_id} was interrupted and its candidate is gone; "
                                    f"inspect {cluster.primary.data_directory} and its .replaced-* sibling by hand")
            # Idempotent: promotes nothing twice, but makes sure the endpoint runs and its timeline is archived.
            promotion = promote_restored_instance(cluster, candidate)
            step.detail = (f"approved in an earlier run of this incident; {promotion.endpoint} served from "
                           f"{promotion.data_directory} since {promotion.promoted_at}; old primary at "
                           f"{promotion.old_primary_aside}")
            _record_resumed(report, cluster, cluster.promoted_incident() or {}, promotion.already_promoted)
    else:
        with report.step("Preflight: recoverable window") as step:
            if not cluster.is_reachable():
                raise InvalidInput(f"cluster {report.target!r}: primary {cluster.primary.address} is unreachable")
            check_database_inputs(cluster, verification_queries=queries, row_count_tables=tables)
            # A real run closes and archives the current WAL segment first, so "now" is reachable;
            # a dry run changes nothing and judges the target against that same bound.
            archived = utcnow() if dry_run else archive_current_wal(cluster)
            window = list_backups(cluster, archived)
            report.recoverable_window = window.as_dict()
            if isinstance(target, datetime):
                check_target_in_window(target, window)
            else:
                find_restore_point(cluster, target)
            step.detail = f"window {window.earliest.isoformat()} .. {window.latest.isoformat()}"

        candidate_dir = cluster.candidate_directory(report.incident_id)
        plan = [
            f"fence writes on {cluster.primary.address}: connection limit 0 on every database, "
            "default_transaction_read_only=on, end client sessions",
            f"restore the newest backup before the target plus WAL to {report.recovery_target} into {candidate_dir}",
            f"verify the restored instance: pg_amcheck, row counts of {tables or 'no tables'}, {len(queries)} sentinel queries",
            "ask " + (", ".join(approvers) if approval_policy == "required" else "nobody (auto, drill)") + " to approve",
            f"stop {cluster.primary.address}, move {cluster.primary.data_directory} to "
            f"{cluster.primary.data_directory}.replaced-{report.incident_id}, start the restored instance there",
            *([f"rebuild the replicas {', '.join(r.address for r in cluster.replicas)} from the restored primary: "
               "one not streaming from it on its timeline is stopped, its data directory moved aside, and cloned "
               "afresh"] if cluster.replicas else []),
            "check the endpoint and take a fresh full backup",
        ]
        report.plan = plan
        if dry_run:
            report.outcome = "DryRun"
            report.summary = "Dry run: the plan was recorded and nothing was changed."
            return Completed(name="DryRun", message=report.summary)

        with report.step("Fence writes") as step:
            step.detail = f"{fence_writes(cluster)} client sessions ended; no new connections; primary read-only"

        with report.step("Assess damage on the primary") as step:
            damage = assess_corruption(cluster)
            report.add_checks("primary", [damage])
            step.detail = damage.detail

        with report.step("Restore beside the primary") as step:
            candidate = restore_to_point_in_time(cluster, report.incident_id, target)
            report.candidate = {"data_directory": candidate.data_directory, "port": candidate.port,
                                "backup_set": candidate.backup_set, "reused": candidate.reused}
            step.detail = f"{candidate.data_directory} on port {candidate.port} from backup {candidate.backup_set}"

        try:
            with report.step("Verify the restored instance") as step:
                report.add_checks("restored", verify_restored_instance(cluster, candidate.port, tables, queries))
                loss = measure_data_loss(cluster, candidate.port, report.incident_detected_at)
                report.last_restored_commit, report.rpo_seconds = loss.last_restored_commit, loss.seconds
                failed = report.failed_critical("restored")
                step.outcome = "ok" if not failed else "failed"
                step.detail = f"{len(report.checks)} checks, {len(failed)} critical failures; data loss {loss.seconds} s"
        except Exception:
            stop_restored_instance(cluster, candidate)  # a candidate that could not be verified is not left running
            raise

        if report.failed_critical("restored"):
            stop_restored_instance(cluster, candidate)
            report.outcome = "VerificationFailed"
            report.summary = (f"The restored instance failed verification and was not promoted; it is kept at "
                              f"{candidate.data_directory}. The primary stays fenced.")
            report.action_items += [f"inspect {candidate.data_directory}", "choose another recovery target"]
            return Failed(name="VerificationFailed", message=report.summary)

        decision = approval_step(report, approval_policy, _preview(report, cluster), approvers,
                                 approval_timeout_seconds, approval_poll_seconds)

        if decision is None or not decision.approved:
            stop_restored_instance(cluster, candidate)
            name = "ApprovalTimedOut" if decision is None else "Rejected"
            report.outcome = name
            report.summary = (f"Promotion was {'not approved in time' if decision is None else 'rejected'}; nothing was "
                              f"promoted. The restored candidate is kept at {candidate.data_directory} (port "
                              f"{candidate.port}, stopped). The primary stays fenced.")
            report.action_items += [f"inspect or discard the candidate at {candidate.data_directory}",
                                    f"unfence the primary with `dr unfence {report.target}` if it should take writes again"]
            get_run_logger().warning(report.summary)
            return Failed(name=name, message=report.summary) if decision is None else Cancelled(name=name, message=report.summary)

        with report.step("Promote the restored instance") as step:
            promotion = promote_restored_instance(cluster, candidate)
            report.promotion = {"endpoint": promotion.endpoint, "data_directory": promotion.data_directory,
                                "old_primary_aside": promotion.old_primary_aside,
                                "already_promoted": promotion.already_promoted, "promoted_at": promotion.promoted_at}
            step.detail = f"{promotion.endpoint} served from {promotion.data_directory}; old primary at {promotion.old_primary_aside}"

    if cluster.replicas:
        _rebuild_replicas(cluster, report)

    with report.step("Post-checks at the endpoint") as step:
        report.add_checks("endpoint", check_endpoint(cluster, queries))
        failed = report.failed_critical("endpoint")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(failed)} critical failures"
    if report.failed_critical("endpoint"):
        report.outcome = "PostCheckFailed"
        report.summary = "The restored instance serves the endpoint but post-checks failed; see Verification Results."
        return Failed(name="PostCheckFailed", message=report.summary)

    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    if take_backup_after:
        try:
            with report.step("Full backup of the recovered primary") as step:
                step.detail = f"backup set {take_full_backup(cluster).label}"
        except RecoveryError as exc:  # service is restored; the missing backup is an action item
            report.action_items.append(f"take a full backup of {report.target}: the one after recovery failed ({exc})")
    for check in report.checks:
        if check.name == "replicas streaming" and not check.passed:
            report.action_items.append(f"rebuild replicas of {report.target} from the recovered primary")
    report.outcome = "Recovered"
    report.summary = (f"The database {report.target} was restored to {report.recovery_target} and serves "
                      f"applications again at {cluster.primary.address}.")
    return Completed(name="Recovered", message=report.summary)


def _dry_run_resume(cluster: PostgresCluster, report: RecoveryReport, progress: str,
                    queries: list[VerificationQuery], take_backup_after: bool) -> State:
    """What a real re-run of an incident whose promotion was journalled would do; reads only, changes nothing."""
    primary_dir = cluster.primary.data_directory
    aside = f"{primary_dir}.replaced-{report.incident_id}"
    done = progress == "promoted"
    verb = "confirm" if done else "finish"
    with report.step("Resume: promotion journalled (dry run)") as step:
        candidate = cluster.candidate_for(report.incident_id)
        step.detail = (f"the promotion of incident {report.incident_id} was journalled ({progress}); "
                       f"a real run would {verb} it")
    head = (f"the promotion of incident {report.incident_id} was journalled ({progress}); a real run would {verb} "
            "it and restore nothing again")
    if candidate is None:
        report.plan = [head, f"its candidate is gone: a real run would stop and change nothing; inspect {primary_dir} "
                       f"and {aside} by hand"]
    elif done:
        report.plan = [head, f"make sure {cluster.primary.address} runs from {primary_dir} (the restored instance) "
                       "and its new timeline is archived"]
    else:
        report.plan = [head, f"stop {cluster.primary.address} if it runs, move {primary_dir} to {aside} unless it is "
                       f"there already, move the candidate {candidate.data_directory} to {primary_dir} unless it is "
                       "there already, start it there and archive its new timeline"]
    if candidate is not None:
        report.plan += [f"rebuild the replicas {', '.join(r.address for r in cluster.replicas)} from "
                        f"{cluster.primary.address} unless they stream from it on its timeline"] if cluster.replicas else []
        report.plan += [f"post-checks at {cluster.primary.address}: {len(queries)} verification queries",
                        "take a fresh full backup" if take_backup_after else "no backup afterwards (take_backup_after off)"]
    report.outcome = "DryRun"
    report.summary = (f"Dry run: the promotion of incident {report.incident_id} was journalled ({progress}); a real "
                      f"run would {verb} it. Nothing was changed.")
    return Completed(name="DryRun", message=report.summary)


def _rebuild_replicas(cluster: PostgresCluster, report: RecoveryReport) -> None:
    """Put every replica on the restored primary's timeline: the old ones still replay the abandoned history."""
    with report.step("Rebuild the replicas from the restored primary") as step:
        outcomes, failed = [], 0
        for inst in cluster.replicas:
            try:
                done = rebuild_replica(cluster, inst.port)
                outcomes.append(f"{done.address}: {done.method}"
                                + (f", old data directory kept at {done.moved_aside}" if done.moved_aside else ""))
            except (RecoveryError, TimeoutError) as exc:  # the primary serves; a replica left behind is an action item
                failed += 1
                outcomes.append(f"{inst.address}: NOT rebuilt: {exc}")
                report.action_items.append(f"rebuild {inst.address} from {cluster.primary.address}: it is not on the "
                                           f"restored primary's timeline and is no promotion candidate ({exc})")
        report.facts["replicas after the restore"] = outcomes
        step.outcome = "ok" if not failed else "failed"
        step.detail = "; ".join(outcomes)


def _record_resumed(report: RecoveryReport, cluster: PostgresCluster, marker: dict, already: bool) -> None:
    """Evidence of a promotion done (or finished) by resuming an earlier run of the same incident."""
    report.promotion = {
        "endpoint": cluster.primary.address, "data_directory": cluster.primary.data_directory,
        "old_primary_aside": marker.get("old_primary_aside"), "already_promoted": already,
        "promoted_at": marker.get("promoted_at"),
    }
    report.candidate = {"data_directory": cluster.primary.data_directory, "port": cluster.primary.port,
                        "backup_set": marker.get("backup_set")}
    last = marker.get("last_restored_commit")
    report.last_restored_commit = datetime.fromisoformat(last) if last else None
    if report.last_restored_commit is not None:
        report.rpo_seconds = max(0.0, (report.incident_detected_at - report.last_restored_commit).total_seconds())
