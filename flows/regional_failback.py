"""Regional failback: return the estate to its primary region once that region is healthy again.

Runbook (continuity plans: "Scenario 1: Regional Outage" rollback procedure, "Failover Procedures"):
  1. declare: the same estate the failover ran on
  2. the primary region's endpoints answer again
  3. resync the old primary as a standby of the DR primary (pg_rewind; a fresh clone when rewinding
     is impossible, the old data directory moved aside, never deleted)
  4. a named approver approves, seeing the lag and every change
  5. switch back: fence the DR primary, let the old primary replay everything, promote it, rewind the
     DR database to follow it again; repoint the applications
  6. scale the primary region's workloads up (tier order), reverse DNS, scale the DR region down
  7. verification and the incident report
"""

from __future__ import annotations

import time
from datetime import datetime

from prefect import runtime
from prefect.states import Completed, Failed, State

from blocks import RecoveryObjectives
from blocks.errors import InvalidInput
from blocks.postgres import CheckResult
from flows.db_failover import clear_journal, decide, failover_key, finish_refused, read_journal, write_journal
from flows.regional_failover import Estate, hold_locks, load_estate, scale_in_tiers, scale_plan, step_seconds
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalPolicy, check_approval_settings
from tasks.dns import check_dns_zone, cutover_dns, plan_dns_cutover, read_dns_targets
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from tasks.health import probe_health
from tasks.kubernetes import restart_rollout, set_app_secret
from tasks.replication import (
    check_streaming,
    list_writers,
    measure_replica_lag,
    read_roles,
    resync_standby,
    switchover_primary,
)
from tasks.smoke import smoke_test_http, smoke_test_sql

SCENARIO = "regional-failback"


@recovery_flow(name="regional-failback", description="Return the estate to its primary region: resync, switch back, reverse DNS.")
def regional_failback(
    primary_region: str,
    dr_region: str,
    dns_zone: str,
    incident_detected_at: datetime | None = None,
    health_failures: int = 2,
    health_window_seconds: float = 60,
    allow_clone: bool = True,
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
    """Fail a two-region estate back from its DR region to its primary region.

    Args:
        primary_region: Region block of the original primary region (where the estate returns).
        dr_region: Region block of the DR region serving now.
        dns_zone: DnsZone block whose records move back to the primary target.
        incident_detected_at: when the failback was decided (tz-aware; default: now).
        health_failures: consecutive healthy probes of the primary region needed before switching back.
        health_window_seconds: the window those probes must fall in.
        allow_clone: clone the old primary afresh (its data directory moved aside) when pg_rewind cannot resync it.
        dns_ttl_seconds: TTL written with the DNS change (default: the zone's).
        smoke_queries: queries the primary must answer afterwards.
        rollout_timeout_seconds: upper bound for each deployment to become ready.
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the switch back.
        approval_timeout_seconds: how long to wait for approval before giving up without switching.
        approval_poll_seconds: how often a paused run checks for an answer.
        dry_run: record every change it would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the failback; derived from the inputs when empty.
        lock_wait_seconds: how long to wait for another failover or failback of the estate to finish.
    """
    approvers = list(allowed_approvers or [])
    started = utcnow()
    detected = incident_detected_at or started
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=f"{dr_region} -> {primary_region}",
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None, drill=drill, dry_run=dry_run,
        incident_detected_at=detected, started_at=started, rto_objective_seconds=0, rpo_objective_seconds=0,
        recovery_target=f"primary region {primary_region}",
    )
    try:
        with report.step("Declare: validate the estate") as step:
            check_parameters()
            if detected.tzinfo is None:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} has no time zone")
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
            if estate.cluster is None:
                raise InvalidInput("failback of an RDS estate needs a new cross-region read replica of the promoted "
                                   "instance; this flow fails back self-managed PostgreSQL clusters")
            if approval_policy == "auto" and estate.cluster.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused: cluster {estate.cluster_block!r} is production")
            check_dns_zone(estate.zone)
            report.incident_id = incident_id or failover_key(f"failback-{primary_region}-{dr_region}", detected)
            step.detail = f"{estate.dr.name} -> {estate.primary.name}; incident {report.incident_id}"

        with hold_locks(estate, lock_wait_seconds):
            return _fail_back(estate, report, objective.rpo_seconds, health_failures, health_window_seconds,
                              allow_clone, list(smoke_queries or []), rollout_timeout_seconds, approval_policy,
                              approvers, approval_timeout_seconds, approval_poll_seconds, dry_run)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The failback stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        report.facts["step seconds"] = step_seconds(report)
        publish_evidence(report)


