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

from prefect.states import State

from blocks.errors import InvalidInput
from blocks.results import CheckResult
from runbook.evidence import utcnow
from runbook.failover import clear_journal, decide, finish_refused, read_journal, timed_steps, write_journal
from runbook.parameters import recovery_flow
from runbook.run import Approval, ApprovalPolicy, Recovery
from runbook.two_region import TwoRegionEstate, load_estate, scale_in_tiers, scale_plan
from tasks.dns import check_dns_zone, cutover_dns, plan_dns_cutover, read_dns_targets
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
    severity: str | None = None,
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
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record every change it would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the failback; derived from the inputs when empty.
        lock_wait_seconds: how long to wait for another failover or failback of the estate to finish.
    """
    queries = list(smoke_queries or [])
    run = Recovery(
        SCENARIO, target=f"{dr_region} -> {primary_region}", severity=severity, detected_at=incident_detected_at or utcnow(),
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        recovery_target=f"primary region {primary_region}", incident_id=incident_id,
    )
    report = run.report
    with run, timed_steps(run):
        # 1. Declare: the same estate the failover ran on.
        with run.preflight("Declare: validate the estate") as step:
            estate = load_estate(primary_region, dr_region, dns_zone, dns_ttl_seconds)
            if estate.cluster is None:
                raise InvalidInput("failback of an RDS estate needs a new cross-region read replica of the promoted "
                                   "instance; this flow fails back self-managed PostgreSQL clusters")
            run.refuse_unsafe_policy(estate.cluster_block, estate.cluster.environment)
            check_dns_zone(estate.zone)
            run.assign_incident(incident_id, f"failback-{primary_region}-{dr_region}")
            step.detail = f"{estate.dr.name} -> {estate.primary.name}; incident {run.incident_id}"

        with run.locks(*estate.lock_targets, wait_seconds=lock_wait_seconds):
            primary, dr, zone, cluster = estate.primary, estate.dr, estate.zone, estate.cluster
            home, away = primary.postgres_port, dr.postgres_port
            home_address, away_address = cluster.instance_at(home).address, cluster.instance_at(away).address
            declared = time.monotonic()

            # Where the estate stands: the databases' roles, a journalled failback, DNS.
            with run.step("Assess the estate") as step:
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
                    return finish_refused(run, "DrDatabaseDown",
                                          f"The DR database {away_address} is {roles[away]}: it holds the newest "
                                          f"commits, and failing back without it would reopen the stale {home_address}. "
                                          "Nothing was changed.")
                if roles[home] == "primary" and roles[away] == "primary":
                    return finish_refused(run, "SplitBrain",
                                          f"{home_address} and {away_address} both accept writes; resolve by hand.")
                if roles[away] != "primary" and journal.get("failback") != "started":
                    return finish_refused(run, "NotFailedOver",
                                          f"{away_address} is not the primary and no failback of this estate is in "
                                          "progress; there is nothing to fail back. Nothing was changed.")
            resync_needed = not switched and roles[away] == "primary"

            # 2. The primary region's endpoints answer again.
            with run.step("Health evidence: primary region") as step:
                evidence = probe_health(primary.health(), health_failures, health_window_seconds)
                report.facts["primary region health"] = evidence.summary()
                step.detail = ("healthy: " if evidence.all_healthy else "NOT healthy: ") + evidence.summary()
            if not evidence.all_healthy:
                return finish_refused(run, "PrimaryRegionUnhealthy", "The primary region's endpoints are not healthy; "
                                      f"nothing was changed. {evidence.summary()}")

            # 3-4. The resync and the switch are planned and approved before anything changes.
            with run.step("Plan the changes") as step:
                up_rows = scale_plan(estate.primary_kube, primary, "declared")
                down_rows = scale_plan(estate.dr_kube, dr, "standby")
                report.plan = _plan(run, estate, roles, journal, switched, resync_needed, allow_clone, up_rows, down_rows)
                step.detail = f"{len(report.plan)} changes"
            if dry_run:
                return run.planned(report.plan)

            stopped = decide(run, _preview(run, estate, roles, switched, resync_needed, allow_clone), True,
                             what="Failback")
            if stopped is not None:
                return stopped

            # 3. Resync the old primary as a standby of the DR primary (journalled: a re-run finishes it).
            if not switched:
                write_journal(estate.journal_scope, {**journal, "failback": "started",
                                                     "failback_incident_id": run.incident_id})
            if resync_needed:
                with run.step("Resync the old primary") as step:
                    # A stopped old primary stays stopped: started on its own it would be a second writer.
                    # pg_rewind finishes its crash recovery in single-user mode before rewinding it.
                    resync = resync_standby(cluster, home, away, allow_clone)
                    report.facts["resync"] = {"method": resync.method, "moved_aside": resync.moved_aside,
                                              "detail": resync.detail}
                    step.detail = f"{resync.address} follows {resync.source} ({resync.method}); {resync.detail}"
                with run.step("Replication lag of the old primary") as step:
                    lag = measure_replica_lag(cluster, home, away)
                    report.facts["old primary lag after resync"] = step.detail = lag.detail

            # 5. Switch back, and repoint the applications.
            with run.step("Switch the database back") as step:
                result = switchover_primary(cluster, home)
                write_journal(estate.journal_scope, {**journal, "failback": "switched",
                                                     "failback_incident_id": run.incident_id})
                report.promotion = {"endpoint": home_address, "already_promoted": result["promotion"]["already_primary"],
                                    "promoted_at": result["promotion"]["promoted_at"], "resyncs": result["resyncs"]}
                step.detail = (f"{home_address} primary (already: {result['promotion']['already_primary']}); "
                               + "; ".join(f"{r['address']} follows via {r['method']}" for r in result["resyncs"]))
            with run.step("Repoint the applications") as step:
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

            # 6. Scale the primary region up (tier order), reverse DNS, scale the DR region down.
            scale_in_tiers(run, estate.primary_kube, up_rows, "Scale up primary workloads", rollout_timeout_seconds)
            with run.step("Reverse DNS") as step:
                change = cutover_dns(zone, zone.primary_target, f"regional failback {run.incident_id}")
                report.facts["dns change"] = change.change_id or "none: already pointing at the primary region"
                step.detail = (f"already pointing at {change.target}; nothing submitted" if change.already_pointing else
                               f"change {change.change_id} INSYNC after {change.seconds_to_insync:.1f} s")
            report.facts["declaration to DNS cutover (s)"] = round(time.monotonic() - declared, 3)
            scale_in_tiers(run, estate.dr_kube, down_rows, "Scale down DR workloads", rollout_timeout_seconds)

            # 7. Verification and the incident report.
            with run.step("Verification") as step:
                report.add_checks("primary region", smoke_test_http(primary.health()))
                report.add_checks("primary region", smoke_test_sql(cluster, home, queries))
                after = read_roles(cluster)
                topology = after[home] == "primary" and after[away] == "standby" and check_streaming(cluster, away, home)
                report.add_checks("primary region", [CheckResult("original topology", topology, f"{after}")])
                failed = report.failed_critical("primary region")
                step.outcome = "ok" if not failed else "failed"
                step.detail = f"{len(report.checks)} checks, {len(failed)} critical failures"
            if report.failed_critical():
                return run.finish("VerificationFailed",
                                  "The estate was switched back but verification failed; see Verification Results.")
            run.mark_restored()
            report.rpo_seconds = 0.0
            clear_journal(estate.journal_scope)
            return run.finish("FailedBack", f"The estate serves from {primary.name} again: database {home_address} "
                              f"(primary), {away_address} streaming from it, DNS {zone.primary_target}.")


def _plan(run: Recovery, estate: TwoRegionEstate, roles: dict[int, str], journal: dict, switched: bool,
          resync_needed: bool, allow_clone: bool, up_rows: list, down_rows: list) -> list[str]:
    primary, dr, zone = estate.primary, estate.dr, estate.zone
    home, away = estate.cluster.instance_at(primary.postgres_port), estate.cluster.instance_at(dr.postgres_port)
    plan = []
    if switched and run.dry_run:
        plan.append(f"switch journalled: {home.address} is already the primary, switched back by an earlier run; "
                    "a real run would confirm it, switch nothing twice and finish the steps below")
    elif journal.get("failback") == "started" and run.dry_run:
        plan.append(f"a failback of this estate was started by an earlier run (journalled, incident "
                    f"{journal.get('failback_incident_id', '-')}): a real run would finish it")
    if resync_needed:
        plan.append(f"database {home.address}: {roles[home.port]} -> standby of {away.address} "
                    f"(pg_rewind{', else a fresh clone with the old data directory moved aside' if allow_clone else ''})")
        plan.append(f"database {away.address}: primary -> fenced, then standby of {home.address} (pg_rewind)")
    if not switched:
        plan.append(f"database {home.address}: standby -> primary")
    for region, kube in ((primary, estate.primary_kube), (dr, estate.dr_kube)):
        if region.database_secret and kube:
            plan.append(f"secret {kube.namespace}/{region.database_secret} key {region.database_secret_key}: "
                        f"(current value, not shown) -> {estate.dsn(primary)}")
    plan += [f"deployment {estate.primary_kube.namespace}/{name} (tier {tier}): {current} -> {wanted} replicas"
             for tier, name, current, wanted in up_rows if current != wanted]
    plan += plan_dns_cutover(zone, zone.primary_target)
    plan += [f"deployment {estate.dr_kube.namespace}/{name}: {current} -> {wanted} replicas (standby)"
             for _, name, current, wanted in down_rows if current != wanted]
    return plan


def _preview(run: Recovery, estate: TwoRegionEstate, roles: dict[int, str], switched: bool, resync_needed: bool,
             allow_clone: bool) -> str:
    home = estate.cluster.instance_at(estate.primary.postgres_port)
    away = estate.cluster.instance_at(estate.dr.postgres_port).address
    if switched:
        old_text = f"{home.address} is already the primary (switched back by an earlier run)"
    elif resync_needed:
        old_text = (f"{home.address} ({roles[home.port]}) becomes a standby of {away}: any commit it took that "
                    f"never reached {away} is discarded by pg_rewind"
                    + (" (a fresh clone instead moves its data directory aside)" if allow_clone else ""))
    else:
        old_text = f"{home.address} already follows {away} (resynced by an earlier run)"
    return "\n".join([
        f"## Fail back from {estate.dr.name} to {estate.primary.name}?", "",
        f"- **Health evidence**: {run.report.facts['primary region health']}",
        f"- **Old primary**: {old_text}",
        f"- **Data loss**: none of {away}'s commits: the switch waits until the old primary has replayed "
        "every one of them",
        "", "### Changes", *[f"1. {item}" for item in run.report.plan],
    ])
