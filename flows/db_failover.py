"""Database server failure: promote the healthiest replica within the RPO, repoint the applications.

Runbook (continuity plans: "Database Server Failure", "Failover Procedures"):
  1. preflight: the cluster, the failed instance and the applications' secret exist
  2. rank the replicas by lag; pick the one least behind, within the RPO
  3. a named approver approves, seeing the lag and the data loss it implies (above the RPO only
     with an explicit acceptance of that loss)
  4. fence the old primary, or prove it unreachable: never two writers
  5. promote the chosen replica (``pg_ctl promote``)
  6. repoint the applications (the Secret holding the DSN) and restart them
  7. verify: the new primary takes writes, sentinel queries answer; the incident report
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State
from prefect.variables import Variable
from pydantic import Field

from blocks import PostgresCluster, RecoveryObjectives
from blocks.errors import InvalidInput, PostgresError
from blocks.kubernetes import KubernetesTarget
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalDecision, ApprovalPolicy, approval_step, check_approval_settings
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from tasks.kubernetes import read_replicas, restart_rollout, set_app_secret
from runbook.locks import recovery_lock
from tasks.postgres import check_database_inputs
from tasks.replication import (
    fence_old_primary,
    list_writers,
    measure_replica_lag,
    promote_replica,
    rank_replicas,
    read_roles,
    wait_for_replay,
)
from tasks.smoke import smoke_test_sql

SCENARIO = "db-failover"
# How long a journalled promotion of another incident still explains a promoted replica.
JOURNAL_TTL = timedelta(hours=24)


class FailoverDecision(ApprovalDecision):
    """The approver's answer to a failover, with an explicit word on the stated data loss."""

    accept_data_loss: bool = Field(
        description="Tick to accept the data loss stated in the preview. Required when the replica lag is above "
                    "the RPO or unknown; a failover above the RPO without it promotes nothing. The field has no "
                    "default on purpose: an answer that does not state it is not taken as an acceptance.")


def dsn_for(cluster: PostgresCluster, port: int, host: str | None = None) -> str:
    """The DSN applications use for the instance on ``port``; the password stays in its own secret."""
    inst = cluster.instance_at(port)
    return f"postgresql://{cluster.user}@{host or inst.host}:{inst.port}/{cluster.database}"