def _fail_back(estate: Estate, report: RecoveryReport, rpo: int, health_failures: int, health_window_seconds: float,
               allow_clone: bool, queries: list[str], rollout_timeout_seconds: float, approval_policy: str,
               approvers: list[str], approval_timeout_seconds: int, approval_poll_seconds: float,
               dry_run: bool) -> State:
    primary, dr, zone, cluster = estate.primary, estate.dr, estate.zone, estate.cluster
    home, away = primary.postgres_port, dr.postgres_port
    home_address, away_address = cluster.instance_at(home).address, cluster.instance_at(away).address
    declared = time.monotonic()

    with report.step("Assess the estate") as step:
        roles = read_roles(cluster)
        journal = read_journal(estate.journal_scope) or {}
        switched = (journal.get("failback") == "switched" and list_writers(cluster) == [home]
                    and check_streaming(cluster, away, home))
        targets = read_dns_targets(zone)
        dns_home = all(values == [zone.primary_target] for values in targets.values())
        report.facts["database roles before"] = ", ".join(f"{p}: {r}" for p, r in sorted(roles.items()))
        report.facts["dns before"] = targets
        step.detail = (f"{report.facts['database roles before']}; database switched back by an earlier run: "
                       f"{switched}; DNS at the primary region: {dns_home}")
    if not switched:
        if roles[away] in ("unreachable", "refusing"):
            return finish_refused(report, "DrDatabaseDown",
                                  f"The DR database {away_address} is {roles[away]}: it holds the newest commits, and "
                                  f"failing back without it would reopen the stale {home_address}. Nothing was changed.")
        if roles[home] == "primary" and roles[away] == "primary":
            return finish_refused(report, "SplitBrain",
                                  f"{home_address} and {away_address} both accept writes; resolve by hand.")
        if roles[away] != "primary" and journal.get("failback") != "started":
            return finish_refused(report, "NotFailedOver",
                                  f"{away_address} is not the primary and no failback of this estate is in progress; "
                                  "there is nothing to fail back. Nothing was changed.")
    resync_needed = not switched and roles[away] == "primary"

    with report.step("Health evidence: primary region") as step:
        evidence = probe_health(primary.health(), health_failures, health_window_seconds)
        report.facts["primary region health"] = evidence.summary()
        step.detail = ("healthy: " if evidence.all_healthy else "NOT healthy: ") + evidence.summary()
    if not evidence.all_healthy:
        return finish_refused(report, "PrimaryRegionUnhealthy",
                              f"The primary region's endpoints are not healthy; nothing was changed. {evidence.summary()}")

    with report.step("Plan the changes") as step:
        up_rows = scale_plan(estate.primary_kube, primary, "declared")
        down_rows = scale_plan(estate.dr_kube, dr, "standby")
        plan = []
        if switched and dry_run:
            plan.append(f"switch journalled: {home_address} is already the primary, switched back by an earlier run; "
                        "a real run would confirm it, switch nothing twice and finish the steps below")
        elif journal.get("failback") == "started" and dry_run:
            plan.append(f"a failback of this estate was started by an earlier run (journalled, incident "
                        f"{journal.get('failback_incident_id', '-')}): a real run would finish it")
        if resync_needed:
            plan.append(f"database {home_address}: {roles[home]} -> standby of {away_address} "
                        f"(pg_rewind{', else a fresh clone with the old data directory moved aside' if allow_clone else ''})")
            plan.append(f"database {away_address}: primary -> fenced, then standby of {home_address} (pg_rewind)")
        if not switched:
            plan.append(f"database {home_address}: standby -> primary")
        for region, kube in ((primary, estate.primary_kube), (dr, estate.dr_kube)):
            if region.database_secret and kube:
                plan.append(f"secret {kube.namespace}/{region.database_secret} key {region.database_secret_key}: "
                            f"(current value, not shown) -> {estate.dsn(primary)}")
        plan += [f"deployment {estate.primary_kube.namespace}/{name} (tier {tier}): {current} -> {wanted} replicas"
                 for tier, name, current, wanted in up_rows if current != wanted]
        plan += plan_dns_cutover(zone, zone.primary_target)
        plan += [f"deployment {estate.dr_kube.namespace}/{name}: {current} -> {wanted} replicas (standby)"
                 for _, name, current, wanted in down_rows if current != wanted]
        report.plan = plan
        step.detail = f"{len(plan)} changes"
    if dry_run:
        report.outcome = "DryRun"
        report.summary = "Dry run: the plan was recorded and nothing was changed."
        return Completed(name="DryRun", message=report.summary)

    if switched:
        old_text = f"{home_address} is already the primary (switched back by an earlier run)"
    elif resync_needed:
        old_text = (f"{home_address} ({roles[home]}) becomes a standby of {away_address}: any commit it took that "
                    f"never reached {away_address} is discarded by pg_rewind"
                    + (" (a fresh clone instead moves its data directory aside)" if allow_clone else ""))
    else:
        old_text = f"{home_address} already follows {away_address} (resynced by an earlier run)"
    preview = "\n".join([
        f"## Fail back from {dr.name} to {primary.name}?", "",
        f"- **Health evidence**: {report.facts['primary region health']}",
        f"- **Old primary**: {old_text}",
        f"- **Data loss**: none of {away_address}'s commits: the switch waits until the old primary has replayed "
        "every one of them",
        "", "### Changes", *[f"1. {item}" for item in report.plan],
    ])
    name, message = decide(report, approval_policy, approvers, approval_timeout_seconds, approval_poll_seconds,
                           preview, True)
    if name:
        return finish_refused(report, name, message)

    if not switched:
        write_journal(estate.journal_scope, {**journal, "failback": "started", "failback_incident_id": report.incident_id})
    if resync_needed:
        with report.step("Resync the old primary") as step:
            # A stopped old primary stays stopped: started on its own it would be a second writer.
            # pg_rewind finishes its crash recovery in single-user mode before rewinding it.
            resync = resync_standby(cluster, home, away, allow_clone)
            report.facts["resync"] = {"method": resync.method, "moved_aside": resync.moved_aside, "detail": resync.detail}
            step.detail = f"{resync.address} follows {resync.source} ({resync.method}); {resync.detail}"
        with report.step("Replication lag of the old primary") as step:
            lag = measure_replica_lag(cluster, home, away)
            report.facts["old primary lag after resync"] = lag.detail
            step.detail = lag.detail

    with report.step("Switch the database back") as step:
        result = switchover_primary(cluster, home)
        write_journal(estate.journal_scope, {**journal, "failback": "switched", "failback_incident_id": report.incident_id})
        report.promotion = {"endpoint": home_address, "already_promoted": result["promotion"]["already_primary"],
                            "promoted_at": result["promotion"]["promoted_at"], "resyncs": result["resyncs"]}
        step.detail = (f"{home_address} primary (already: {result['promotion']['already_primary']}); "
                       + "; ".join(f"{r['address']} follows via {r['method']}" for r in result["resyncs"]))

    with report.step("Repoint the applications") as step:
        done = []
        for region, kube, rows in ((primary, estate.primary_kube, up_rows), (dr, estate.dr_kube, down_rows)):
            if region.database_secret and kube:
                set_app_secret(kube, region.database_secret, region.database_secret_key, estate.dsn(primary))
                done.append(f"{kube.namespace}/{region.database_secret}")
                if region is primary:
                    for _, name, current, _ in rows:
                        if current > 0:
                            restart_rollout(kube, name)
        step.detail = f"{', '.join(done) or 'no secrets'} -> {estate.dsn(primary)}"

    if estate.primary_kube is not None:
        scale_in_tiers(report, estate.primary_kube, up_rows, "Scale up primary workloads", rollout_timeout_seconds)

    with report.step("Reverse DNS") as step:
        change = cutover_dns(zone, zone.primary_target, f"regional failback {report.incident_id}")
        report.facts["dns change"] = change.change_id or "none: already pointing at the primary region"
        step.detail = (f"already pointing at {change.target}; nothing submitted" if change.already_pointing else
                       f"change {change.change_id} INSYNC after {change.seconds_to_insync:.1f} s")
    report.facts["declaration to DNS cutover (s)"] = round(time.monotonic() - declared, 3)

    if estate.dr_kube is not None:
        scale_in_tiers(report, estate.dr_kube, down_rows, "Scale down DR workloads", rollout_timeout_seconds)

    with report.step("Verification") as step:
        report.add_checks("primary region", smoke_test_http(primary.health()))
        report.add_checks("primary region", smoke_test_sql(cluster, home, queries))
        roles_after = read_roles(cluster)
        report.add_checks("primary region", [CheckResult("original topology", roles_after[home] == "primary"
                                                    and roles_after[away] == "standby"
                                                    and check_streaming(cluster, away, home),
                                                    f"{roles_after}")])
        failed = report.failed_critical("primary region")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(report.checks)} checks, {len(failed)} critical failures"
    if report.failed_critical():
        report.outcome = "VerificationFailed"
        report.summary = "The estate was switched back but verification failed; see Verification Results."
        return Failed(name="VerificationFailed", message=report.summary)
    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.rpo_seconds = 0.0
    clear_journal(estate.journal_scope)
    report.outcome = "FailedBack"
    report.summary = (f"The estate serves from {primary.name} again: database {home_address} (primary), "
                      f"{away_address} streaming from it, DNS {zone.primary_target}.")
    return Completed(name="FailedBack", message=report.summary)

