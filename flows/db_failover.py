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

from datetime import datetime

from prefect.states import State

from blocks import PostgresCluster
from blocks._pg_replication import ReplicaLag
from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.loading import load_block
from runbook.evidence import utcnow
from runbook.failover import (
    confirm_lag_after_fence,
    decide,
    dsn_for,
    finish_refused,
    promote_journalled,
    read_journal,
    record_replica_promotion,
    timed_steps,
)
from runbook.parameters import recovery_flow
from runbook.run import Approval, ApprovalPolicy, Recovery
from tasks.kubernetes import read_replicas, restart_rollout, set_app_secret
from tasks.postgres import check_database_inputs
from tasks.replication import fence_old_primary, rank_replicas, read_roles
from tasks.smoke import smoke_test_sql

SCENARIO = "db-failover"


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
    severity: str | None = None,
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
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record every change it would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the inputs when empty.
        lock_wait_seconds: how long to wait for another recovery of the same cluster to finish.
    """
    restarts, queries = list(restart_deployments or []), list(smoke_queries or [])
    run = Recovery(
        SCENARIO, target=cluster_block, severity=severity, detected_at=incident_detected_at or utcnow(),
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        recovery_target="the healthiest replica within the RPO", incident_id=incident_id,
    )
    report = run.report
    with run, timed_steps(run):
        # 1. Preflight: the cluster, the failed instance and the applications' secret exist.
        with run.preflight() as step:
            cluster = load_block(PostgresCluster, cluster_block)
            run.refuse_unsafe_policy(cluster_block, cluster.environment)
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
            if queries:
                # Parsed and planned (never run) on a server that answers, before anything changes.
                probe = next((i.port for i in cluster.instances() if i.port != failed.port and cluster.is_reachable(i.port)),
                             None)
                if probe is not None:
                    check_database_inputs(cluster, smoke_queries=queries, port=probe)
            run.assign_incident(incident_id, f"{cluster_block}-{failed.port}")
            step.detail = f"failed server {failed.address}; incident {run.incident_id}"

        with run.locks(cluster_block, wait_seconds=lock_wait_seconds):
            # 2. The replica least behind, within the RPO; a replica an earlier run promoted is kept.
            with run.step("Assess the cluster") as step:
                roles = read_roles(cluster)
                writers = [p for p, r in roles.items() if r == "primary" and p != failed.port]
                report.facts["roles before"] = step.detail = ", ".join(f"{p}: {r}" for p, r in sorted(roles.items()))
            journal = read_journal(cluster_block, run.incident_id) or {}
            if writers and journal.get("promoted_port") not in writers:
                return finish_refused(run, "UnexpectedPrimary",
                                      f"{cluster.instance_at(writers[0]).address} is already a primary, but no failover "
                                      f"of {cluster_block} promoted it; resolve the topology by hand. Nothing was changed.")
            if writers:
                # An earlier run of this failover promoted a replica already (journalled): finish what is left.
                chosen, lag_within, lag_text = writers[0], True, "promotion done earlier; not measured again"
                report.facts["chosen replica"] = cluster.instance_at(chosen).address
                report.rpo_seconds = None
            else:
                best = _rank(run, cluster, failed.port)
                if isinstance(best, State):
                    return best
                chosen, lag_within, lag_text = best.port, best.within(report.rpo_objective_seconds), best.detail

            # 3. The plan; a named approver approves it, seeing the lag and the data loss it implies.
            new, new_dsn = cluster.instance_at(chosen), dsn_for(cluster, chosen)
            plan = [f"old primary {failed.address}: {roles.get(failed.port)} -> fenced"
                    + (" and stopped" if failed.data_directory else "") + " (or recorded unreachable)",
                    f"database {new.address}: {roles.get(chosen)} -> primary (promoted, open for writes)"]
            if kube and database_secret:
                plan.append(f"secret {kube.namespace}/{database_secret} key {database_secret_key}: current DSN -> {new_dsn}")
            plan += [f"deployment {kube.namespace}/{name}: rollout restart" for name in restarts] if kube else []
            plan.append(f"verify {new.address} takes writes and answers {len(queries)} queries")
            if writers and dry_run:
                plan.insert(0, f"the promotion of {new.address} was journalled by an earlier run of incident "
                               f"{journal.get('incident_id') or run.incident_id}: a real run would confirm it, promote "
                               "nothing twice and finish the steps below")
            if dry_run:
                return run.planned(plan)
            report.plan = plan
            stopped = decide(run, _preview(run, failed.address, new.address, lag_text, lag_within), lag_within)
            if stopped is not None:
                return stopped

            # 4. Fence the old primary, or prove it unreachable: never two writers.
            with run.step("Fence the old primary") as step:
                fenced = fence_old_primary(cluster, failed.port)
                report.facts["old primary"] = step.detail = f"{fenced['address']}: {fenced['state']}"
            if not writers:
                with run.step("Confirm the lag after fencing") as step:
                    refusal = confirm_lag_after_fence(run, cluster, chosen, failed.port, fenced, run.detected_at)
                    step.detail = refusal or report.facts.get("replayed before promotion") or "within what was approved"
                if refusal:
                    return finish_refused(run, "LagAboveRpo", refusal)

            # 5. Promote the chosen replica.
            with run.step("Promote the replica") as step:
                promotion = promote_journalled(run, cluster, chosen, cluster_block)
                record_replica_promotion(run, promotion, timeline=promotion.timeline)
                step.detail = f"{promotion.address} is the primary (already: {promotion.already_primary})"

            # 6. Repoint the applications and restart them.
            if kube and database_secret:
                with run.step("Repoint the applications") as step:
                    set_app_secret(kube, database_secret, database_secret_key, new_dsn)
                    for name in restarts:
                        restart_rollout(kube, name)
                    step.detail = (f"{database_secret}.{database_secret_key} -> {new_dsn}; "
                                   f"restarted {', '.join(restarts) or 'nothing'}")

            # 7. Verify: the new primary takes writes and answers the sentinel queries.
            with run.step("Verify the new primary") as step:
                report.add_checks("new primary", smoke_test_sql(cluster, chosen, queries))
                failed_checks = report.failed_critical("new primary")
                step.outcome = "ok" if not failed_checks else "failed"
                step.detail = f"{len(failed_checks)} critical failures"
            if report.failed_critical():
                return run.finish("VerificationFailed",
                                  f"{new.address} was promoted but verification failed; see Verification Results.")
            run.mark_restored()
            return run.finish("FailedOver", f"{new.address} is the primary of {cluster_block}; the applications use "
                              f"{new_dsn}.", action_items=[f"rebuild {failed.address} as a replica of {new.address} "
                                                           "(pg_rewind or a fresh clone)"])


def _rank(run: Recovery, cluster: PostgresCluster, failed_port: int) -> ReplicaLag | State:
    """The promotion candidate least behind the lost primary, or the state of a run with none."""
    report, rpo = run.report, run.report.rpo_objective_seconds
    with run.step("Rank the replicas") as step:
        lags = rank_replicas(cluster, failed_port, run.detected_at)
        report.facts["replica lag"] = [f"{lag.address}: {lag.bytes} bytes, "
                                       f"{'unknown' if lag.seconds is None else f'{lag.seconds:.1f}'} s ({lag.measured_from})"
                                       for lag in lags]
        if not lags:
            step.outcome, step.detail = "failed", "no reachable replica"
            return finish_refused(run, "NoCandidate", f"No replica of {report.target} answers; nothing to promote.")
        off_timeline = [lag for lag in lags if not lag.on_history]
        if off_timeline:
            report.facts["not promotion candidates"] = [lag.detail for lag in off_timeline]
        if len(off_timeline) == len(lags):
            step.outcome, step.detail = "failed", "; ".join(lag.detail for lag in off_timeline)
            return finish_refused(run, "NoCandidate",
                                  f"No replica of {report.target} is on the primary's timeline: "
                                  f"{'; '.join(lag.detail for lag in off_timeline)}. Nothing was changed.")
        best = lags[0]
        report.rpo_seconds = best.seconds
        report.last_restored_commit = best.last_replayed_commit
        report.facts["chosen replica"] = best.address
        step.detail = (f"{best.address}: {best.bytes} bytes, "
                       f"{'unknown' if best.seconds is None else f'{best.seconds:.1f}'} s behind "
                       f"(RPO {rpo} s: {'within' if best.within(rpo) else 'ABOVE'})")
    return best


def _preview(run: Recovery, old_address: str, new_address: str, lag_text: str, lag_within: bool) -> str:
    report = run.report
    loss = "unknown" if report.rpo_seconds is None else f"at most {report.rpo_seconds:.1f} s"
    return "\n".join([
        f"## Fail {report.target} over from {old_address} to {new_address}?", "",
        f"- **Replica lag**: {lag_text}",
        f"- **Estimated data loss**: {loss} of commits (RPO {report.rpo_objective_seconds} s: "
        f"{'within' if lag_within else '**ABOVE: tick accept_data_loss to go on**'})",
        "", "### Changes", *[f"1. {item}" for item in report.plan],
    ])
