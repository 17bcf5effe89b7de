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
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime

from prefect import get_run_logger, runtime
from prefect.states import Completed, Failed, State

from blocks import PostgresCluster, RecoveryObjectives
from blocks.dns import DnsZone
from blocks.errors import InvalidInput, PostgresError
from blocks.kubernetes import KubernetesTarget
from blocks.rds import RdsDatabase, RdsError, proves_not_writing
from blocks.region import Region
from flows.db_failover import (
    confirm_lag_after_fence,
    decide,
    dsn_for,
    failover_key,
    finish_refused,
    read_journal,
    write_journal,
)
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalPolicy, check_approval_settings
from tasks.dns import check_dns_zone, cutover_dns, plan_dns_cutover
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from tasks.health import probe_health
from tasks.kubernetes import read_replicas, restart_rollout, scale_deployment, set_app_secret, wait_for_rollout
from runbook.locks import recovery_lock
from tasks.postgres import check_database_inputs
from tasks.rds import check_rds_promoted, describe_rds_instance, promote_rds_replica, read_rds_replica_lag
from tasks.replication import fence_old_primary, list_writers, measure_replica_lag, promote_replica, read_roles
from tasks.smoke import smoke_test_http, smoke_test_sql

SCENARIO = "regional-failover"


@dataclass
class Estate:
    """The blocks of a two-region estate, loaded and checked before anything changes."""

    primary: Region
    dr: Region
    zone: DnsZone
    zone_block: str
    cluster: PostgresCluster | None
    cluster_block: str | None
    rds: RdsDatabase | None
    primary_kube: KubernetesTarget | None
    dr_kube: KubernetesTarget | None

    @property
    def journal_scope(self) -> str:
        return f"estate-{self.zone_block}"

    @property
    def lock_targets(self) -> list[str]:
        return [f"estate-{self.zone_block}"] + ([self.cluster_block] if self.cluster_block else [])

    def dsn(self, region: Region) -> str:
        if self.cluster is not None:
            return dsn_for(self.cluster, region.postgres_port, region.database_host)
        return f"rds:{self.rds.replica_identifier if region.rds_role == 'replica' else self.rds.instance_identifier}"


def load_estate(primary_region: str, dr_region: str, dns_zone: str, dns_ttl_seconds: int | None = None) -> Estate:
    """Load and cross-check every block of the estate; refuses bad input before any change."""
    if not primary_region or not dr_region or primary_region.strip() == dr_region.strip():
        raise InvalidInput(f"the primary and the DR region are the same block {primary_region!r}")
    if dns_ttl_seconds is not None and dns_ttl_seconds <= 0:
        raise InvalidInput(f"DNS TTL {dns_ttl_seconds} s must be a positive number of seconds")
    primary = load_block(Region, primary_region)
    dr = load_block(Region, dr_region)
    primary.check_pair(dr)
    zone = load_block(DnsZone, dns_zone)
    if dns_ttl_seconds is not None:
        zone = zone.model_copy(update={"ttl": dns_ttl_seconds})
    if (primary.dns_target, dr.dns_target) != (zone.primary_target, zone.secondary_target):
        raise InvalidInput(
            f"DNS zone {dns_zone!r} moves between {zone.primary_target!r} and {zone.secondary_target!r}, but the regions "
            f"say {primary.dns_target!r} (primary) and {dr.dns_target!r} (DR)")
    cluster = rds = None
    if primary.postgres_cluster:
        cluster = load_block(PostgresCluster, primary.postgres_cluster)
        cluster.instance_at(primary.postgres_port)
        cluster.instance_at(dr.postgres_port)
    else:
        rds = load_block(RdsDatabase, primary.rds_database)
    kubes = []
    for region in (primary, dr):
        kube = load_block(KubernetesTarget, region.kubernetes_target) if region.kubernetes_target else None
        if kube is not None:
            for name in kube.deployments:
                read_replicas(kube, name)  # a missing deployment is refused here, before any change
            if region.database_secret and not kube.deployments:
                raise InvalidInput(f"region {region.name!r} has a database secret but no deployments to use it")
        kubes.append(kube)
    if dr.database_secret and kubes[1] is None:
        raise InvalidInput(f"region {dr.name!r} names database_secret {dr.database_secret!r} without a kubernetes_target")
    primary.health()
    dr.health()
    return Estate(primary, dr, zone, dns_zone, cluster, primary.postgres_cluster, rds, kubes[0], kubes[1])


