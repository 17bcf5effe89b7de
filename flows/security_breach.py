"""Security breach: contain, preserve evidence, revoke and rotate, restore from known-good, harden.

Runbook (continuity plans: "Scenario 3: Security Breach", "Disaster Scenarios", "Incident Response
Procedures", "Legal and Compliance"):
  1. preflight: times tz-aware and not in the future, every indicator names something that
     exists and maps to names of its own, none is a credential this response runs with, a
     known-good backup before the breach exists inside the recoverable window; nothing changes
     before this passes
  2. immediate containment: deny-all NetworkPolicy over the compromised workloads, quarantine
     security group on the compromised instances, logins of compromised database roles disabled
     and their sessions ended, compromised IAM access keys deactivated
     (each ended session's pg_stat_activity record is kept as evidence); when the database is to
     be restored, writes are fenced on the primary right after, so nothing written later is lost
     unreported
  3. preserve forensic evidence before any change to data: a dump of the database, the server
     logs and the affected Kubernetes objects, uploaded write-once (object lock, compliance mode)
     with a sha256 manifest, read back and verified
  4. rotate: new IAM access keys, new role passwords, new secret values, each stored in Secrets
     Manager and in a Prefect Secret block before it takes effect
  5. restore the newest backup before the breach, replayed to just before the breach start, into a
     NEW instance; give it the rotated credentials; verify; a named approver approves; promote
  6. hardening checks, each with its evidence: no compromised key active, isolation in place,
     rotated credentials work and the old ones fail, the quarantine group allows nothing
  7. the incident report: containment time, rotated credentials (names only), evidence location
     and manifest hash, RTO/RPO against objectives, checks, breach-notification deadline
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect.states import State

from blocks import CheckResult, VerificationQuery
from blocks.errors import InvalidInput
from runbook.breach import (
    BreachIndicators,
    BreachResponse,
    BreachTargets,
    Names,
    known_good_restore_point,
    notification_item,
    promotion_preview,
    replica_follow_ups,
    unfence_item,
)
from runbook.evidence import utcnow
from runbook.parameters import recovery_flow
from runbook.restore import post_checks, record_promotion, restore_verify_promote, resume_promotion
from runbook.run import Approval, ApprovalPolicy, Recovery, incident_key, refuse_future, require_aware
from tasks.forensics import KnownGood, check_primary_reachable
from tasks.postgres import check_database_inputs, fence_writes

SCENARIO = "security-breach"


@recovery_flow(name="security-breach-response",
      description="Contain a breach, preserve write-once evidence, rotate credentials, restore from before the breach, harden.")
def security_breach(
    cluster_block: str,
    breach_started_at: datetime,
    indicators: BreachIndicators,
    secrets_block: str,
    evidence_block: str,
    iam_block: str | None = None,
    quarantine_block: str | None = None,
    kubernetes_block: str | None = None,
    incident_detected_at: datetime | None = None,
    restore_database: bool = True,
    restore_role_logins: bool = True,
    evidence_retention_days: int | None = None,
    credential_prefix: str = "dr-pipelines/rotated",
    secret_block_prefix: str = "rotated",
    network_policy_prefix: str = "dr-deny-all",
    workload_label: str = "app",
    kubernetes_kinds: list[str] | None = None,
    verification_queries: list[VerificationQuery] | None = None,
    row_count_tables: list[str] | None = None,
    approval_policy: ApprovalPolicy = "required",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 3600,
    approval_poll_seconds: float = 5,
    severity: str | None = None,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "security",
    incident_id: str | None = None,
    lock_wait_seconds: int = 30,
) -> State:
    """Respond to a security breach of the estate around one PostgreSQL cluster.

    Args:
        cluster_block: name of the PostgresCluster block whose data may have been touched.
        breach_started_at: earliest time the intruder was active (tz-aware); the restore goes to just before it.
        indicators: compromised IAM users and keys, database roles, Kubernetes workloads, EC2 instances, secrets.
        secrets_block: SecretsManagerStore block where rotated credentials are stored.
        evidence_block: EvidenceVault block (write-once bucket) for the forensic evidence.
        iam_block: IamPrincipals block of the account the compromised users live in.
        quarantine_block: QuarantineSecurityGroup block, needed when instances are named.
        kubernetes_block: KubernetesTarget block, needed when workloads are named.
        incident_detected_at: when the breach was detected (tz-aware); defaults to the start of this run.
        restore_database: restore the database from the newest backup before the breach.
        restore_role_logins: let the compromised roles log in again, with their new password only, at the end.
        evidence_retention_days: compliance retention of the evidence; the vault's default when empty.
        credential_prefix: Secrets Manager prefix of rotated keys and role passwords.
        secret_block_prefix: prefix of the Prefect Secret blocks that mirror them.
        network_policy_prefix: prefix of the deny-all NetworkPolicy names.
        workload_label: pod label whose value names a workload.
        kubernetes_kinds: object kinds dumped as evidence for each workload.
        verification_queries: sentinel queries the restored instance must answer as expected.
        row_count_tables: tables whose row counts go into the evidence.
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the promotion of the restored database.
        approval_timeout_seconds: how long to wait for approval before giving up without promoting.
        approval_poll_seconds: how often a paused run checks for an answer.
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record the plan (current -> new for every change) and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the cluster and breach start when empty.
        lock_wait_seconds: how long to wait for another recovery of the same cluster to finish.
    """
    queries, tables = list(verification_queries or []), list(row_count_tables or [])
    run = Recovery(
        SCENARIO, target=cluster_block, severity=severity, detected_at=incident_detected_at or utcnow(),
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        incident_id=incident_id,
    )
    with run:
        # 1. Preflight: times, every indicator, a known-good backup before the breach; nothing changes before it passes.
        with run.preflight("Preflight: validate inputs and indicators") as step:
            require_aware("breach_started_at", breach_started_at)
            refuse_future("breach_started_at", breach_started_at, run.started_at)
            if run.detected_at < breach_started_at:
                raise InvalidInput(f"incident_detected_at {run.detected_at.isoformat()} is before breach_started_at "
                                   f"{breach_started_at.isoformat()}")
            targets = BreachTargets.load(cluster_block, secrets_block, evidence_block, iam_block, quarantine_block,
                                         kubernetes_block)
            cluster = targets.cluster
            run.refuse_unsafe_policy(cluster_block, cluster.environment)
            # One id per breach (cluster and breach start), so a re-run finds the work of an earlier run.
            run.assign_incident(incident_id or incident_key(f"breach-{cluster_block}", breach_started_at), cluster_block)
            cluster.candidate_directory(run.incident_id)  # refuses an id the restore could not use
            if not check_primary_reachable(cluster):
                raise InvalidInput(f"cluster {cluster_block!r}: primary {cluster.primary.address} is unreachable")
            response = BreachResponse(run, targets, indicators, Names(credential_prefix, secret_block_prefix,
                                                                      network_policy_prefix), workload_label)
            response.check_indicators(evidence_retention_days)
            known_good = known_good_restore_point(run, cluster, breach_started_at) if restore_database else None
            if restore_database:
                check_database_inputs(cluster, verification_queries=queries, row_count_tables=tables)
            run.report.facts["Breach start"] = breach_started_at.astimezone(timezone.utc).isoformat()
            step.detail = f"incident {run.incident_id}; breach started {breach_started_at.isoformat()}"

        with run.locks(cluster_block, wait_seconds=lock_wait_seconds):
            plan = response.plan(known_good, restore_role_logins)
            if dry_run:
                return run.planned(plan)
            run.report.plan = plan
            run.report.action_items.append(notification_item(run.detected_at))

            # 2. Immediate containment; when the database is to be restored, writes are fenced right after.
            with run.step("Contain: isolate workloads, instances and roles; revoke keys") as step:
                step.detail = response.contain()
            fenced_at = None
            # A re-run after this incident's promotion must not fence the restored primary that now serves the endpoint.
            if known_good is not None and cluster.promotion_progress(run.incident_id) is None:
                with run.step("Fence writes on the primary") as step:
                    ended = fence_writes(cluster)
                    fenced_at = utcnow()
                    run.report.facts["Writes fenced at"] = fenced_at.isoformat()
                    step.detail = (f"{ended} client sessions ended; no new connections; primary read-only until the "
                                   "restored instance replaces it")

            # 3. Preserve forensic evidence before any change to data.
            with run.step("Preserve evidence (write-once, sha256 manifest)") as step:
                step.detail = response.preserve_evidence(breach_started_at, kubernetes_kinds or [
                    "deployments", "replicasets", "pods", "services", "networkpolicies"], evidence_retention_days)
                evidence_failed = run.report.failed_critical("evidence")
                step.outcome = "ok" if not evidence_failed else "failed"

            # 4. Revoke and rotate: every new credential is stored before it takes effect.
            with run.step("Rotate credentials") as step:
                step.detail = response.rotate()

            if evidence_failed:
                fenced = f" Writes on {cluster.primary.address} stay fenced." if fenced_at is not None else ""
                return run.finish(
                    "EvidenceNotPreserved",
                    "The breach is contained and credentials are rotated, but the evidence could not be verified in "
                    f"the vault; the database was not restored so nothing is lost before it is.{fenced}",
                    action_items=[f"inspect the evidence at {run.report.facts['Evidence location']} and re-run this "
                                  "incident", *([unfence_item(cluster_block)] if fenced_at is not None else [])])

            # 5. Restore from known-good, with the rotated credentials; a named approver approves the promotion.
            if known_good is not None:
                stopped = _restore(run, response, known_good, fenced_at, queries, tables)
                if stopped is not None:
                    return stopped
            if indicators.database_roles:
                with run.step("Role logins with the new credentials") as step:
                    response.apply_role_credentials(restore_role_logins)
                    step.detail = ("compromised roles log in again with their new password only" if restore_role_logins
                                   else "compromised roles stay NOLOGIN")

            # 6. Hardening checks, each with its evidence (a failed post-check at the endpoint fails it too).
            with run.step("Harden and verify") as step:
                checks = response.hardening_checks(restore_role_logins)
                run.report.add_checks("hardening", checks)
                failed = run.report.failed_critical("hardening")
                step.outcome = "ok" if not failed else "failed"
                step.detail = f"{len(checks)} checks, {len(failed)} critical failures"

            # 7. The incident report.
            run.mark_restored()
            follow_ups = ["enhanced monitoring for residual threats on the contained systems",
                          "post-incident review: attack vector, scope of compromised data, controls to add"]
            if run.report.failed_critical():
                return run.finish("HardeningFailed", "The breach was contained and evidence preserved, but hardening "
                                  "checks failed; see Verification Results.", action_items=follow_ups)
            facts = run.report.facts
            return run.finish(
                "Recovered" if known_good is not None else "Contained",
                f"The breach of {cluster_block} was contained {facts['Containment time (detected -> isolated)']} after "
                f"detection; evidence is locked at {facts['Evidence location']}; {len(response.rotated)} credential(s) "
                "were rotated" + (f"; the database was restored to {run.report.recovery_target}, before the breach."
                                  if known_good is not None else "."),
                action_items=follow_ups)


def _restore(run: Recovery, response: BreachResponse, known_good: KnownGood, fenced_at: datetime | None,
             queries: list[VerificationQuery], tables: list[str]) -> State | None:
    """Step 5: restore beside, verify, approve, promote; a final state when it stops short, None once promoted."""
    cluster, report = response.targets.cluster, run.report
    if cluster.promotion_progress(run.incident_id) is not None:
        record_promotion(run, resume_promotion(run, cluster, "Resume: promotion of this incident"), already=True)
        replica_follow_ups(report, cluster)
        return None

    def new_passwords(candidate) -> str:
        # The restored roles still carry the passwords from before the breach: replace them before anyone connects.
        response.apply_role_credentials(False, candidate.port)
        return known_good.describe()

    def predates_breach(candidate) -> list[CheckResult]:
        # Every commit the old primary took until writes were fenced is discarded by the restore; without a
        # replayed commit the restore ends at the target, and everything after it is discarded.
        last = report.last_restored_commit
        if report.rpo_seconds is None:
            report.rpo_seconds = max(0.0, (fenced_at - known_good.target).total_seconds())
        report.facts["Data-loss window"] = (f"{(last or known_good.target).isoformat()} .. {fenced_at.isoformat()} "
                                            "(writes fenced): every commit in it is discarded")
        return [CheckResult("restored data predates the breach", last is None or last < known_good.breach_start,
                            f"last restored commit {last.isoformat() if last else 'none'}; breach started "
                            f"{known_good.breach_start.isoformat()}")]

    stopped = restore_verify_promote(
        run, cluster, known_good.target, tables=tables, queries=queries, loss_until=fenced_at,
        preview=lambda candidate: promotion_preview(report, cluster, candidate.data_directory),
        context="The breach is contained, evidence preserved and credentials rotated. ",
        stop_items=lambda candidate: [unfence_item(report.target)],
        after_restore=new_passwords, more_checks=predates_breach,
    )
    if stopped is None:
        post_checks(run, cluster, queries)  # a failed endpoint check fails the run after hardening
        replica_follow_ups(report, cluster)
    return stopped
