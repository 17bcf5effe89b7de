"""Tasks over the AWS security blocks: thin, verb-first wrappers of their verbs."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.aws_security import AccessKey, IamPrincipals, Quarantine, QuarantineSecurityGroup
from blocks.results import CheckResult
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
    """Every network interface of the instance has only the quarantine group, and that group has no rule."""
    groups = ec2.instance_groups(instance_id)
    interfaces = ec2.interface_groups(instance_id)
    open_interfaces = {eni: g for eni, g in interfaces.items() if g != [group_id]}
    ingress, egress = ec2.group_rules(group_id)
    return [
        CheckResult(f"instance isolated: {instance_id}", groups == [group_id] and not open_interfaces,
                    f"security groups now {groups}; {len(interfaces)} network interface(s)"
                    + (f", not isolated: {open_interfaces}" if open_interfaces else ", each only in the quarantine group")),
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


@task(name="find-iam-user", **policy(timeout_seconds=60))
def find_iam_user(iam: IamPrincipals, user: str) -> bool:
    """True when ``user`` is an IAM user of the account."""
    return iam.user_exists(user)


@task(name="list-access-keys", **policy(timeout_seconds=60))
def list_access_keys(iam: IamPrincipals, user: str) -> list[AccessKey]:
    """The access keys of ``user`` with their status (no secrets)."""
    return iam.access_keys(user)


@task(name="describe-instance", **policy(timeout_seconds=60))
def describe_instance(ec2: QuarantineSecurityGroup, instance_id: str) -> dict:
    """The EC2 instance's description; refused when it does not exist."""
    return ec2.describe_instance(instance_id)


@task(name="read-instance-groups", **policy(timeout_seconds=60))
def read_instance_groups(ec2: QuarantineSecurityGroup, instance_id: str) -> list[str]:
    """Every security group of the instance and of its network interfaces."""
    return ec2.instance_groups(instance_id)
