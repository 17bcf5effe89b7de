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

import hashlib
import re
import shutil
from datetime import datetime, timedelta, timezone

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State
from pydantic import BaseModel, Field

from blocks import PostgresCluster, RecoveryObjectives, VerificationQuery
from blocks.aws_security import IamPrincipals, QuarantineSecurityGroup, SecretsManagerStore
from blocks.errors import InvalidInput, RecoveryError
from blocks.evidence_vault import EvidenceVault
from blocks.kubernetes import KubernetesTarget
from blocks.postgres import CheckResult
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalPolicy, approval_step, check_approval_settings
from tasks.aws import (
    check_access_keys_revoked,
    check_quarantine,
    deactivate_access_keys,
    describe_instance,
    find_iam_user,
    list_access_keys,
    quarantine_instance,
    read_instance_groups,
)
from tasks.credentials import (
    RotatedCredential,
    apply_role_credentials,
    check_access_key_replaced,
    check_only_stored_key_active,
    check_role_credentials,
    check_secret_rotated,
    disable_role_login,
    read_password_verifier_digest,
    read_role_state,
    replace_access_key,
    role_exists,
    rotate_role_password,
    rotate_secret,
    secret_exists,
)
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from tasks.forensics import (
    KnownGood,
    check_primary_reachable,
    check_workload_isolated,
    choose_known_good_restore_point,
    collect_database_evidence,
    evidence_folder,
    store_evidence,
    verify_evidence,
    write_json,
)
from tasks.kubernetes import dump_workloads, isolate_workloads
from runbook.locks import recovery_lock
from tasks.postgres import (
    archive_current_wal,
    RecoverableWindow,
    check_database_inputs,
    check_endpoint,
    check_target_in_window,
    fence_writes,
    list_backups,
    measure_data_loss,
    promote_restored_instance,
    refuse_future,
    require_aware,
    restore_to_point_in_time,
    stop_restored_instance,
    verify_restored_instance,
)

SCENARIO = "security-breach"
BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NOTIFICATION_DEADLINE = timedelta(hours=72)  # GDPR art. 33: supervisory authority within 72 hours


class SecretToRotate(BaseModel):
    """An application secret to replace with a new random value."""

    secrets_manager_id: str = Field(description="Secrets Manager secret id (name or ARN); it must exist.")
    prefect_secret_block: str | None = Field(default=None, description="Prefect Secret block that mirrors it, if any.")


class BreachIndicators(BaseModel):
    """What the breach touched: the principals, keys, roles, workloads, instances and secrets to contain."""

    iam_users: list[str] = Field(default_factory=list, description="Compromised IAM users: their keys are revoked and replaced.")
    access_key_ids: list[str] = Field(
        default_factory=list,
        description="Compromised access key ids, each of one of iam_users; empty: every key of those users.",
    )
    database_roles: list[str] = Field(default_factory=list, description="Compromised PostgreSQL roles.")
    workloads: list[str] = Field(default_factory=list, description="Compromised Kubernetes workloads (value of the workload label).")
    instances: list[str] = Field(default_factory=list, description="Compromised EC2 instance ids.")
    secrets: list[SecretToRotate] = Field(default_factory=list, description="Application secrets to rotate.")

    def is_empty(self) -> bool:
        return not (self.iam_users or self.database_roles or self.workloads or self.instances or self.secrets)