def hold_locks(estate: Estate, wait_seconds: float) -> ExitStack:
    """One failover or failback per estate (and per database) at a time.

    Either every lock is held by the returned stack, or none is: a lock that cannot be taken
    releases the ones taken before it.
    """
    with ExitStack() as stack:
        for target in estate.lock_targets:
            stack.enter_context(recovery_lock(target, wait_seconds, runtime.flow_run.id))
        return stack.pop_all()


def scale_plan(kube: KubernetesTarget | None, region: Region, to: str) -> list[tuple[int, str, int, int]]:
    """(tier, deployment, current, wanted) for every declared deployment of ``region``, tier 1 first.

    ``to`` is 'declared' (the counts the region runs at when serving) or 'standby' (its standby count).
    """
    if kube is None:
        return []
    rows = []
    for tier_number, tier in enumerate(region.tier_order(list(kube.deployments)), 1):
        for name in tier:
            wanted = kube.deployments[name] if to == "declared" else region.standby_replicas
            rows.append((tier_number, name, read_replicas(kube, name).spec, wanted))
    return rows


def scale_in_tiers(report: RecoveryReport, kube: KubernetesTarget, rows: list[tuple[int, str, int, int]],
                   label: str, timeout_seconds: float) -> None:
    """Scale each tier, and wait until it is ready before the next one."""
    for tier_number in sorted({r[0] for r in rows}):
        tier = [r for r in rows if r[0] == tier_number]
        with report.step(f"{label}: tier {tier_number}") as step:
            for _, name, _, wanted in tier:
                scale_deployment(kube, name, wanted)
            for _, name, _, wanted in tier:
                if wanted > 0:
                    wait_for_rollout(kube, name, timeout_seconds)
            step.detail = ", ".join(f"{name} {current} -> {wanted}" for _, name, current, wanted in tier)


