"""Regional outage: move the database, the workloads and DNS to the DR region.

Runbook (continuity plans: "Scenario 1: Regional Outage", "Failover Procedures", "Regional
Failover Procedure", "Service Recovery Priorities"):
  1. declare: the two regions, the DNS zone and the database exist and differ
  2. health evidence: the primary region's endpoints failed N consecutive probes within a window
     (default 2 over 60 s, the automated DNS failover trigger)
  3. database evidence: the DR replica's lag, the estimated data loss against the RPO
  4. a named approver approves, seeing the evidence and every change (above the RPO only with an
     explicit acceptance of the stated data loss)
  5. database failover: fence the old primary or prove it unreachable, promote the DR replica,
     repoint the DR applications
  6. scale the DR workloads up, tier 1 first, each tier ready before the next
  7. DNS cutover: UPSERT the records to the DR target, wait until INSYNC
  8. verification: smoke tests over HTTP and SQL; evidence with the RTO and RPO achieved

Every irreversible step is idempotent and journalled where it happened (the database's role, the
DNS records themselves), so a re-run after a crash never promotes twice or flips DNS twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from prefect import get_run_logger
from prefect.states import State

from blocks.rds import RdsError, proves_not_writing
from runbook.evidence import utcnow
from runbook.failover import (
    confirm_lag_after_fence,
    decide,
    finish_refused,
    promote_journalled,
    read_journal,
    record_replica_promotion,
    timed_steps,
)
from runbook.parameters import recovery_flow
from runbook.run import Approval, ApprovalPolicy, Recovery
from runbook.two_region import TwoRegionEstate, load_estate, scale_in_tiers, scale_plan
from tasks.dns import check_dns_zone, cutover_dns, plan_dns_cutover
from tasks.health import probe_health
from tasks.kubernetes import restart_rollout, set_app_secret
from tasks.postgres import check_database_inputs
from tasks.rds import check_rds_promoted, describe_rds_instance, promote_rds_replica, read_rds_replica_lag
from tasks.replication import fence_old_primary, list_writers, measure_replica_lag, read_roles
from tasks.smoke import smoke_test_http, smoke_test_sql

SCENARIO = "regional-failover"


@dataclass(frozen=True)
class DatabaseEvidence:
    """The old primary and the DR database before the failover, and the data loss promoting would imply."""

    old_address: str
    new_address: str
    old_role: str
    dr_role: str
    old_writable: bool
    resumed: bool  # the DR database was promoted by an earlier run of this failover
    lag_within: bool
    lag_text: str


@recovery_flow(name="regional-failover", description="Fail the estate over to the DR region: database, workloads, DNS.")
def regional_failover(
    primary_region: str,
    dr_region: str,
    dns_zone: str,
    incident_detected_at: datetime | None = None,
    health_failures: int = 2,
    health_window_seconds: float = 60,
    require_outage: bool = True,
    fence_old_primary_first: bool = True,
    dns_ttl_seconds: int | None = None,
    smoke_queries: list[str] | None = None,
    rollout_timeout_seconds: float = 300,
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
    """Fail a two-region estate over to its DR region.

    Args:
        primary_region: Region block of the region that failed.
        dr_region: Region block of the region taking over.
        dns_zone: DnsZone block whose records move to the DR target.
        incident_detected_at: when the outage was declared (tz-aware; default: now).
        health_failures: consecutive failed probes of the primary region that confirm the outage.
        health_window_seconds: the window those probes must fall in.
        require_outage: refuse to fail over when the outage is not confirmed by the probes.
        fence_old_primary_first: fence (and stop, when local) an old primary that still answers;
            with False, an old primary still accepting writes blocks the failover.
        dns_ttl_seconds: TTL written with the DNS change (default: the zone's).
        smoke_queries: queries the promoted database must answer.
        rollout_timeout_seconds: upper bound for each deployment to become ready.
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the failover.
        approval_timeout_seconds: how long to wait for approval before giving up without changing anything.
        approval_poll_seconds: how often a paused run checks for an answer.
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record every change it would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the inputs when empty.
        lock_wait_seconds: how long to wait for another failover or failback of the estate to finish.
    """
    queries = list(smoke_queries or [])
    run = Recovery(
        SCENARIO, target=f"{primary_region} -> {dr_region}", severity=severity, detected_at=incident_detected_at or utcnow(),
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        recovery_target=f"DR region {dr_region}", incident_id=incident_id,
    )
    report = run.report
    with run, timed_steps(run):
        # 1. Declare: the two regions, the DNS zone and the database exist and differ.
        with run.preflight("Declare: validate the estate") as step:
            estate = load_estate(primary_region, dr_region, dns_zone, dns_ttl_seconds)
            if estate.cluster is not None:
                run.refuse_unsafe_policy(estate.cluster_block, estate.cluster.environment)
            check_dns_zone(estate.zone)
            run.assign_incident(incident_id, f"{primary_region}-{dr_region}")
            step.detail = (f"{estate.primary.name} -> {estate.dr.name}; DNS {estate.zone.hosted_zone_id}; "
                           f"incident {run.incident_id}")

        with run.locks(*estate.lock_targets, wait_seconds=lock_wait_seconds):
            primary, dr, zone = estate.primary, estate.dr, estate.zone
            declared = time.monotonic()

            # 2. Health evidence: the primary region's endpoints failed N consecutive probes.
            with run.step("Health evidence: primary region") as step:
                evidence = probe_health(primary.health(), health_failures, health_window_seconds)
                report.facts["primary region health"] = evidence.summary()
                failed_at = [p.at for e in evidence.endpoints for p in e.probes if not p.ok]
                lost_at = datetime.fromisoformat(min(failed_at)) if failed_at else run.detected_at
                step.detail = (("outage confirmed: " if evidence.outage_confirmed else "outage NOT confirmed: ")
                               + evidence.summary())
            if require_outage and not evidence.outage_confirmed:
                return finish_refused(run, "OutageNotConfirmed",
                                      f"The primary region's endpoints did not fail {health_failures} consecutive "
                                      f"probes within {health_window_seconds:g} s; nothing was changed.")

            # 3. Database evidence: the DR replica's lag, the estimated data loss against the RPO.
            db = _database_evidence(run, estate, lost_at, queries)
            if isinstance(db, State):
                return db
            if db.old_writable and (not fence_old_primary_first or estate.cluster is None):
                return finish_refused(run, "SplitBrainRisk",
                                      f"The old primary {db.old_address} still accepts writes and is not to be fenced "
                                      "here; promoting the DR database would make two writers. Nothing was changed.")

            with run.step("Plan the changes") as step:
                scale_rows = scale_plan(estate.dr_kube, dr, "declared")
                report.plan = _plan(run, estate, db, scale_rows, queries)
                step.detail = f"{len(report.plan)} changes"
            if dry_run:
                return run.planned(report.plan)

            # 4. A named approver approves, seeing the evidence and every change.
            stopped = decide(run, _preview(run, estate, db), db.lag_within)
            if stopped is not None:
                return stopped

            # 5. Database failover: fence the old primary, promote the DR database, repoint the DR applications.
            with run.step("Database failover") as step:
                if estate.cluster is not None:
                    cluster = estate.cluster
                    fenced = fence_old_primary(cluster, primary.postgres_port)
                    if not db.resumed:
                        refusal = confirm_lag_after_fence(run, cluster, dr.postgres_port, primary.postgres_port, fenced,
                                                          lost_at)
                        if refusal:
                            step.outcome, step.detail = "blocked", refusal
                            return finish_refused(run, "LagAboveRpo", refusal)
                    promotion = promote_journalled(run, cluster, dr.postgres_port, estate.journal_scope)
                    record_replica_promotion(run, promotion, old_primary=fenced)
                    step.detail = (f"old primary {fenced['address']} {fenced['state']}; {promotion.address} primary "
                                   f"(already: {promotion.already_primary})")
                else:
                    promotion = promote_rds_replica(estate.rds)
                    report.promotion = promotion.as_dict()
                    step.detail = f"{promotion.identifier} promoted (already: {promotion.already_promoted})"
            if dr.database_secret and estate.dr_kube:
                with run.step("Repoint the DR applications") as step:
                    set_app_secret(estate.dr_kube, dr.database_secret, dr.database_secret_key, estate.dsn(dr))
                    running = [name for _, name, current, _ in scale_rows if current > 0]
                    for name in running:
                        restart_rollout(estate.dr_kube, name)
                    step.detail = (f"{dr.database_secret}.{dr.database_secret_key} -> {estate.dsn(dr)}; "
                                   f"restarted {running or 'none'}")

            # 6. Scale the DR workloads up, tier 1 first, each tier ready before the next.
            scale_in_tiers(run, estate.dr_kube, scale_rows, "Scale up DR workloads", rollout_timeout_seconds)

            # 7. DNS cutover: the records to the DR target, INSYNC.
            with run.step("DNS cutover") as step:
                change = cutover_dns(zone, zone.secondary_target, f"regional failover {run.incident_id}")
                report.facts["dns change"] = change.change_id or "none: already pointing at the DR region"
                step.detail = (f"already pointing at {change.target}; nothing submitted" if change.already_pointing else
                               f"change {change.change_id} INSYNC after {change.seconds_to_insync:.1f} s")
            report.facts["declaration to DNS cutover (s)"] = round(time.monotonic() - declared, 3)

            # 8. Verification: smoke tests over HTTP and SQL.
            with run.step("Verification: smoke tests") as step:
                report.add_checks("dr region", smoke_test_http(dr.health()))
                if estate.cluster is not None:
                    report.add_checks("dr region", smoke_test_sql(estate.cluster, dr.postgres_port, queries))
                failed = report.failed_critical("dr region")
                step.outcome = "ok" if not failed else "failed"
                step.detail = f"{len(report.checks)} checks, {len(failed)} critical failures"
            if report.failed_critical():
                return run.finish("VerificationFailed",
                                  f"The estate was failed over to {dr.name} (database, workloads, DNS) but smoke tests "
                                  "failed; re-run once fixed: completed steps are not repeated.")
            run.mark_restored()
            state = run.finish("FailedOver", f"The estate serves from {dr.name}: database {db.new_address}, "
                               f"DNS {zone.secondary_target}.",
                               action_items=[f"fail back to {primary.name} with the regional-failback flow once it "
                                             "is healthy"])
            get_run_logger().info(report.summary)
            return state


def _database_evidence(run: Recovery, estate: TwoRegionEstate, lost_at: datetime,
                       queries: list[str]) -> DatabaseEvidence | State:
    """The roles of both databases and the DR database's lag; the state of a run that cannot go on."""
    report, rpo, primary, dr = run.report, run.report.rpo_objective_seconds, estate.primary, estate.dr
    resumed = old_unknown = False
    with run.step("Database evidence") as step:
        if estate.cluster is not None:
            cluster = estate.cluster
            roles = read_roles(cluster)
            old_role, dr_role = roles[primary.postgres_port], roles[dr.postgres_port]
            report.facts["database roles before"] = ", ".join(f"{p}: {r}" for p, r in sorted(roles.items()))
            old_writable = primary.postgres_port in list_writers(cluster)
            journal = read_journal(estate.journal_scope, run.incident_id) or {}
            if dr_role == "primary" and journal.get("promoted_port") != dr.postgres_port:
                step.outcome, step.detail = "failed", "the DR database is a primary no failover of this estate promoted"
                return finish_refused(run, "UnexpectedPrimary",
                                      f"The DR database {cluster.instance_at(dr.postgres_port).address} is already a "
                                      "primary, but no failover of this estate promoted it; resolve the topology by "
                                      "hand. Nothing was changed.")
            if dr_role == "primary":
                resumed = True
                lag_within, lag_text = True, "the DR database is already the primary (promoted by an earlier run)"
            elif dr_role != "standby":
                step.outcome, step.detail = "failed", f"the DR database is {dr_role}"
                return finish_refused(run, "DrDatabaseDown",
                                      f"The DR database is {dr_role}, not a standby to promote; nothing was changed.")
            else:
                lag = measure_replica_lag(cluster, dr.postgres_port, primary.postgres_port, lost_at)
                if not lag.on_history:
                    step.outcome, step.detail = "failed", lag.detail
                    return finish_refused(run, "DrDatabaseOffTimeline",
                                          f"The DR database is not a promotion candidate: {lag.detail}. Nothing was "
                                          "changed.")
                lag_within, lag_text = lag.within(rpo), lag.detail
                report.rpo_seconds, report.last_restored_commit = lag.seconds, lag.last_replayed_commit
                report.facts["replica lag"] = {"bytes": lag.bytes, "seconds": lag.seconds, "measured_from": lag.measured_from}
            old_address = cluster.instance_at(primary.postgres_port).address
            new_address = cluster.instance_at(dr.postgres_port).address
            if queries:  # parsed and planned on the DR database (never run), before anything changes
                check_database_inputs(cluster, smoke_queries=queries, port=dr.postgres_port)
        else:
            try:
                old = describe_rds_instance(estate.rds, estate.rds.instance_identifier)
            except RdsError as exc:
                old = {"identifier": estate.rds.instance_identifier, "status": None}
                report.facts["old primary status"] = f"unknown: {exc}"
            replica = describe_rds_instance(estate.rds, estate.rds.replica_identifier)
            old_role = old["status"] or "unknown"
            old_writable = old["status"] is not None and not proves_not_writing(old["status"])
            old_unknown = old["status"] is None
            dr_role = "primary" if check_rds_promoted(estate.rds) else "replica"
            resumed = dr_role == "primary"
            lag_seconds = None if resumed else read_rds_replica_lag(estate.rds)
            lag_within = resumed or (lag_seconds is not None and lag_seconds <= rpo)
            lag_text = ("already promoted" if resumed else
                        f"CloudWatch ReplicaLag {'unavailable' if lag_seconds is None else f'{lag_seconds:.1f} s'}")
            report.rpo_seconds = None if resumed else lag_seconds
            if old_unknown and not resumed:
                lag_within = False
                lag_text += ("; the old primary's status could not be read: tick accept_data_loss to confirm it "
                             "takes no writes")
            old_address, new_address = old["identifier"], replica["identifier"]
        report.facts["replica lag detail"] = lag_text
        step.detail = f"old primary {old_address}: {old_role}; DR {new_address}: {dr_role}; {lag_text}"
    return DatabaseEvidence(old_address, new_address, old_role, dr_role, old_writable, resumed, lag_within, lag_text)


def _plan(run: Recovery, estate: TwoRegionEstate, db: DatabaseEvidence, scale_rows: list, queries: list[str]) -> list[str]:
    dr, zone = estate.dr, estate.zone
    plan = []
    if db.resumed and run.dry_run:
        plan.append(f"promotion journalled: {db.new_address} is already the primary, promoted by an earlier run; a "
                    "real run would " + (f"fence {db.old_address} again, " if estate.cluster is not None else "")
                    + "promote nothing twice and finish the steps below")
    if not db.resumed:
        plan.append(f"database {db.old_address}: {db.old_role} -> "
                    + ("unreachable (recorded, nothing to fence)" if db.old_role == "unreachable" else "fenced and stopped"))
        plan.append(f"database {db.new_address}: {db.dr_role} -> primary")
    if dr.database_secret and estate.dr_kube:
        plan.append(f"secret {estate.dr_kube.namespace}/{dr.database_secret} key {dr.database_secret_key}: "
                    f"(current value, not shown) -> {estate.dsn(dr)}")
    plan += [f"deployment {estate.dr_kube.namespace}/{name} (tier {tier}): {current} -> {wanted} replicas"
             for tier, name, current, wanted in scale_rows if current != wanted]
    plan += plan_dns_cutover(zone, zone.secondary_target)
    plan.append(f"smoke tests: {len(dr.health_endpoints)} health endpoints of {dr.name}, "
                f"{len(queries)} queries on {db.new_address}")
    return plan


def _preview(run: Recovery, estate: TwoRegionEstate, db: DatabaseEvidence) -> str:
    report, loss = run.report, run.report.rpo_seconds
    loss_text = "none (already promoted)" if db.resumed else ("unknown" if loss is None else f"at most {loss:.1f} s")
    return "\n".join([
        f"## Fail over from {estate.primary.name} to {estate.dr.name}?", "",
        f"- **Health evidence**: {report.facts['primary region health']}",
        f"- **Replica lag**: {db.lag_text}",
        f"- **Estimated data loss**: {loss_text} of commits; RPO {report.rpo_objective_seconds} s: "
        f"{'within' if db.lag_within else '**ABOVE: tick accept_data_loss to go on**'}",
        "", "### Changes", *[f"1. {item}" for item in report.plan],
    ])