def failover_key(scope: str, detected: datetime) -> str:
    """A stable id for one incident, so a re-run of the same failover finds its earlier work."""
    detected = detected.astimezone(timezone.utc)
    digest = hashlib.sha256(f"{scope}|{detected.isoformat()}".encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", scope).strip("-.")[:80] or "estate"
    return f"{name}-{detected:%Y%m%dT%H%M%SZ}-{digest[:6]}"


def journal_name(scope: str) -> str:
    """The Prefect Variable that journals a promotion done for ``scope`` (an estate or a cluster)."""
    return "dr_failover_" + re.sub(r"[^a-z0-9]+", "_", scope.lower()).strip("_")


def read_journal(scope: str, incident_id: str | None = None) -> dict | None:
    """The promotion journalled for ``scope`` by an earlier run, if any.

    An entry of another incident counts only while it is younger than ``JOURNAL_TTL``: a promotion
    journalled long ago says nothing about who the primary should be today.
    """
    entry = Variable.get(journal_name(scope), default=None)
    if not isinstance(entry, dict):
        return None
    if incident_id is not None and entry.get("incident_id") == incident_id:
        return entry
    try:
        written = datetime.fromisoformat(str(entry.get("written_at")))
    except ValueError:
        return None
    if written.tzinfo is None or utcnow() - written > JOURNAL_TTL:
        return None
    return entry


def write_journal(scope: str, entry: dict) -> None:
    """Journal a step of a promotion for ``scope`` (stamped with the time it was written)."""
    Variable.set(journal_name(scope), {**entry, "written_at": utcnow().isoformat()}, overwrite=True)


def confirm_lag_after_fence(report: RecoveryReport, cluster: PostgresCluster, chosen: int, failed_port: int,
                            fenced: dict, lost_at: datetime, rpo: float, wait_seconds: float = 60) -> str | None:
    """Check, after the old primary is fenced, that promoting ``chosen`` loses no more than was approved.

    A fenced primary that answered named its last WAL position: the candidate must replay it (bounded
    wait). Otherwise the lag is measured again and held against the RPO or the approver's acceptance.

    Returns:
        None to go on, or a message why nothing is promoted.
    """
    final = fenced.get("final_lsn")
    if final and wait_for_replay(cluster, chosen, final, wait_seconds):
        report.facts["replayed before promotion"] = f"{cluster.instance_at(chosen).address} replayed {final}"
        return None
    lag = measure_replica_lag(cluster, chosen, failed_port, lost_at)
    report.facts["replica lag at promotion"] = {"bytes": lag.bytes, "seconds": lag.seconds, "detail": lag.detail}
    accepted = bool(report.approvals and report.approvals[-1].details.get("accept_data_loss"))
    if lag.within(rpo) or accepted:
        report.rpo_seconds = lag.seconds
        return None
    return (f"After fencing, {cluster.instance_at(chosen).address} is "
            f"{'an unknown time' if lag.seconds is None else f'{lag.seconds:.1f} s'} behind (RPO {rpo} s) and the "
            f"approval did not accept data loss; the old primary is {fenced['state']} and nothing was promoted.")


def clear_journal(scope: str) -> None:
    Variable.unset(journal_name(scope))


def decide(report: RecoveryReport, approval_policy: str, approvers: list[str], timeout_seconds: int,
           poll_seconds: float, preview: str, lag_within_rpo: bool):
    """Record the approval; returns (outcome name or None when approved to go on, message)."""
    decision = approval_step(report, approval_policy, preview, approvers, timeout_seconds, poll_seconds,
                             decision_model=FailoverDecision)
    if decision is None:
        return "ApprovalTimedOut", "Failover was not approved in time; nothing was changed."
    if not decision.approved:
        return "Rejected", f"Failover was rejected by {decision.approver}; nothing was changed."
    if not lag_within_rpo:
        with report.step("Data loss above the RPO") as step:
            if not decision.details.get("accept_data_loss"):
                step.outcome = "blocked"
                step.detail = f"approved by {decision.approver}, who did not accept the stated data loss"
                return "LagAboveRpo", ("The replica lag is above the RPO (or unknown) and the approval did not "
                                       "accept the stated data loss; nothing was promoted.")
            step.detail = f"accepted by {decision.approver}"
    return None, ""


def finish_refused(report: RecoveryReport, name: str, message: str) -> State:
    report.outcome, report.summary = name, message
    get_run_logger().warning(message)
    if name == "Rejected":
        return Cancelled(name=name, message=message)
    return Failed(name=name, message=message)


@recovery_flow(name="database-server-failover", description="Promote the healthiest replica within the RPO and repoint the apps.")
def db_failover(
    cluster_block: str,
    failed_port: int | None = None,
    incident_detected_at: datetime | None = None,
    kubernetes_target: str | None = None,
    database_secret: str | None = None,
    database_secret_key: str = "DATABASE_URL",
    restart_deployments: list[str] | None = None,
    smoke_queries: list[str] | None = None,
    approval_policy: ApprovalPolicy = "required",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 3600,
    approval_poll_seconds: float = 5,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "database",
    incident_id: str | None = None,
    lock_wait_seconds: int = 30,
) -> State:
    """Fail a PostgreSQL cluster over from a lost server to its healthiest replica.

    Args:
        cluster_block: name of the PostgresCluster block.
        failed_port: port of the lost server (default: the block's primary).
        incident_detected_at: when the failure was detected (tz-aware; default: now).
        kubernetes_target: KubernetesTarget block of the applications to repoint (optional).
        database_secret: Secret in that namespace holding the applications' DSN.
        database_secret_key: key of the DSN in the Secret.
        restart_deployments: deployments restarted after repointing so they pick the new DSN up.
        smoke_queries: queries the new primary must answer.
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the promotion.
        approval_timeout_seconds: how long to wait for approval before giving up without promoting.
        approval_poll_seconds: how often a paused run checks for an answer.
        dry_run: record every change it would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the inputs when empty.
        lock_wait_seconds: how long to wait for another recovery of the same cluster to finish.
    """
    approvers = list(allowed_approvers or [])
    restarts = list(restart_deployments or [])
    started = utcnow()
    detected = incident_detected_at or started
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=cluster_block,
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None, drill=drill, dry_run=dry_run,
        incident_detected_at=detected, started_at=started, rto_objective_seconds=0, rpo_objective_seconds=0,
        recovery_target="the healthiest replica within the RPO",
    )
    try:
        with report.step("Preflight: validate inputs") as step:
            check_parameters()
            if detected.tzinfo is None:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} has no time zone")
            if detected > started:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} is in the future")
            check_approval_settings(approval_policy, approvers, approval_timeout_seconds, drill)
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            cluster = load_block(PostgresCluster, cluster_block)
            if approval_policy == "auto" and cluster.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused for {cluster_block!r}: its environment is production")
            failed = cluster.instance_at(failed_port if failed_port is not None else cluster.primary.port)
            if len(cluster.instances()) < 2:
                raise InvalidInput(f"cluster {cluster_block!r} has no replica to fail over to")
            kube = None
            if kubernetes_target:
                kube = load_block(KubernetesTarget, kubernetes_target)
                for name in restarts:
                    read_replicas(kube, name)  # an unknown deployment is refused here, before any change
            elif database_secret or restarts:
                raise InvalidInput("database_secret and restart_deployments need kubernetes_target")
            if smoke_queries:
                # Parsed and planned (never run) on a server that answers, before anything changes.
                probe = next((i.port for i in cluster.instances() if i.port != failed.port and cluster.is_reachable(i.port)),
                             None)
                if probe is not None:
                    check_database_inputs(cluster, smoke_queries=list(smoke_queries), port=probe)
            report.incident_id = incident_id or failover_key(f"{cluster_block}-{failed.port}", detected)
            step.detail = f"failed server {failed.address}; incident {report.incident_id}"

        with recovery_lock(cluster_block, lock_wait_seconds, runtime.flow_run.id) as lock:
            get_run_logger().info("Holding %s for incident %s", lock, report.incident_id)
            return _fail_over(cluster, failed.port, kube, database_secret, database_secret_key, restarts,
                              list(smoke_queries or []), report, objective.rpo_seconds, approval_policy, approvers,
                              approval_timeout_seconds, approval_poll_seconds, dry_run)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The failover stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        report.facts["step seconds"] = {s.step: round((s.end - s.start).total_seconds(), 3) for s in report.steps if s.end}
        publish_evidence(report)


