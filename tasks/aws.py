"""Tasks over the AWS security blocks: thin, verb-first wrappers of their verbs."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.aws_security import IamPrincipals, Quarantine, QuarantineSecurityGroup
from blocks.postgres import CheckResult
from tasks._policy import policy


@task(name="quarantine-instance", **policy(timeout_seconds=120))
def quarantine_instance(ec2: QuarantineSecurityGroup, instance_id: str) -> Quarantine:
    """Replace the instance's security groups with the rule-less quarantine group."""
    done = ec2.quarantine(instance_id)
    get_run_logger().info("Instance %s isolated in %s (previous groups %s%s)", instance_id, done.group_id,
                          ", ".join(done.previous_groups) or "none", "; already isolated" if done.already else "")
    return done


@task(name="deactivate-access-keys", **policy(timeout_seconds=120))
def deactivate_access_keys(iam: IamPrincipals, user: str, access_key_ids: list[str] | None = None) -> list[str]:
    """Set the named keys of ``user`` (all its keys when none are named) Inactive; returns the key ids handled."""
    keys = [k.access_key_id for k in iam.access_keys(user)]
    chosen = list(access_key_ids) if access_key_ids else keys
    for key_id in chosen:
        changed = iam.deactivate_access_key(user, key_id)
        get_run_logger().info("Access key %s of %s %s", key_id, user, "deactivated" if changed else "already inactive")
    return chosen


@task(name="check-quarantine", **policy(timeout_seconds=60))
def check_quarantine(ec2: QuarantineSecurityGroup, instance_id: str, group_id: str) -> list[CheckResult]:
    """The instance has only the quarantine group, and that group has no rule in either direction."""
    groups = ec2.instance_groups(instance_id)
    ingress, egress = ec2.group_rules(group_id)
    return [
        CheckResult(f"instance isolated: {instance_id}", groups == [group_id], f"security groups now {groups}"),
        CheckResult(f"quarantine group has no rules: {group_id}", not ingress and not egress,
                    f"{len(ingress)} ingress and {len(egress)} egress rules"),
    ]


@task(name="check-access-keys-revoked", **policy(timeout_seconds=60))
def check_access_keys_revoked(iam: IamPrincipals, user: str, revoked: list[str]) -> CheckResult:
    """None of the revoked keys of ``user`` is Active (a deleted key counts as revoked)."""
    status = {k.access_key_id: k.status for k in iam.access_keys(user)}
    active = [k for k in revoked if status.get(k) == "Active"]
    detail = ", ".join(f"{k}: {status.get(k, 'deleted')}" for k in revoked) or "no key was compromised"
    return CheckResult(f"no compromised key active: {user}", not active, detail)