def step_seconds(report: RecoveryReport) -> dict[str, float]:
    return {s.step: round((s.end - s.start).total_seconds(), 3) for s in report.steps if s.end}


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
        dry_run: record every change it would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the inputs when empty.
        lock_wait_seconds: how long to wait for another failover or failback of the estate to finish.
    """
    approvers = list(allowed_approvers or [])
    started = utcnow()
    detected = incident_detected_at or started
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=f"{primary_region} -> {dr_region}",
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None, drill=drill, dry_run=dry_run,
        incident_detected_at=detected, started_at=started, rto_objective_seconds=0, rpo_objective_seconds=0,
        recovery_target=f"DR region {dr_region}",
    )
    try:
        with report.step("Declare: validate the estate") as step:
            check_parameters()
            if detected.tzinfo is None:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} has no time zone")
            if detected > started:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} is in the future")
            if not isinstance(health_failures, int) or health_failures < 1:
                raise InvalidInput(f"health_failures {health_failures!r} must be a whole number >= 1")
            if health_window_seconds <= 0:
                raise InvalidInput(f"health_window_seconds {health_window_seconds!r} must be positive")
            check_approval_settings(approval_policy, approvers, approval_timeout_seconds, drill)
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            estate = load_estate(primary_region, dr_region, dns_zone, dns_ttl_seconds)
            if approval_policy == "auto" and estate.cluster is not None and estate.cluster.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused: cluster {estate.cluster_block!r} is production")
            check_dns_zone(estate.zone)
            report.incident_id = incident_id or failover_key(f"{primary_region}-{dr_region}", detected)
            step.detail = (f"{estate.primary.name} -> {estate.dr.name}; DNS {estate.zone.hosted_zone_id}; "
                           f"incident {report.incident_id}")

        with hold_locks(estate, lock_wait_seconds):
            return _fail_over(estate, report, objective.rpo_seconds, health_failures, health_window_seconds,
                              require_outage, fence_old_primary_first, list(smoke_queries or []),
                              rollout_timeout_seconds, approval_policy, approvers, approval_timeout_seconds,
                              approval_poll_seconds, dry_run)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The failover stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        report.facts["step seconds"] = step_seconds(report)
        publish_evidence(report)


def _fail_over(estate: Estate, report: RecoveryReport, rpo: int, health_failures: int, health_window_seconds: float,
               require_outage: bool, fence_first: bool, queries: list[str], rollout_timeout_seconds: float,
               approval_policy: str, approvers: list[str], approval_timeout_seconds: int, approval_poll_seconds: float,
               dry_run: bool) -> State:
    primary, dr, zone = estate.primary, estate.dr, estate.zone
    declared = time.monotonic()

    with report.step("Health evidence: primary region") as step:
        evidence = probe_health(primary.health(), health_failures, health_window_seconds)
        report.facts["primary region health"] = evidence.summary()
        failed_at = [p.at for e in evidence.endpoints for p in e.probes if not p.ok]
        lost_at = datetime.fromisoformat(min(failed_at)) if failed_at else report.incident_detected_at
        step.detail = ("outage confirmed: " if evidence.outage_confirmed else "outage NOT confirmed: ") + evidence.summary()
    if require_outage and not evidence.outage_confirmed:
        return finish_refused(report, "OutageNotConfirmed",
                              f"The primary region's endpoints did not fail {health_failures} consecutive probes within "
                              f"{health_window_seconds:g} s; nothing was changed.")

    resumed, old_unknown = False, False
    with report.step("Database evidence") as step:
        if estate.cluster is not None:
            cluster = estate.cluster
            roles = read_roles(cluster)
            old_role, dr_role = roles[primary.postgres_port], roles[dr.postgres_port]
            report.facts["database roles before"] = ", ".join(f"{p}: {r}" for p, r in sorted(roles.items()))
            old_writable = primary.postgres_port in list_writers(cluster)
            journal = read_journal(estate.journal_scope, report.incident_id) or {}
            if dr_role == "primary" and journal.get("promoted_port") != dr.postgres_port:
                step.outcome, step.detail = "failed", "the DR database is a primary no failover of this estate promoted"
                return finish_refused(report, "UnexpectedPrimary",
                                      f"The DR database {cluster.instance_at(dr.postgres_port).address} is already a "
                                      "primary, but no failover of this estate promoted it; resolve the topology by "
                                      "hand. Nothing was changed.")
            if dr_role == "primary":
                resumed = True
                lag_within, lag_text = True, "the DR database is already the primary (promoted by an earlier run)"
            elif dr_role != "standby":
                step.outcome, step.detail = "failed", f"the DR database is {dr_role}"
                return finish_refused(report, "DrDatabaseDown",
                                      f"The DR database is {dr_role}, not a standby to promote; nothing was changed.")
            else:
                lag = measure_replica_lag(cluster, dr.postgres_port, primary.postgres_port, lost_at)
                if not lag.on_history:
                    step.outcome, step.detail = "failed", lag.detail
                    return finish_refused(report, "DrDatabaseOffTimeline",
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

    if old_writable and (not fence_first or estate.cluster is None):
        return finish_refused(report, "SplitBrainRisk",
                              f"The old primary {old_address} still accepts writes and is not to be fenced here; "
                              "promoting the DR database would make two writers. Nothing was changed.")

    with report.step("Plan the changes") as step:
        dns_plan = plan_dns_cutover(zone, zone.secondary_target)
        scale_rows = scale_plan(estate.dr_kube, dr, "declared")
        plan = []
        if resumed and dry_run:
            plan.append(f"promotion journalled: {new_address} is already the primary, promoted by an earlier run; a "
                        "real run would " + (f"fence {old_address} again, " if estate.cluster is not None else "")
                        + "promote nothing twice and finish the steps below")
        if not resumed:
            plan.append(f"database {old_address}: {old_role} -> "
                        + ("unreachable (recorded, nothing to fence)" if old_role in ("unreachable",) else "fenced and stopped"))
            plan.append(f"database {new_address}: {dr_role} -> primary")
        if dr.database_secret and estate.dr_kube:
            plan.append(f"secret {estate.dr_kube.namespace}/{dr.database_secret} key {dr.database_secret_key}: "
                        f"(current value, not shown) -> {estate.dsn(dr)}")
        plan += [f"deployment {estate.dr_kube.namespace}/{name} (tier {tier}): {current} -> {wanted} replicas"
                 for tier, name, current, wanted in scale_rows if current != wanted]
        plan += dns_plan
        plan.append(f"smoke tests: {len(dr.health_endpoints)} health endpoints of {dr.name}, "
                    f"{len(queries)} queries on {new_address}")
        report.plan = plan
        step.detail = f"{len(plan)} changes"
    if dry_run:
        report.outcome = "DryRun"
        report.summary = "Dry run: the plan was recorded and nothing was changed."
        return Completed(name="DryRun", message=report.summary)

    loss = report.rpo_seconds
    preview = "\n".join([
        f"## Fail over from {primary.name} to {dr.name}?", "",
        f"- **Health evidence**: {report.facts['primary region health']}",
        f"- **Replica lag**: {lag_text}",
        f"- **Estimated data loss**: {'none (already promoted)' if resumed else ('unknown' if loss is None else f'at most {loss:.1f} s')}"
        f" of commits; RPO {rpo} s: {'within' if lag_within else '**ABOVE: tick accept_data_loss to go on**'}",
        "", "### Changes", *[f"1. {item}" for item in report.plan],
    ])
    name, message = decide(report, approval_policy, approvers, approval_timeout_seconds, approval_poll_seconds,
                           preview, lag_within)
    if name:
        return finish_refused(report, name, message)

    with report.step("Database failover") as step:
        if estate.cluster is not None:
            cluster = estate.cluster
            fenced = fence_old_primary(cluster, primary.postgres_port)
            if not resumed:
                refusal = confirm_lag_after_fence(report, cluster, dr.postgres_port, primary.postgres_port, fenced,
                                                  lost_at, rpo)
                if refusal:
                    step.outcome, step.detail = "blocked", refusal
                    return finish_refused(report, "LagAboveRpo", refusal)
            writers = list_writers(cluster)
            if any(p != dr.postgres_port for p in writers):
                raise PostgresError(f"instances on ports {writers} still accept writes; refusing a second writer")
            write_journal(estate.journal_scope, {"promoted_port": dr.postgres_port, "incident_id": report.incident_id,
                                                 "state": "promoting"})
            promotion = promote_replica(cluster, dr.postgres_port)
            write_journal(estate.journal_scope, {"promoted_port": dr.postgres_port, "incident_id": report.incident_id,
                                                 "state": "promoted",
                                                 "promoted_at": promotion.promoted_at or utcnow().isoformat()})
            report.promotion = {"endpoint": promotion.address, "already_promoted": promotion.already_primary,
                                "promoted_at": promotion.promoted_at, "old_primary": fenced}
            step.detail = (f"old primary {fenced['address']} {fenced['state']}; {promotion.address} primary "
                           f"(already: {promotion.already_primary})")
        else:
            promotion = promote_rds_replica(estate.rds)
            report.promotion = promotion.as_dict()
            step.detail = f"{promotion.identifier} promoted (already: {promotion.already_promoted})"

    if dr.database_secret and estate.dr_kube:
        with report.step("Repoint the DR applications") as step:
            set_app_secret(estate.dr_kube, dr.database_secret, dr.database_secret_key, estate.dsn(dr))
            running = [name for _, name, current, _ in scale_rows if current > 0]
            for name in running:
                restart_rollout(estate.dr_kube, name)
            step.detail = f"{dr.database_secret}.{dr.database_secret_key} -> {estate.dsn(dr)}; restarted {running or 'none'}"

    if estate.dr_kube is not None:
        scale_in_tiers(report, estate.dr_kube, scale_rows, "Scale up DR workloads", rollout_timeout_seconds)

    with report.step("DNS cutover") as step:
        change = cutover_dns(zone, zone.secondary_target, f"regional failover {report.incident_id}")
        report.facts["dns change"] = change.change_id or "none: already pointing at the DR region"
        step.detail = (f"already pointing at {change.target}; nothing submitted" if change.already_pointing else
                       f"change {change.change_id} INSYNC after {change.seconds_to_insync:.1f} s")
    report.facts["declaration to DNS cutover (s)"] = round(time.monotonic() - declared, 3)

    with report.step("Verification: smoke tests") as step:
        report.add_checks("dr region", smoke_test_http(dr.health()))
        if estate.cluster is not None:
            report.add_checks("dr region", smoke_test_sql(estate.cluster, dr.postgres_port, queries))
        failed = report.failed_critical("dr region")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(report.checks)} checks, {len(failed)} critical failures"
    if report.failed_critical():
        report.outcome = "VerificationFailed"
        report.summary = (f"The estate was failed over to {dr.name} (database, workloads, DNS) but smoke tests failed; "
                          "re-run once fixed: completed steps are not repeated.")
        return Failed(name="VerificationFailed", message=report.summary)

    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.action_items.append(f"fail back to {primary.name} with the regional-failback flow once it is healthy")
    report.outcome = "FailedOver"
    report.summary = f"The estate serves from {dr.name}: database {new_address}, DNS {zone.secondary_target}."
    get_run_logger().info(report.summary)
    return Completed(name="FailedOver", message=report.summary)