def _fail_over(cluster, failed_port, kube, secret, secret_key, restarts, queries, report, rpo, approval_policy,
               approvers, approval_timeout_seconds, approval_poll_seconds, dry_run) -> State:
    failed = cluster.instance_at(failed_port)
    with report.step("Assess the cluster") as step:
        roles = read_roles(cluster)
        writers = [p for p, r in roles.items() if r == "primary" and p != failed_port]
        report.facts["roles before"] = ", ".join(f"{p}: {r}" for p, r in sorted(roles.items()))
        step.detail = report.facts["roles before"]
    journal = read_journal(report.target, report.incident_id) or {}
    if writers and journal.get("promoted_port") not in writers:
        return finish_refused(report, "UnexpectedPrimary",
                              f"{cluster.instance_at(writers[0]).address} is already a primary, but no failover of "
                              f"{report.target} promoted it; resolve the topology by hand. Nothing was changed.")
    if writers:
        # An earlier run of this failover promoted a replica already (journalled): finish what is left.
        chosen = writers[0]
        lag_within, lag_text = True, "promotion done earlier; not measured again"
        report.facts["chosen replica"] = cluster.instance_at(chosen).address
        report.rpo_seconds = None
    else:
        with report.step("Rank the replicas") as step:
            lags = rank_replicas(cluster, failed_port, report.incident_detected_at)
            report.facts["replica lag"] = [f"{lag.address}: {lag.bytes} bytes, "
                                           f"{'unknown' if lag.seconds is None else f'{lag.seconds:.1f}'} s ({lag.measured_from})"
                                           for lag in lags]
            if not lags:
                step.outcome, step.detail = "failed", "no reachable replica"
                return finish_refused(report, "NoCandidate",
                                      f"No replica of {report.target} answers; nothing to promote.")
            off_timeline = [lag for lag in lags if not lag.on_history]
            if off_timeline:
                report.facts["not promotion candidates"] = [lag.detail for lag in off_timeline]
            if len(off_timeline) == len(lags):
                step.outcome, step.detail = "failed", "; ".join(lag.detail for lag in off_timeline)
                return finish_refused(report, "NoCandidate",
                                      f"No replica of {report.target} is on the primary's timeline: "
                                      f"{'; '.join(lag.detail for lag in off_timeline)}. Nothing was changed.")
            best = lags[0]
            chosen = best.port
            lag_within = best.within(rpo)
            lag_text = best.detail
            report.rpo_seconds = best.seconds
            report.last_restored_commit = best.last_replayed_commit
            report.facts["chosen replica"] = best.address
            step.detail = (f"{best.address}: {best.bytes} bytes, "
                           f"{'unknown' if best.seconds is None else f'{best.seconds:.1f}'} s behind "
                           f"(RPO {rpo} s: {'within' if lag_within else 'ABOVE'})")

    new = cluster.instance_at(chosen)
    new_dsn = dsn_for(cluster, chosen)
    plan = [f"old primary {failed.address}: {roles.get(failed_port)} -> fenced"
            + (" and stopped" if failed.data_directory else "") + " (or recorded unreachable)",
            f"database {new.address}: {roles.get(chosen)} -> primary (promoted, open for writes)"]
    if kube and secret:
        plan.append(f"secret {kube.namespace}/{secret} key {secret_key}: current DSN -> {new_dsn}")
    plan += [f"deployment {kube.namespace}/{name}: rollout restart" for name in restarts] if kube else []
    plan.append(f"verify {new.address} takes writes and answers {len(queries)} queries")
    if writers and dry_run:
        plan.insert(0, f"the promotion of {new.address} was journalled by an earlier run of incident "
                       f"{journal.get('incident_id') or report.incident_id}: a real run would confirm it, promote "
                       "nothing twice and finish the steps below")
    report.plan = plan
    if dry_run:
        report.outcome = "DryRun"
        report.summary = "Dry run: the plan was recorded and nothing was changed."
        return Completed(name="DryRun", message=report.summary)

    preview = "\n".join([
        f"## Fail {report.target} over from {failed.address} to {new.address}?", "",
        f"- **Replica lag**: {lag_text}",
        f"- **Estimated data loss**: {'unknown' if report.rpo_seconds is None else f'at most {report.rpo_seconds:.1f} s'} "
        f"of commits (RPO {rpo} s: {'within' if lag_within else '**ABOVE: tick accept_data_loss to go on**'})",
        "", "### Changes", *[f"1. {item}" for item in plan],
    ])
    name, message = decide(report, approval_policy, approvers, approval_timeout_seconds, approval_poll_seconds,
                           preview, lag_within)
    if name:
        return finish_refused(report, name, message)

    with report.step("Fence the old primary") as step:
        fenced = fence_old_primary(cluster, failed_port)
        report.facts["old primary"] = f"{fenced['address']}: {fenced['state']}"
        step.detail = report.facts["old primary"]
    if not writers:
        with report.step("Confirm the lag after fencing") as step:
            refusal = confirm_lag_after_fence(report, cluster, chosen, failed_port, fenced,
                                              report.incident_detected_at, rpo)
            step.detail = refusal or report.facts.get("replayed before promotion") or "within what was approved"
        if refusal:
            return finish_refused(report, "LagAboveRpo", refusal)
    with report.step("Promote the replica") as step:
        writers_now = list_writers(cluster)
        if any(p != chosen for p in writers_now):
            raise PostgresError(f"instances on ports {writers_now} accept writes; refusing to promote a second writer")
        write_journal(report.target, {"promoted_port": chosen, "incident_id": report.incident_id, "state": "promoting"})
        promotion = promote_replica(cluster, chosen)
        write_journal(report.target, {"promoted_port": chosen, "incident_id": report.incident_id, "state": "promoted",
                                      "promoted_at": promotion.promoted_at or utcnow().isoformat()})
        report.promotion = {"endpoint": promotion.address, "already_promoted": promotion.already_primary,
                            "promoted_at": promotion.promoted_at, "timeline": promotion.timeline}
        step.detail = f"{promotion.address} is the primary (already: {promotion.already_primary})"
    if kube and secret:
        with report.step("Repoint the applications") as step:
            set_app_secret(kube, secret, secret_key, new_dsn)
            for name in restarts:
                restart_rollout(kube, name)
            step.detail = f"{secret}.{secret_key} -> {new_dsn}; restarted {', '.join(restarts) or 'nothing'}"
    with report.step("Verify the new primary") as step:
        report.add_checks("new primary", smoke_test_sql(cluster, chosen, queries))
        failed_checks = report.failed_critical("new primary")
        step.outcome = "ok" if not failed_checks else "failed"
        step.detail = f"{len(failed_checks)} critical failures"
    if report.failed_critical():
        report.outcome = "VerificationFailed"
        report.summary = f"{new.address} was promoted but verification failed; see Verification Results."
        return Failed(name="VerificationFailed", message=report.summary)
    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.action_items.append(f"rebuild {failed.address} as a replica of {new.address} (pg_rewind or a fresh clone)")
    report.outcome = "FailedOver"
    report.summary = f"{new.address} is the primary of {report.target}; the applications use {new_dsn}."
    return Completed(name="FailedOver", message=report.summary)
