"""Restore beside the primary, verify, approve, promote: the part of a runbook that replaces a database.

Shared by the database-corruption recovery and the security-breach response. The primary is
never touched until an approver has seen the verified candidate; a candidate that fails
verification, or is rejected, is stopped and kept for inspection.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Callable

from prefect.states import State

from blocks import CheckResult, PostgresCluster, VerificationQuery
from blocks.errors import RecoveryError
from blocks.postgres import Candidate, Promotion
from runbook.run import Recovery
from tasks.postgres import (
    check_endpoint,
    measure_data_loss,
    promote_restored_instance,
    restore_to_point_in_time,
    stop_restored_instance,
    verify_restored_instance,
)
from tasks.replication import rebuild_replica


def record_candidate(run: Recovery, candidate: Candidate) -> None:
    run.report.candidate = {"data_directory": candidate.data_directory, "port": candidate.port,
                            "backup_set": candidate.backup_set, "reused": candidate.reused}


def record_promotion(run: Recovery, promotion: Promotion, already: bool | None = None) -> None:
    run.report.promotion = asdict(promotion)
    if already is not None:
        run.report.promotion["already_promoted"] = already


def aside_directory(cluster: PostgresCluster, incident_id: str) -> str:
    """Where promotion keeps the replaced primary's data directory."""
    return f"{cluster.primary.data_directory}.replaced-{incident_id}"


def resume_promotion(run: Recovery, cluster: PostgresCluster, step_name: str) -> Promotion:
    """Finish (or confirm) a promotion an earlier run of the same incident journalled; promotes nothing twice."""
    with run.step(step_name) as step:
        candidate = cluster.candidate_for(run.incident_id)
        if candidate is None:
            raise RecoveryError(f"promotion of {run.incident_id} was interrupted and its candidate is gone; "
                                f"inspect {cluster.primary.data_directory} and its .replaced-* sibling by hand")
        promotion = promote_restored_instance(cluster, candidate)
        step.detail = (f"approved in an earlier run of this incident; {promotion.endpoint} served from "
                       f"{promotion.data_directory} since {promotion.promoted_at}; old primary at "
                       f"{promotion.old_primary_aside}")
    return promotion


def restore_verify_promote(
    run: Recovery,
    cluster: PostgresCluster,
    target: datetime | str,
    *,
    tables: list[str],
    queries: list[VerificationQuery],
    loss_until: datetime,
    preview: Callable[[Candidate], str],
    context: str = "",
    stop_items: Callable[[Candidate], list[str]] = lambda candidate: [],
    after_restore: Callable[[Candidate], str] | None = None,
    more_checks: Callable[[Candidate], list[CheckResult]] | None = None,
) -> State | None:
    """Restore to ``target`` beside the primary, verify, ask for approval, promote.

    Args:
        loss_until: the end of the data-loss window (detection, or the moment writes were fenced).
        preview: the approval preview for the verified candidate.
        context: what the run already did, prefixed to a summary when it stops short of promotion.
        stop_items: action items when it stops short (the candidate is always named).
        after_restore: a step inside the restore, before anyone can connect (e.g. new role passwords); its detail.
        more_checks: further checks of the restored instance, after row counts, sentinels and data loss.

    Returns:
        The final state when the run stops short of promotion (VerificationFailed, Rejected,
        ApprovalTimedOut); None once the candidate serves the endpoint.
    """
    report = run.report
    with run.step("Restore beside the primary") as step:
        candidate = restore_to_point_in_time(cluster, run.incident_id, target)
        record_candidate(run, candidate)
        extra = after_restore(candidate) if after_restore else ""
        step.detail = (f"{candidate.data_directory} on port {candidate.port} from backup {candidate.backup_set}"
                       + (f"; {extra}" if extra else ""))

    try:
        with run.step("Verify the restored instance") as step:
            report.add_checks("restored", verify_restored_instance(cluster, candidate.port, tables, queries))
            loss = measure_data_loss(cluster, candidate.port, loss_until)
            report.last_restored_commit, report.rpo_seconds = loss.last_restored_commit, loss.seconds
            if more_checks:
                report.add_checks("restored", more_checks(candidate))
            failed = report.failed_critical("restored")
            step.outcome = "ok" if not failed else "failed"
            step.detail = (f"{len([c for c in report.checks if c.stage == 'restored'])} checks, {len(failed)} "
                           f"critical failures; data loss {report.rpo_seconds} s")
    except Exception:
        stop_restored_instance(cluster, candidate)  # a candidate that could not be verified is not left running
        raise

    kept = f"{candidate.data_directory} (port {candidate.port}, stopped)"
    if report.failed_critical("restored"):
        stop_restored_instance(cluster, candidate)
        return run.finish("VerificationFailed",
                          f"{context}The restored instance failed verification and was not promoted; it is kept at "
                          f"{kept}. The primary stays fenced.",
                          action_items=[f"inspect {candidate.data_directory}", "choose another recovery target",
                                        *stop_items(candidate)])

    decision = run.approve(preview(candidate))
    if decision is None or not decision.approved:
        stop_restored_instance(cluster, candidate)
        return run.declined(decision, f"{context}Promotion of the restored instance",
                            f"nothing was promoted. The candidate is kept at {kept}. The primary stays fenced",
                            action_items=[f"inspect or discard the candidate at {candidate.data_directory}",
                                          *stop_items(candidate)])

    with run.step("Promote the restored instance") as step:
        promotion = promote_restored_instance(cluster, candidate)
        record_promotion(run, promotion)
        step.detail = (f"{promotion.endpoint} served from {promotion.data_directory}; old primary at "
                       f"{promotion.old_primary_aside}")
    return None


def post_checks(run: Recovery, cluster: PostgresCluster, queries: list[VerificationQuery]) -> bool:
    """Checks at the endpoint applications use; True when every critical one passed."""
    with run.step("Post-checks at the endpoint") as step:
        run.report.add_checks("endpoint", check_endpoint(cluster, queries))
        failed = run.report.failed_critical("endpoint")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(failed)} critical failures"
    for check in run.report.checks:
        if check.name == "replicas streaming" and not check.passed:
            run.report.action_items.append(f"rebuild replicas of {run.report.target} from the recovered primary")
    return not failed


def rebuild_replicas(run: Recovery, cluster: PostgresCluster) -> None:
    """Put every replica on the restored primary's timeline: the old ones still replay the abandoned history."""
    with run.step("Rebuild the replicas from the restored primary") as step:
        outcomes, failed = [], 0
        for inst in cluster.replicas:
            try:
                done = rebuild_replica(cluster, inst.port)
                outcomes.append(f"{done.address}: {done.method}"
                                + (f", old data directory kept at {done.moved_aside}" if done.moved_aside else ""))
            except (RecoveryError, TimeoutError) as exc:  # the primary serves; a replica left behind is an action item
                failed += 1
                outcomes.append(f"{inst.address}: NOT rebuilt: {exc}")
                run.report.action_items.append(
                    f"rebuild {inst.address} from {cluster.primary.address}: it is not on the restored primary's "
                    f"timeline and is no promotion candidate ({exc})")
        run.report.facts["replicas after the restore"] = outcomes
        step.outcome = "ok" if not failed else "failed"
        step.detail = "; ".join(outcomes)

