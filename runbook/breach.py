"""The security-breach response's own parts: what the breach touched, what the response calls what it
creates, and the steps that contain, preserve evidence, rotate credentials and harden.

The flow (flows/security_breach.py) reads as the response plan and calls these; the restore from
known-good goes through :func:`runbook.restore.restore_verify_promote` like any other restore.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, Field

from blocks import PostgresCluster
from blocks.aws_security import IamPrincipals, Quarantine, QuarantineSecurityGroup, SecretsManagerStore
from blocks.errors import InvalidInput
from blocks.evidence_vault import EvidenceVault
from blocks.kubernetes import KubernetesTarget
from blocks.loading import load_block
from blocks.results import CheckResult
from runbook.evidence import RecoveryReport, utcnow
from runbook.restore import aside_directory
from runbook.run import Recovery
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
from tasks.forensics import (
    KnownGood,
    check_workload_isolated,
    choose_known_good_restore_point,
    collect_database_evidence,
    evidence_folder,
    store_evidence,
    verify_evidence,
    write_json,
)
from tasks.kubernetes import dump_workloads, isolate_workloads
from tasks.postgres import archive_current_wal, check_target_in_window, list_backups

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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Names:
    """Where each rotated credential is stored and what each isolation object is called."""

    credential_prefix: str
    block_prefix: str
    policy_prefix: str

    def key_secret(self, user: str) -> str:
        return f"{self.credential_prefix.strip('/')}/iam/{user}"

    def role_secret(self, role: str) -> str:
        return f"{self.credential_prefix.strip('/')}/postgres/{role}"

    def key_block(self, user: str) -> str:
        return f"{self.block_prefix}-iam-{_slug(user)}"[:63].rstrip("-")

    def role_block(self, role: str) -> str:
        return f"{self.block_prefix}-postgres-{_slug(role)}"[:63].rstrip("-")

    def network_policy(self, workload: str) -> str:
        return f"{self.policy_prefix}-{_slug(workload)}"[:63].rstrip("-")

    @staticmethod
    def workload_evidence(workload: str) -> str:
        return f"kubernetes-{_slug(workload)}.json"


@dataclass(frozen=True)
class BreachTargets:
    """The systems one response works on, loaded from their blocks; the optional ones are None when not given."""

    cluster: PostgresCluster
    store: SecretsManagerStore
    vault: EvidenceVault
    iam: IamPrincipals | None = None
    ec2: QuarantineSecurityGroup | None = None
    kube: KubernetesTarget | None = None

    @classmethod
    def load(cls, cluster_block: str, secrets_block: str, evidence_block: str, iam_block: str | None,
             quarantine_block: str | None, kubernetes_block: str | None) -> "BreachTargets":
        return cls(
            load_block(PostgresCluster, cluster_block), load_block(SecretsManagerStore, secrets_block),
            load_block(EvidenceVault, evidence_block),
            load_block(IamPrincipals, iam_block) if iam_block else None,
            load_block(QuarantineSecurityGroup, quarantine_block) if quarantine_block else None,
            load_block(KubernetesTarget, kubernetes_block) if kubernetes_block else None,
        )

    def own_access_keys(self) -> dict[str, str]:
        """The access key id each AWS block of this response signs its calls with (block parameter -> key id)."""
        own = {}
        for param, block in (("iam_block", self.iam), ("secrets_block", self.store), ("quarantine_block", self.ec2),
                             ("evidence_block", self.vault)):
            key_id = getattr(getattr(block, "credentials", None), "aws_access_key_id", None)
            if key_id:
                own[param] = key_id
        return own


def known_good_restore_point(run: Recovery, cluster: PostgresCluster, breach_started_at: datetime) -> KnownGood:
    """The newest backup before the breach and a target just before it, inside the recoverable window."""
    known_good = choose_known_good_restore_point(cluster, breach_started_at)
    # A real run closes and archives the current WAL segment, so "now" is reachable; a dry run
    # changes nothing and judges the target against that same bound.
    archived = utcnow() if run.dry_run else archive_current_wal(cluster)
    window = list_backups(cluster, archived)
    check_target_in_window(known_good.target, window)
    run.report.recoverable_window = window.as_dict()
    run.report.recovery_target = known_good.target.isoformat()
    run.report.facts["Known-good restore point"] = known_good.describe()
    return known_good


class BreachResponse:
    """One response: the indicators, the systems they live in, the names it gives what it creates, and what
    each step did (later steps and the hardening checks read it)."""

    def __init__(self, run: Recovery, targets: BreachTargets, indicators: BreachIndicators, names: Names,
                 workload_label: str):
        self.run, self.targets, self.ind, self.names, self.label = run, targets, indicators, names, workload_label
        self.selectors = {w: {workload_label: w} for w in indicators.workloads}
        self.keys: dict[str, list[str]] = {}  # per IAM user: the compromised access keys
        self.kept: dict[str, list[str]] = {}  # per IAM user: its other keys, left as they are
        self.verifiers: dict[str, str | None] = {}  # per role: the password verifier digest when contained
        self.sessions: dict[str, list[dict]] = {}
        self.revoked: dict[str, list[str]] = {}
        self.quarantines: list[Quarantine] = []
        self.rotated: list[RotatedCredential] = []

    # 1. Preflight (reads only) --------------------------------------------------------------------

    def check_indicators(self, evidence_retention_days: int | None) -> None:
        """Every indicator names something that exists and maps to names of its own; finds the keys to revoke."""
        ind, t, names = self.ind, self.targets, self.names
        if ind.is_empty():
            raise InvalidInput("indicators name nothing to contain: give iam_users, database_roles, workloads, instances or secrets")
        self._refuse_collisions()
        if ind.iam_users or ind.access_key_ids:
            if t.iam is None:
                raise InvalidInput("indicators name IAM users or keys but no iam_block was given")
            owner: dict[str, str] = {}
            for user in ind.iam_users:
                if not find_iam_user(t.iam, user):
                    raise InvalidInput(f"compromised principal {user!r} is not an IAM user of this account")
                for key in list_access_keys(t.iam, user):
                    owner[key.access_key_id] = user
            for key_id in ind.access_key_ids:
                if key_id not in owner:
                    raise InvalidInput(f"access key {key_id!r} belongs to none of the compromised principals {ind.iam_users}")
            for user in ind.iam_users:
                named = [k for k in ind.access_key_ids if owner[k] == user]
                self.keys[user] = named or [k for k, u in owner.items() if u == user]
                self.kept[user] = [k for k, u in owner.items() if u == user and k not in self.keys[user]]
        revoking = {k for ids in self.keys.values() for k in ids}
        for block_param, key_id in t.own_access_keys().items():
            if key_id in revoking:
                raise InvalidInput(f"access key {key_id} is compromised and is the key {block_param} runs with: revoking it "
                                   "would stop this response halfway; give that block other credentials first")
        for role in ind.database_roles:
            if role == t.cluster.user:
                raise InvalidInput(f"role {role!r} is the cluster's recovery role; rotate it by hand, not in this flow")
            if not role_exists(t.cluster, role):
                raise InvalidInput(f"compromised database role {role!r} does not exist on {t.cluster.primary.address}")
        if ind.instances:
            if t.ec2 is None:
                raise InvalidInput("indicators name EC2 instances but no quarantine_block was given")
            for instance in ind.instances:
                describe_instance(t.ec2, instance)
        if ind.workloads and t.kube is None:
            raise InvalidInput("indicators name Kubernetes workloads but no kubernetes_block was given")
        for workload, selector in self.selectors.items():
            if not dump_workloads(t.kube, ["deployments", "statefulsets", "pods"], selector):
                raise InvalidInput(f"compromised workload {workload!r}: no deployment, stateful set or pod labelled "
                                   f"{self.label}={workload} in namespace {t.kube.namespace!r}")
        for item in ind.secrets:
            if not secret_exists(t.store, item.secrets_manager_id):
                raise InvalidInput(f"secret {item.secrets_manager_id!r} to rotate does not exist in Secrets Manager")
            if item.prefect_secret_block is not None and not BLOCK_NAME.match(item.prefect_secret_block):
                raise InvalidInput(f"Prefect Secret block name {item.prefect_secret_block!r} is not lowercase letters, digits and dashes")
        for block_name in [names.key_block(u) for u in ind.iam_users] + [names.role_block(r) for r in ind.database_roles]:
            if not BLOCK_NAME.match(block_name):
                raise InvalidInput(f"Prefect Secret block name {block_name!r} is not valid; change secret_block_prefix")
        t.vault.validate_settings(evidence_retention_days)

    def _refuse_collisions(self) -> None:
        """Distinct indicators must map to distinct Secret blocks, NetworkPolicies and evidence files."""
        ind, names = self.ind, self.names
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
            claim("evidence file", names.workload_evidence(workload), f"workload {workload!r}")

    def plan(self, known_good: KnownGood | None, restore_role_logins: bool) -> list[str]:
        """Every change the response would make, current -> new, read from the systems now."""
        ind, t, names, incident_id = self.ind, self.targets, self.names, self.run.incident_id
        cluster, plan = t.cluster, []
        for workload in ind.workloads:
            plan.append(f"Kubernetes: no NetworkPolicy {names.network_policy(workload)} -> deny-all ingress and egress "
                        f"for pods {self.label}={workload}")
        for instance in ind.instances:
            groups = read_instance_groups(t.ec2, instance)
            plan.append(f"EC2 {instance}: security groups {groups} -> [{t.ec2.group_name}] (no rules) on every network "
                        f"interface; old groups kept in tag {t.ec2.previous_groups_tag}")
        for role in ind.database_roles:
            can_login, sessions = read_role_state(cluster, role)
            plan.append(f"PostgreSQL role {role}: {'LOGIN' if can_login else 'NOLOGIN'} -> NOLOGIN, {sessions} open "
                        "session(s) recorded and ended")
        for user, key_ids in self.keys.items():
            for key in list_access_keys(t.iam, user):
                if key.access_key_id in key_ids:
                    plan.append(f"IAM {user}: access key {key.access_key_id} {key.status} -> Inactive")
        progress = cluster.promotion_progress(incident_id) if known_good else None
        if known_good and progress is None:
            plan.append(f"fence writes on {cluster.primary.address}: connection limit 0 on every database, "
                        "default_transaction_read_only=on, end client sessions; writes stay refused until promotion")
        plan.append(f"evidence: dump of {cluster.database}, server logs, ended sessions of the compromised roles"
                    + (f", Kubernetes objects of {ind.workloads}" if ind.workloads else "")
                    + f" -> s3://{t.vault.bucket}/{t.vault.prefix}/{incident_id}/ (compliance lock), sha256 manifest")
        for user in self.keys:
            plan.append(f"IAM {user}: new access key -> Secrets Manager {names.key_secret(user)} and Secret block "
                        f"{names.key_block(user)}")
        for role in ind.database_roles:
            plan.append(f"PostgreSQL role {role}: password -> new, in Secrets Manager {names.role_secret(role)} "
                        f"and Secret block {names.role_block(role)}")
        for item in ind.secrets:
            plan.append(f"secret {item.secrets_manager_id}: current value -> new random value"
                        + (f", mirrored in Secret block {item.prefect_secret_block}" if item.prefect_secret_block else ""))
        aside = aside_directory(cluster, incident_id)
        if progress is not None:
            plan.append(f"the promotion of incident {incident_id} was journalled ({progress}): "
                        f"{'confirm' if progress == 'promoted' else 'finish'} it; fence nothing and restore nothing again; "
                        f"{aside} stays kept")
        elif known_good:
            plan += [f"restore {known_good.describe()} into {cluster.candidate_directory(incident_id)}, "
                     "with the rotated role passwords",
                     self.run.approval.describe(),
                     f"promote: {cluster.primary.address} served by the restored instance; "
                     f"{cluster.primary.data_directory} kept at {aside}"]
        if ind.database_roles:
            plan.append(f"roles {ind.database_roles}: " + ("LOGIN again with the new password only" if restore_role_logins
                                                            else "stay NOLOGIN"))
        return plan

    # 2. Containment -------------------------------------------------------------------------------

    def contain(self) -> str:
        """Deny-all policies, quarantine groups, role logins disabled and sessions ended, keys deactivated."""
        ind, t, report = self.ind, self.targets, self.run.report
        for workload, selector in self.selectors.items():
            isolate_workloads(t.kube, self.names.network_policy(workload), selector)
        for instance in ind.instances:
            self.quarantines.append(quarantine_instance(t.ec2, instance))
        for role in ind.database_roles:
            self.verifiers[role] = read_password_verifier_digest(t.cluster, role)
            self.sessions[role] = disable_role_login(t.cluster, role)
        self.revoked = {user: deactivate_access_keys(t.iam, user, key_ids) for user, key_ids in self.keys.items()}
        isolated_at = utcnow()
        containment = (isolated_at - self.run.detected_at).total_seconds()
        report.facts["Containment time (detected -> isolated)"] = f"{containment:.1f} s"
        report.facts["Isolated at"] = isolated_at.isoformat()
        for q in self.quarantines:
            report.action_items.append(f"lift the quarantine of {q.instance_id} once it is rebuilt from a trusted image "
                                       f"(previous security groups: {', '.join(q.previous_groups) or 'none'})")
        ended = sum(len(v) for v in self.sessions.values())
        return (f"{len(ind.workloads)} workload(s), {len(ind.instances)} instance(s), {len(ind.database_roles)} "
                f"role(s) ({ended} sessions recorded and ended), {sum(len(v) for v in self.revoked.values())} key(s) "
                f"revoked; contained {containment:.1f} s after detection")

    # 3. Evidence ----------------------------------------------------------------------------------

    def preserve_evidence(self, breach_started_at: datetime, kinds: list[str], retention_days: int | None) -> str:
        """Dump, server logs, Kubernetes objects and the containment record, write-once with a manifest, read back."""
        ind, t, report = self.ind, self.targets, self.run.report
        folder = evidence_folder(report.incident_id)
        created_at = utcnow()
        retain_until = created_at + timedelta(days=t.vault.validate_settings(retention_days))
        try:
            files = collect_database_evidence(t.cluster, folder, breach_started_at)
            for workload, selector in self.selectors.items():
                files.append(write_json(folder, self.names.workload_evidence(workload),
                                        dump_workloads(t.kube, kinds, selector)))
            files.append(write_json(folder, "containment.json", {
                "incident_id": report.incident_id, "breach_started_at": breach_started_at.isoformat(),
                "isolated_at": report.facts["Isolated at"], "writes_fenced_at": report.facts.get("Writes fenced at"),
                "access_keys": {u: [{"access_key_id": k.access_key_id, "status": k.status}
                                    for k in list_access_keys(t.iam, u)] for u in self.keys},
                "revoked_keys": self.revoked, "database_roles": ind.database_roles,
                "database_sessions_ended": self.sessions,
                "instances": [{"instance_id": q.instance_id, "quarantine_group": q.group_id,
                               "previous_groups": q.previous_groups,
                               "previous_groups_by_interface": q.previous_by_interface} for q in self.quarantines],
                "network_policies": [self.names.network_policy(w) for w in ind.workloads],
            }))
            collection = f"{report.incident_id}/{report.flow_run_id or created_at.strftime('%Y%m%dT%H%M%SZ')}"
            manifest = store_evidence(t.vault, collection, files, retention_days,
                                      {"incident_id": report.incident_id, "flow_run_id": report.flow_run_id},
                                      retain_until, created_at)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        report.facts["Evidence location"] = manifest.location
        report.facts["Evidence manifest"] = (f"s3://{manifest.bucket}/{manifest.manifest_key} "
                                             f"(version {manifest.manifest_version_id})")
        report.facts["Evidence manifest sha256"] = manifest.manifest_sha256
        report.facts["Evidence retained until"] = f"{manifest.retain_until} (compliance mode)"
        report.add_checks("evidence", verify_evidence(t.vault, manifest))
        return (f"{len(manifest.objects)} objects at {manifest.location}; manifest sha256 {manifest.manifest_sha256}; "
                f"{len(report.failed_critical('evidence'))} failed read-back checks")

    # 4. Rotation ----------------------------------------------------------------------------------

    def rotate(self) -> str:
        """New access keys, role passwords and secret values, each stored before it takes effect."""
        t, names, incident_id = self.targets, self.names, self.run.incident_id
        for user in self.keys:
            self.rotated.append(replace_access_key(t.iam, t.store, user, self.revoked[user], names.key_secret(user),
                                                   names.key_block(user), incident_id, self.kept.get(user, [])))
        for role in self.ind.database_roles:
            self.rotated.append(rotate_role_password(t.cluster, t.store, role, names.role_secret(role),
                                                     names.role_block(role), incident_id))
        for item in self.ind.secrets:
            self.rotated.append(rotate_secret(t.store, item.secrets_manager_id, item.prefect_secret_block, incident_id))
        self.run.report.facts["Rotated credentials"] = [r.describe() for r in self.rotated] or ["none"]
        return f"{len(self.rotated)} credential(s) replaced: " + ", ".join(f"{r.kind} {r.name}" for r in self.rotated)

    def apply_role_credentials(self, allow_login: bool, port: int | None = None) -> None:
        """Give each compromised role its stored new password, on the primary or the instance at ``port``."""
        for role in self.ind.database_roles:
            apply_role_credentials(self.targets.cluster, self.targets.store, role, self.names.role_secret(role),
                                   allow_login, port)

    # 6. Hardening ---------------------------------------------------------------------------------

    def hardening_checks(self, restore_role_logins: bool) -> list[CheckResult]:
        """Each with its evidence: no compromised key active, new credentials work and old ones fail, isolation holds."""
        t, names, checks = self.targets, self.names, []
        for user, key_ids in self.revoked.items():
            checks.append(check_access_keys_revoked(t.iam, user, key_ids))
            checks.append(check_access_key_replaced(t.iam, t.store, user, names.key_secret(user)))
            checks.append(check_only_stored_key_active(t.iam, t.store, user, names.key_secret(user),
                                                       self.kept.get(user, [])))
        for role in self.ind.database_roles:
            checks += check_role_credentials(t.cluster, t.store, role, names.role_secret(role), self.verifiers[role],
                                             restore_role_logins)
        for item, cred in zip(self.ind.secrets, [r for r in self.rotated if r.kind == "secret"], strict=True):
            checks.append(check_secret_rotated(t.store, item.secrets_manager_id, item.prefect_secret_block,
                                               cred.version, self.run.incident_id))
        for q in self.quarantines:
            checks += check_quarantine(t.ec2, q.instance_id, q.group_id)
        for workload, selector in self.selectors.items():
            checks.append(check_workload_isolated(t.kube, names.network_policy(workload), selector))
        return checks


# The report's wording --------------------------------------------------------------------------------

def notification_item(detected_at: datetime) -> str:
    deadline = (detected_at + NOTIFICATION_DEADLINE).astimezone(timezone.utc)
    return (f"decide on breach notification: if personal data was exposed, notify the supervisory authority by "
            f"{deadline:%Y-%m-%d %H:%M} UTC (72 hours after detection) and the affected customers, per the data "
            "breach notification procedure")


def unfence_item(target: str) -> str:
    return (f"the primary of {target} stays fenced (read-only, no new connections): unfence it with "
            f"`dr unfence {target}` only once it is known to be clean, or restore again")


def replica_follow_ups(report: RecoveryReport, cluster: PostgresCluster) -> None:
    """Streaming replicas of the old primary still hold (and may serve) the breached data: they must be re-cloned."""
    stale = [f"{r.address} ({r.data_directory or 'remote'})" for r in cluster.replicas]
    report.add_checks("endpoint", [CheckResult(
        "no replica serves data from before the restore", not stale,
        ("replicas of the replaced primary, to re-clone from the restored one: " + ", ".join(stale)) if stale
        else "the cluster has no streaming replica", critical=False)])
    for replica in stale:
        report.action_items.append(f"take replica {replica} out of service and re-clone it from the restored primary "
                                   f"{cluster.primary.address}: it still holds the breached data")


def promotion_preview(report: RecoveryReport, cluster: PostgresCluster, candidate_dir: str) -> str:
    facts = report.facts
    lines = [
        f"## Promote the known-good restore of `{report.target}` after the breach {report.incident_id}?",
        "",
        f"- **Restore point**: {facts.get('Known-good restore point', '-')}",
        f"- **Containment**: {facts.get('Containment time (detected -> isolated)', '-')} after detection",
        f"- **Evidence**: {facts.get('Evidence location', '-')} (manifest sha256 "
        f"{facts.get('Evidence manifest sha256', '-')})",
        f"- **Data-loss window**: {report.rpo_seconds} s (objective {report.rpo_objective_seconds} s)",
        "",
        *report.checks_markdown(with_stage=True),
        "",
        f"Approving stops {cluster.primary.address}, keeps its data directory aside and serves the endpoint "
        f"from {candidate_dir}. Rejecting promotes nothing.",
    ]
    return "\n".join(lines)