def incident_key(cluster_block: str, breach_started_at: datetime) -> str:
    """A stable id for one breach, so a re-run finds the work an earlier run did."""
    start = breach_started_at.astimezone(timezone.utc)
    digest = hashlib.sha256(f"breach|{cluster_block}|{start.isoformat()}".encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", cluster_block).strip("-.")[:60] or "cluster"
    return f"breach-{name}-{start:%Y%m%dT%H%M%SZ}-{digest[:6]}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Names:
    """Where each rotated credential is stored and what each isolation object is called."""

    def __init__(self, credential_prefix: str, block_prefix: str, policy_prefix: str):
        self.credential_prefix, self.block_prefix, self.policy_prefix = credential_prefix.strip("/"), block_prefix, policy_prefix

    def key_secret(self, user: str) -> str:
        return f"{self.credential_prefix}/iam/{user}"

    def role_secret(self, role: str) -> str:
        return f"{self.credential_prefix}/postgres/{role}"

    def key_block(self, user: str) -> str:
        return f"{self.block_prefix}-iam-{_slug(user)}"[:63].rstrip("-")

    def role_block(self, role: str) -> str:
        return f"{self.block_prefix}-postgres-{_slug(role)}"[:63].rstrip("-")

    def network_policy(self, workload: str) -> str:
        return f"{self.policy_prefix}-{_slug(workload)}"[:63].rstrip("-")


class Estate:
    """The blocks one response works on; absent systems are None."""

    def __init__(self, cluster, iam, store, ec2, kube, vault):
        self.cluster: PostgresCluster = cluster
        self.iam: IamPrincipals | None = iam
        self.store: SecretsManagerStore = store
        self.ec2: QuarantineSecurityGroup | None = ec2
        self.kube: KubernetesTarget | None = kube
        self.vault: EvidenceVault = vault


class Preflight:
    """What the preflight found: compromised and kept keys per user, the restore point and window."""

    def __init__(self, keys: dict[str, list[str]], kept: dict[str, list[str]], known_good: KnownGood | None,
                 window: RecoverableWindow | None):
        self.keys, self.kept, self.known_good, self.window = keys, kept, known_good, window


def _refuse_collisions(ind: BreachIndicators, names: Names) -> None:
    """Distinct indicators must map to distinct Secret blocks, NetworkPolicies and evidence files."""
    for label, items in (("IAM user", ind.iam_users), ("access key", ind.access_key_ids),
                         ("database role", ind.database_roles), ("workload", ind.workloads),
                         ("instance", ind.instances), ("secret", [i.secrets_manager_id for i in ind.secrets])):
        repeated = sorted({i for i in items if items.count(i) > 1})
        if repeated:
            raise InvalidInput(f"indicators name the {label} {repeated} more than once")
    taken: dict[str, str] = {}

    def claim(kind: str, name: str, owner: str) -> None:
        key = f"{kind}:{name}"
        if key in taken:
            raise InvalidInput(f"{owner} and {taken[key]} would both use the {kind} {name!r}; "
                               "rename one or change the name prefixes")
        taken[key] = owner

    for user in ind.iam_users:
        claim("Secret block", names.key_block(user), f"IAM user {user!r}")
    for role in ind.database_roles:
        claim("Secret block", names.role_block(role), f"database role {role!r}")
    for item in ind.secrets:
        if item.prefect_secret_block:
            claim("Secret block", item.prefect_secret_block, f"secret {item.secrets_manager_id!r}")
    for workload in ind.workloads:
        claim("NetworkPolicy", names.network_policy(workload), f"workload {workload!r}")
        claim("evidence file", _workload_evidence(workload), f"workload {workload!r}")


def _workload_evidence(workload: str) -> str:
    return f"kubernetes-{_slug(workload)}.json"


def _own_access_keys(estate: Estate) -> dict[str, str]:
    """The access key id each AWS block of this response signs its calls with (block role -> key id)."""
    own = {}
    for role, block in (("iam_block", estate.iam), ("secrets_block", estate.store), ("quarantine_block", estate.ec2),
                        ("evidence_block", estate.vault)):
        key_id = getattr(getattr(block, "credentials", None), "aws_access_key_id", None)
        if key_id:
            own[role] = key_id
    return own


def _preflight(
    estate: Estate, ind: BreachIndicators, names: Names, breach_started_at: datetime, restore_database: bool,
    evidence_retention_days: int | None, workload_label: str, dry_run: bool,
) -> Preflight:
    """Check every indicator against the estate, read-only; returns the keys to revoke per user."""
    if ind.is_empty():
        raise InvalidInput("indicators name nothing to contain: give iam_users, database_roles, workloads, instances or secrets")
    _refuse_collisions(ind, names)
    keys: dict[str, list[str]] = {}
    kept: dict[str, list[str]] = {}
    if ind.iam_users or ind.access_key_ids:
        if estate.iam is None:
            raise InvalidInput("indicators name IAM users or keys but no iam_block was given")
        owner: dict[str, str] = {}
        for user in ind.iam_users:
            if not find_iam_user(estate.iam, user):
                raise InvalidInput(f"compromised principal {user!r} is not an IAM user of this account")
            for key in list_access_keys(estate.iam, user):
                owner[key.access_key_id] = user
        for key_id in ind.access_key_ids:
            if key_id not in owner:
                raise InvalidInput(f"access key {key_id!r} belongs to none of the compromised principals {ind.iam_users}")
        for user in ind.iam_users:
            named = [k for k in ind.access_key_ids if owner[k] == user]
            keys[user] = named or [k for k, u in owner.items() if u == user]
            kept[user] = [k for k, u in owner.items() if u == user and k not in keys[user]]
    revoking = {k for ids in keys.values() for k in ids}
    for block_role, key_id in _own_access_keys(estate).items():
        if key_id in revoking:
            raise InvalidInput(f"access key {key_id} is compromised and is the key {block_role} runs with: revoking it "
                               "would stop this response halfway; give that block other credentials first")
    for role in ind.database_roles:
        if role == estate.cluster.user:
            raise InvalidInput(f"role {role!r} is the cluster's recovery role; rotate it by hand, not in this flow")
        if not role_exists(estate.cluster, role):
            raise InvalidInput(f"compromised database role {role!r} does not exist on {estate.cluster.primary.address}")
    if ind.instances:
        if estate.ec2 is None:
            raise InvalidInput("indicators name EC2 instances but no quarantine_block was given")
        for instance in ind.instances:
            describe_instance(estate.ec2, instance)
    if ind.workloads and estate.kube is None:
        raise InvalidInput("indicators name Kubernetes workloads but no kubernetes_block was given")
    for workload in ind.workloads:
        if not dump_workloads(estate.kube, ["deployments", "statefulsets", "pods"], {workload_label: workload}):
            raise InvalidInput(f"compromised workload {workload!r}: no deployment, stateful set or pod labelled "
                               f"{workload_label}={workload} in namespace {estate.kube.namespace!r}")
    for item in ind.secrets:
        if not secret_exists(estate.store, item.secrets_manager_id):
            raise InvalidInput(f"secret {item.secrets_manager_id!r} to rotate does not exist in Secrets Manager")
        if item.prefect_secret_block is not None and not BLOCK_NAME.match(item.prefect_secret_block):
            raise InvalidInput(f"Prefect Secret block name {item.prefect_secret_block!r} is not lowercase letters, digits and dashes")
    for block_name in [names.key_block(u) for u in ind.iam_users] + [names.role_block(r) for r in ind.database_roles]:
        if not BLOCK_NAME.match(block_name):
            raise InvalidInput(f"Prefect Secret block name {block_name!r} is not valid; change secret_block_prefix")
    estate.vault.validate_settings(evidence_retention_days)
    known_good, window = None, None
    if restore_database:
        known_good = choose_known_good_restore_point(estate.cluster, breach_started_at)
        # A real run closes and archives the current WAL segment, so "now" is reachable; a dry run
        # changes nothing and judges the target against that same bound.
        archived = utcnow() if dry_run else archive_current_wal(estate.cluster)
        window = list_backups(estate.cluster, archived)
        check_target_in_window(known_good.target, window)
    return Preflight(keys, kept, known_good, window)


def _plan(estate: Estate, ind: BreachIndicators, names: Names, keys: dict[str, list[str]], known_good: KnownGood | None,
          incident_id: str, selector_label: str, restore_role_logins: bool, approvers: list[str], policy: str) -> list[str]:
    """Every change the response would make, current -> new, read from the estate now."""
    plan = []
    cluster = estate.cluster
    for workload in ind.workloads:
        plan.append(f"Kubernetes: no NetworkPolicy {names.network_policy(workload)} -> deny-all ingress and egress "
                    f"for pods {selector_label}={workload}")
    for instance in ind.instances:
        groups = read_instance_groups(estate.ec2, instance)
        plan.append(f"EC2 {instance}: security groups {groups} -> [{estate.ec2.group_name}] (no rules) on every network "
                    f"interface; old groups kept in tag {estate.ec2.previous_groups_tag}")
    for role in ind.database_roles:
        can_login, sessions = read_role_state(cluster, role)
        plan.append(f"PostgreSQL role {role}: {'LOGIN' if can_login else 'NOLOGIN'} -> NOLOGIN, {sessions} open session(s) "
                    "recorded and ended")
    for user, key_ids in keys.items():
        for key in list_access_keys(estate.iam, user):
            if key.access_key_id in key_ids:
                plan.append(f"IAM {user}: access key {key.access_key_id} {key.status} -> Inactive")
    progress = cluster.promotion_progress(incident_id) if known_good else None
    if known_good and progress is None:
        plan.append(f"fence writes on {cluster.primary.address}: connection limit 0 on every database, "
                    "default_transaction_read_only=on, end client sessions; writes stay refused until promotion")
    plan.append(f"evidence: dump of {cluster.database}, server logs, ended sessions of the compromised roles"
                + (f", Kubernetes objects of {ind.workloads}" if ind.workloads else "")
                + f" -> s3://{estate.vault.bucket}/{estate.vault.prefix}/{incident_id}/ (compliance lock), sha256 manifest")
    for user in keys:
        plan.append(f"IAM {user}: new access key -> Secrets Manager {names.key_secret(user)} and Secret block {names.key_block(user)}")
    for role in ind.database_roles:
        plan.append(f"PostgreSQL role {role}: password -> new, in Secrets Manager {names.role_secret(role)} "
                    f"and Secret block {names.role_block(role)}")
    for item in ind.secrets:
        plan.append(f"secret {item.secrets_manager_id}: current value -> new random value"
                    + (f", mirrored in Secret block {item.prefect_secret_block}" if item.prefect_secret_block else ""))
    if progress is not None:
        plan.append(f"the promotion of incident {incident_id} was journalled ({progress}): "
                    f"{'confirm' if progress == 'promoted' else 'finish'} it; fence nothing and restore nothing again; "
                    f"{cluster.primary.data_directory}.replaced-{incident_id} stays kept")
    elif known_good:
        plan.append(f"restore {known_good.describe()} into {cluster.candidate_directory(incident_id)}, "
                    "with the rotated role passwords")
        plan.append("ask " + (", ".join(approvers) if policy == "required" else "nobody (auto, drill)") + " to approve")
        plan.append(f"promote: {cluster.primary.address} served by the restored instance; "
                    f"{cluster.primary.data_directory} kept at {cluster.primary.data_directory}.replaced-{incident_id}")
    if ind.database_roles:
        plan.append(f"roles {ind.database_roles}: " + ("LOGIN again with the new password only" if restore_role_logins
                                                        else "stay NOLOGIN"))
    return plan


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
        dry_run: record the plan (current -> new for every change) and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; derived from the cluster and breach start when empty.
        lock_wait_seconds: how long to wait for another recovery of the same cluster to finish.
    """
    logger = get_run_logger()
    started = utcnow()
    detected = incident_detected_at or started
    approvers = list(allowed_approvers or [])
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=cluster_block,
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None, severity="P0",
        drill=drill, dry_run=dry_run, incident_detected_at=detected, started_at=started,
        recovery_target="", rto_objective_seconds=0, rpo_objective_seconds=0,
    )
    names = Names(credential_prefix, secret_block_prefix, network_policy_prefix)
    try:
        with report.step("Preflight: validate inputs and indicators") as step:
            check_parameters()
            require_aware("breach_started_at", breach_started_at)
            require_aware("incident_detected_at", detected)
            refuse_future("breach_started_at", breach_started_at, started)
            refuse_future("incident_detected_at", detected, started)
            if detected < breach_started_at:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} is before breach_started_at "
                                   f"{breach_started_at.isoformat()}")
            check_approval_settings(approval_policy, approvers, approval_timeout_seconds, drill)
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            cluster = load_block(PostgresCluster, cluster_block)
            if approval_policy == "auto" and cluster.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused for {cluster_block!r}: its environment is production")
            estate = Estate(
                cluster,
                load_block(IamPrincipals, iam_block) if iam_block else None,
                load_block(SecretsManagerStore, secrets_block),
                load_block(QuarantineSecurityGroup, quarantine_block) if quarantine_block else None,
                load_block(KubernetesTarget, kubernetes_block) if kubernetes_block else None,
                load_block(EvidenceVault, evidence_block),
            )
            if incident_id:
                cluster.candidate_directory(incident_id)  # refuses an id that is not a plain name
            report.incident_id = incident_id or incident_key(cluster_block, breach_started_at)
            if not check_primary_reachable(cluster):
                raise InvalidInput(f"cluster {cluster_block!r}: primary {cluster.primary.address} is unreachable")
            found = _preflight(estate, indicators, names, breach_started_at, restore_database,
                               evidence_retention_days, workload_label, dry_run)
            if restore_database:
                check_database_inputs(estate.cluster, verification_queries=list(verification_queries or []),
                                      row_count_tables=list(row_count_tables or []))
            if found.window is not None:
                report.recoverable_window = found.window.as_dict()
                report.recovery_target = found.known_good.target.isoformat()
                report.facts["Known-good restore point"] = found.known_good.describe()
            report.facts["Breach start"] = breach_started_at.astimezone(timezone.utc).isoformat()
            step.detail = f"incident {report.incident_id}; breach started {breach_started_at.isoformat()}"

        with recovery_lock(cluster_block, lock_wait_seconds, runtime.flow_run.id) as lock:
            logger.info("Holding %s for incident %s", lock, report.incident_id)
            report.plan = _plan(estate, indicators, names, found.keys, found.known_good, report.incident_id,
                                workload_label, restore_role_logins, approvers, approval_policy)
            if dry_run:
                report.outcome = "DryRun"
                report.summary = "Dry run: the plan was recorded and nothing was changed."
                return Completed(name="DryRun", message=report.summary)
            return _respond(estate, report, indicators, names, found, breach_started_at,
                            restore_role_logins, evidence_retention_days, workload_label,
                            kubernetes_kinds or ["deployments", "replicasets", "pods", "services", "networkpolicies"],
                            list(verification_queries or []), list(row_count_tables or []),
                            approval_policy, approvers, approval_timeout_seconds, approval_poll_seconds)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The response stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        publish_evidence(report)


def _respond(
    estate: Estate, report: RecoveryReport, ind: BreachIndicators, names: Names, found: Preflight,
    breach_started_at: datetime, restore_role_logins: bool,
    evidence_retention_days: int | None, workload_label: str, kinds: list[str], queries: list[VerificationQuery],
    tables: list[str], approval_policy: str, approvers: list[str], approval_timeout_seconds: int,
    approval_poll_seconds: float,
) -> State:
    cluster = estate.cluster
    keys, known_good = found.keys, found.known_good
    selectors = {w: {workload_label: w} for w in ind.workloads}
    quarantines = []
    report.action_items.append(
        f"decide on breach notification: if personal data was exposed, notify the supervisory authority by "
        f"{(report.incident_detected_at + NOTIFICATION_DEADLINE).astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC "
        "(72 hours after detection) and the affected customers, per the data breach notification procedure"
    )

    contained_verifiers: dict[str, str | None] = {}
    with report.step("Contain: isolate workloads, instances and roles; revoke keys") as step:
        for workload, selector in selectors.items():
            isolate_workloads(estate.kube, names.network_policy(workload), selector)
        for instance in ind.instances:
            quarantines.append(quarantine_instance(estate.ec2, instance))
        sessions: dict[str, list[dict]] = {}
        for role in ind.database_roles:
            contained_verifiers[role] = read_password_verifier_digest(cluster, role)
            sessions[role] = disable_role_login(cluster, role)
        revoked = {user: deactivate_access_keys(estate.iam, user, key_ids) for user, key_ids in keys.items()}
        isolated_at = utcnow()
        containment = (isolated_at - report.incident_detected_at).total_seconds()
        report.facts["Containment time (detected -> isolated)"] = f"{containment:.1f} s"
        report.facts["Isolated at"] = isolated_at.isoformat()
        ended = sum(len(v) for v in sessions.values())
        step.detail = (f"{len(ind.workloads)} workload(s), {len(ind.instances)} instance(s), {len(ind.database_roles)} "
                       f"role(s) ({ended} sessions recorded and ended), {sum(len(v) for v in revoked.values())} key(s) "
                       f"revoked; contained {containment:.1f} s after detection")
    for q in quarantines:
        report.action_items.append(f"lift the quarantine of {q.instance_id} once it is rebuilt from a trusted image "
                                   f"(previous security groups: {', '.join(q.previous_groups) or 'none'})")

    fenced_at = None
    # A re-run after this incident's promotion must not fence the restored primary that now serves the endpoint.
    if known_good is not None and cluster.promotion_progress(report.incident_id) is None:
        with report.step("Fence writes on the primary") as step:
            ended_clients = fence_writes(cluster)
            fenced_at = utcnow()
            report.facts["Writes fenced at"] = fenced_at.isoformat()
            step.detail = (f"{ended_clients} client sessions ended; no new connections; primary read-only until the "
                           "restored instance replaces it")

    with report.step("Preserve evidence (write-once, sha256 manifest)") as step:
        folder = evidence_folder(report.incident_id)
        created_at = utcnow()
        retain_until = created_at + timedelta(days=estate.vault.validate_settings(evidence_retention_days))
        try:
            files = collect_database_evidence(cluster, folder, breach_started_at)
            for workload, selector in selectors.items():
                files.append(write_json(folder, _workload_evidence(workload), dump_workloads(estate.kube, kinds, selector)))
            files.append(write_json(folder, "containment.json", {
                "incident_id": report.incident_id, "breach_started_at": breach_started_at.isoformat(),
                "isolated_at": report.facts["Isolated at"], "writes_fenced_at": report.facts.get("Writes fenced at"),
                "access_keys": {u: [{"access_key_id": k.access_key_id, "status": k.status}
                                    for k in list_access_keys(estate.iam, u)] for u in keys},
                "revoked_keys": revoked, "database_roles": ind.database_roles,
                "database_sessions_ended": sessions,
                "instances": [{"instance_id": q.instance_id, "quarantine_group": q.group_id,
                               "previous_groups": q.previous_groups,
                               "previous_groups_by_interface": q.previous_by_interface} for q in quarantines],
                "network_policies": [names.network_policy(w) for w in ind.workloads],
            }))
            collection = f"{report.incident_id}/{report.flow_run_id or created_at.strftime('%Y%m%dT%H%M%SZ')}"
            manifest = store_evidence(estate.vault, collection, files, evidence_retention_days,
                                      {"incident_id": report.incident_id, "flow_run_id": report.flow_run_id},
                                      retain_until, created_at)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        report.facts["Evidence location"] = manifest.location
        report.facts["Evidence manifest"] = f"s3://{manifest.bucket}/{manifest.manifest_key} (version {manifest.manifest_version_id})"
        report.facts["Evidence manifest sha256"] = manifest.manifest_sha256
        report.facts["Evidence retained until"] = f"{manifest.retain_until} (compliance mode)"
        report.add_checks("evidence", verify_evidence(estate.vault, manifest))
        evidence_failed = report.failed_critical("evidence")
        step.outcome = "ok" if not evidence_failed else "failed"
        step.detail = (f"{len(manifest.objects)} objects at {manifest.location}; manifest sha256 {manifest.manifest_sha256}; "
                       f"{len(evidence_failed)} failed read-back checks")

    rotated: list[RotatedCredential] = []
    with report.step("Rotate credentials") as step:
        for user in keys:
            rotated.append(replace_access_key(estate.iam, estate.store, user, revoked[user], names.key_secret(user),
                                              names.key_block(user), report.incident_id, found.kept.get(user, [])))
        for role in ind.database_roles:
            rotated.append(rotate_role_password(cluster, estate.store, role, names.role_secret(role),
                                                names.role_block(role), report.incident_id))
        for item in ind.secrets:
            rotated.append(rotate_secret(estate.store, item.secrets_manager_id, item.prefect_secret_block,
                                         report.incident_id))
        report.facts["Rotated credentials"] = [r.describe() for r in rotated] or ["none"]
        step.detail = f"{len(rotated)} credential(s) replaced: " + ", ".join(f"{r.kind} {r.name}" for r in rotated)

    if evidence_failed:
        report.outcome = "EvidenceNotPreserved"
        report.summary = ("The breach is contained and credentials are rotated, but the evidence could not be verified "
                          "in the vault; the database was not restored so nothing is lost before it is.")
        report.action_items.append(f"inspect the evidence at {report.facts['Evidence location']} and re-run this incident")
        if fenced_at is not None:
            report.summary += f" Writes on {cluster.primary.address} stay fenced."
            report.action_items.append(_unfence_item(report))
        return Failed(name="EvidenceNotPreserved", message=report.summary)

    if known_good is not None:
        state = _restore(estate, report, ind, names, known_good, fenced_at, queries, tables, approval_policy, approvers,
                         approval_timeout_seconds, approval_poll_seconds)
        if state is not None:
            return state

    if ind.database_roles:
        with report.step("Role logins with the new credentials") as step:
            for role in ind.database_roles:
                apply_role_credentials(cluster, estate.store, role, names.role_secret(role), restore_role_logins)
            step.detail = ("compromised roles log in again with their new password only" if restore_role_logins
                           else "compromised roles stay NOLOGIN")

    with report.step("Harden and verify") as step:
        checks: list[CheckResult] = []
        for user, key_ids in revoked.items():
            checks.append(check_access_keys_revoked(estate.iam, user, key_ids))
            checks.append(check_access_key_replaced(estate.iam, estate.store, user, names.key_secret(user)))
            checks.append(check_only_stored_key_active(estate.iam, estate.store, user, names.key_secret(user),
                                                       found.kept.get(user, [])))
        for role in ind.database_roles:
            checks += check_role_credentials(cluster, estate.store, role, names.role_secret(role),
                                             contained_verifiers[role], restore_role_logins)
        for item, cred in zip(ind.secrets, [r for r in rotated if r.kind == "secret"], strict=True):
            checks.append(check_secret_rotated(estate.store, item.secrets_manager_id, item.prefect_secret_block,
                                               cred.version, report.incident_id))
        for q in quarantines:
            checks += check_quarantine(estate.ec2, q.instance_id, q.group_id)
        for workload, selector in selectors.items():
            checks.append(check_workload_isolated(estate.kube, names.network_policy(workload), selector))
        report.add_checks("hardening", checks)
        failed = report.failed_critical("hardening")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(checks)} checks, {len(failed)} critical failures"

    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.action_items += [
        "enhanced monitoring for residual threats on the contained systems",
        "post-incident review: attack vector, scope of compromised data, controls to add",
    ]
    if report.failed_critical():
        report.outcome = "HardeningFailed"
        report.summary = "The breach was contained and evidence preserved, but hardening checks failed; see Verification Results."
        return Failed(name="HardeningFailed", message=report.summary)
    report.outcome = "Recovered" if known_good is not None else "Contained"
    report.summary = (f"The breach of {report.target} was contained {report.facts['Containment time (detected -> isolated)']} "
                      f"after detection; evidence is locked at {report.facts['Evidence location']}; "
                      f"{len(rotated)} credential(s) were rotated"
                      + (f"; the database was restored to {report.recovery_target}, before the breach." if known_good else "."))
    return Completed(name=report.outcome, message=report.summary)


def _unfence_item(report: RecoveryReport) -> str:
    return (f"the primary of {report.target} stays fenced (read-only, no new connections): unfence it with "
            f"`dr unfence {report.target}` only once it is known to be clean, or restore again")


def _restore(
    estate: Estate, report: RecoveryReport, ind: BreachIndicators, names: Names, known_good: KnownGood,
    fenced_at: datetime | None, queries: list[VerificationQuery], tables: list[str], approval_policy: str,
    approvers: list[str], approval_timeout_seconds: int, approval_poll_seconds: float,
) -> State | None:
    """Restore beside, verify, approve, promote; a final state when the restore stops, None when promoted."""
    cluster = estate.cluster
    progress = cluster.promotion_progress(report.incident_id)
    if progress is not None:
        with report.step("Resume: promotion of this incident") as step:
            candidate = cluster.candidate_for(report.incident_id)
            if candidate is None:
                raise RecoveryError(f"promotion of {report.incident_id} was interrupted and its candidate is gone; "
                                    f"inspect {cluster.primary.data_directory} and its .replaced-* sibling by hand")
            promotion = promote_restored_instance(cluster, candidate)
            step.detail = f"{promotion.endpoint} served from {promotion.data_directory} since {promotion.promoted_at}"
        report.promotion = {"endpoint": promotion.endpoint, "data_directory": promotion.data_directory,
                            "old_primary_aside": promotion.old_primary_aside, "already_promoted": True,
                            "promoted_at": promotion.promoted_at}
        _replica_follow_ups(report, cluster)
        return None

    with report.step("Restore beside the primary") as step:
        candidate = restore_to_point_in_time(cluster, report.incident_id, known_good.target)
        report.candidate = {"data_directory": candidate.data_directory, "port": candidate.port,
                            "backup_set": candidate.backup_set, "reused": candidate.reused}
        # The restored roles still carry the passwords from before the breach: replace them before anyone can connect.
        for role in ind.database_roles:
            apply_role_credentials(cluster, estate.store, role, names.role_secret(role), False, candidate.port)
        step.detail = (f"{candidate.data_directory} on port {candidate.port} from backup {candidate.backup_set}, "
                       f"{known_good.describe()}")

    with report.step("Verify the restored instance") as step:
        try:
            checks = verify_restored_instance(cluster, candidate.port, tables, queries)
        except Exception:
            stop_restored_instance(cluster, candidate)  # a candidate that could not be verified is not left running
            raise
        # Every commit the old primary took until writes were fenced is discarded by the restore.
        loss = measure_data_loss(cluster, candidate.port, fenced_at)
        last = loss.last_restored_commit
        checks.append(CheckResult("restored data predates the breach", last is None or last < known_good.breach_start,
                                  f"last restored commit {last.isoformat() if last else 'none'}; breach started "
                                  f"{known_good.breach_start.isoformat()}"))
        report.add_checks("restored", checks)
        # Without a replayed commit the restore ends at the target: everything after it is discarded.
        report.last_restored_commit = last
        report.rpo_seconds = loss.seconds if loss.seconds is not None else max(
            0.0, (fenced_at - known_good.target).total_seconds())
        report.facts["Data-loss window"] = (f"{(last or known_good.target).isoformat()} .. {fenced_at.isoformat()} "
                                            "(writes fenced): every commit in it is discarded")
        failed = report.failed_critical("restored")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(checks)} checks, {len(failed)} critical failures; data loss {report.rpo_seconds} s"
    if report.failed_critical("restored"):
        stop_restored_instance(cluster, candidate)
        report.outcome = "VerificationFailed"
        report.summary = (f"The breach is contained and credentials rotated, but the restored instance failed verification "
                          f"and was not promoted; it is kept at {candidate.data_directory}. The primary stays fenced.")
        report.action_items += [f"inspect {candidate.data_directory}", "choose another known-good restore point",
                                _unfence_item(report)]
        return Failed(name="VerificationFailed", message=report.summary)

    decision = approval_step(report, approval_policy, _preview(report, cluster, candidate.data_directory), approvers,
                             approval_timeout_seconds, approval_poll_seconds)
    approved = decision is not None and decision.approved
    if not approved:
        stop_restored_instance(cluster, candidate)
        name = "ApprovalTimedOut" if decision is None else "Rejected"
        report.outcome = name
        report.summary = (f"The breach is contained, evidence preserved and credentials rotated; the restore was "
                          f"{'not approved in time' if decision is None else 'rejected'} and nothing was promoted. "
                          f"The candidate is kept at {candidate.data_directory}. The primary stays fenced.")
        report.action_items += [f"inspect or discard the candidate at {candidate.data_directory}", _unfence_item(report)]
        return Failed(name=name, message=report.summary) if decision is None else Cancelled(name=name, message=report.summary)

    with report.step("Promote the restored instance") as step:
        promotion = promote_restored_instance(cluster, candidate)
        report.promotion = {"endpoint": promotion.endpoint, "data_directory": promotion.data_directory,
                            "old_primary_aside": promotion.old_primary_aside,
                            "already_promoted": promotion.already_promoted, "promoted_at": promotion.promoted_at}
        step.detail = f"{promotion.endpoint} served from {promotion.data_directory}; old primary at {promotion.old_primary_aside}"

    with report.step("Post-checks at the endpoint") as step:
        report.add_checks("endpoint", check_endpoint(cluster, queries))
        _replica_follow_ups(report, cluster)
        failed = report.failed_critical("endpoint")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(failed)} critical failures"
    return None


def _replica_follow_ups(report: RecoveryReport, cluster: PostgresCluster) -> None:
    """Streaming replicas of the old primary still hold (and may serve) the breached data: they must be re-cloned."""
    stale = [f"{r.address} ({r.data_directory or 'remote'})" for r in cluster.replicas]
    report.add_checks("endpoint", [CheckResult(
        "no replica serves data from before the restore", not stale,
        ("replicas of the replaced primary, to re-clone from the restored one: " + ", ".join(stale)) if stale
        else "the cluster has no streaming replica", critical=False)])
    for replica in stale:
        report.action_items.append(f"take replica {replica} out of service and re-clone it from the restored primary "
                                   f"{cluster.primary.address}: it still holds the breached data")


def _preview(report: RecoveryReport, cluster: PostgresCluster, candidate_dir: str) -> str:
    lines = [
        f"## Promote the known-good restore of `{report.target}` after the breach {report.incident_id}?",
        "",
        f"- **Restore point**: {report.facts.get('Known-good restore point', '-')}",
        f"- **Containment**: {report.facts.get('Containment time (detected -> isolated)', '-')} after detection",
        f"- **Evidence**: {report.facts.get('Evidence location', '-')} (manifest sha256 "
        f"{report.facts.get('Evidence manifest sha256', '-')})",
        f"- **Data-loss window**: {report.rpo_seconds} s (objective {report.rpo_objective_seconds} s)",
        "",
        "| Check | Stage | Result | Detail |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c.name} | {c.stage} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in report.checks]
    lines += ["", f"Approving stops {cluster.primary.address}, keeps its data directory aside and serves the endpoint "
              f"from {candidate_dir}. Rejecting promotes nothing."]
    return "\n".join(lines)
