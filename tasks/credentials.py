"""Credential rotation: new IAM access keys, PostgreSQL role passwords and secret values, written to
Secrets Manager and to Prefect ``Secret`` blocks, and the checks that the old ones no longer work.

New values are generated here with :mod:`secrets`, held as ``SecretStr`` and never returned,
logged or put into an error message: tasks return names and version ids only. Role passwords
and secret values are stored before they take effect. An IAM access key only exists once IAM
creates it, so it is stored right after: when storing fails the new key is deleted before the
error is raised, and a retry first deletes any key an interrupted attempt left behind (Active,
neither compromised, nor stored, nor one the user had before the response), so no active key
is left that nobody holds. A re-run of the same incident finds the value it stored (tagged with
the incident id) and reuses it instead of rotating twice.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.blocks.system import Secret
from pydantic import SecretStr

from blocks.aws_security import AwsError, IamPrincipals, SecretsManagerStore
from blocks.postgres import PostgresCluster
from blocks.results import CheckResult
from tasks._policy import policy

INCIDENT_TAG = "dr:incident"


@dataclass(frozen=True)
class RotatedCredential:
    """A credential replaced during an incident, by name only."""

    kind: str
    name: str
    secrets_manager_id: str
    prefect_secret_block: str | None
    version: str
    reused: bool = False

    def describe(self) -> str:
        where = f"Secrets Manager {self.secrets_manager_id}"
        if self.prefect_secret_block:
            where += f" and Prefect Secret block {self.prefect_secret_block}"
        return f"{self.kind} {self.name} -> {where}" + (" (stored by an earlier run of this incident)" if self.reused else "")


def new_password() -> SecretStr:
    """A random password for a database role or an application secret (256 bits, URL-safe)."""
    return SecretStr(secrets.token_urlsafe(32))


def _save_block(name: str | None, value: SecretStr) -> None:
    if name:
        Secret(value=value).save(name, overwrite=True)


def _stored_for(store: SecretsManagerStore, secret_id: str, incident_id: str) -> bool:
    return store.exists(secret_id) and store.tags(secret_id).get(INCIDENT_TAG) == incident_id


@task(name="disable-role-login", **policy(timeout_seconds=60))
def disable_role_login(cluster: PostgresCluster, role: str) -> list[dict]:
    """Refuse new logins of ``role`` on the primary and end its sessions; returns each ended session's record."""
    ended = cluster.contain_role(role)
    get_run_logger().info("Role %s can no longer log in; %d session(s) ended", role, len(ended))
    return ended


@task(name="read-password-verifier-digest", **policy(timeout_seconds=60))
def read_password_verifier_digest(cluster: PostgresCluster, role: str) -> str | None:
    """A fingerprint of the role's stored password verifier (never the verifier itself)."""
    return cluster.password_verifier_digest(role)


@task(name="role-exists", **policy(timeout_seconds=60))
def role_exists(cluster: PostgresCluster, role: str) -> bool:
    """True when ``role`` exists on the primary."""
    return cluster.role_exists(role)


@task(name="read-role-state", **policy(timeout_seconds=60))
def read_role_state(cluster: PostgresCluster, role: str) -> tuple[bool, int]:
    """The role's LOGIN attribute and how many sessions it has open on the primary."""
    return cluster.role_can_login(role), cluster.role_sessions(role)


@task(name="secret-exists", **policy(timeout_seconds=60))
def secret_exists(store: SecretsManagerStore, secret_id: str) -> bool:
    """True when the Secrets Manager secret exists."""
    return store.exists(secret_id)


@task(name="replace-access-key", **policy(timeout_seconds=120))
def replace_access_key(iam: IamPrincipals, store: SecretsManagerStore, user: str, revoked: list[str],
                       secret_id: str, block_name: str | None, incident_id: str,
                       kept: list[str] | None = None) -> RotatedCredential:
    """Create a new access key for ``user`` and store it; an inactive revoked key makes room under IAM's limit.

    Args:
        revoked: the compromised keys of ``user`` (deactivated by containment).
        kept: keys ``user`` had before the response that were not compromised; they are left alone.
    """
    logger = get_run_logger()
    stored_id = None
    if _stored_for(store, secret_id, incident_id):
        stored_id = store.current_json(secret_id)["access_key_id"].get_secret_value()
        if any(k.access_key_id == stored_id and k.status == "Active" for k in iam.access_keys(user)):
            _save_block(block_name, store.current_value(secret_id))
            logger.info("Access key %s of %s was created by an earlier run of %s; kept", stored_id, user, incident_id)
            return RotatedCredential("aws-access-key", user, secret_id, block_name, stored_id, reused=True)
    known = set(revoked) | set(kept or []) | ({stored_id} if stored_id else set())
    for key in iam.access_keys(user):
        if key.access_key_id not in known:
            iam.deactivate_access_key(user, key.access_key_id)
            iam.delete_access_key(user, key.access_key_id)
            logger.warning("Deleted access key %s of %s: created by an interrupted attempt and never stored",
                           key.access_key_id, user)
    keys = iam.access_keys(user)
    if len(keys) >= 2:
        spare = [k.access_key_id for k in keys if k.status == "Inactive" and k.access_key_id in revoked]
        if not spare:
            raise AwsError(f"IAM user {user!r} already has two access keys and none of them is a revoked one; "
                           "delete one by hand before rotating")
        iam.delete_access_key(user, spare[0])
        logger.info("Deleted revoked access key %s of %s to make room for its replacement", spare[0], user)
    created = iam.create_access_key(user)
    value = SecretStr(json.dumps({"access_key_id": created.access_key_id,
                                  "secret_access_key": created.secret.get_secret_value()}))
    try:
        store.put_value(secret_id, value, tags={INCIDENT_TAG: incident_id, "dr:kind": "aws-access-key"})
    except BaseException:
        iam.deactivate_access_key(user, created.access_key_id)
        iam.delete_access_key(user, created.access_key_id)
        logger.warning("Storing the new access key %s of %s failed; the key was deleted", created.access_key_id, user)
        raise
    _save_block(block_name, value)
    logger.info("New access key %s of %s stored in %s", created.access_key_id, user, secret_id)
    return RotatedCredential("aws-access-key", user, secret_id, block_name, created.access_key_id)


@task(name="rotate-role-password", **policy(timeout_seconds=120))
def rotate_role_password(cluster: PostgresCluster, store: SecretsManagerStore, role: str, secret_id: str,
                         block_name: str | None, incident_id: str) -> RotatedCredential:
    """Give ``role`` a new password on the primary, stored first in Secrets Manager and the Secret block."""
    reused = _stored_for(store, secret_id, incident_id)
    if reused:
        password = store.current_value(secret_id)
        version = "existing"
    else:
        password = new_password()
        version = store.put_value(secret_id, password, tags={INCIDENT_TAG: incident_id, "dr:kind": "postgres-role"})
    _save_block(block_name, password)
    cluster.set_password(role, password)
    get_run_logger().info("Password of role %s changed; stored in %s", role, secret_id)
    return RotatedCredential("postgres-role", role, secret_id, block_name, version, reused)


@task(name="rotate-secret", **policy(timeout_seconds=60))
def rotate_secret(store: SecretsManagerStore, secret_id: str, block_name: str | None, incident_id: str) -> RotatedCredential:
    """A new random value for an application secret, in Secrets Manager and its Secret block."""
    if _stored_for(store, secret_id, incident_id):
        _save_block(block_name, store.current_value(secret_id))
        return RotatedCredential("secret", secret_id, secret_id, block_name, "existing", reused=True)
    value = new_password()
    version = store.put_value(secret_id, value, tags={INCIDENT_TAG: incident_id})
    _save_block(block_name, value)
    get_run_logger().info("Secret %s rotated (version %s)", secret_id, version)
    return RotatedCredential("secret", secret_id, secret_id, block_name, version)


@task(name="apply-role-credentials", **policy(timeout_seconds=120))
def apply_role_credentials(cluster: PostgresCluster, store: SecretsManagerStore, role: str, secret_id: str,
                           allow_login: bool, port: int | None = None) -> None:
    """Give ``role`` on the instance at ``port`` its stored new password and the wanted login state."""
    if not cluster.role_exists(role, port):
        get_run_logger().info("Role %s does not exist on port %s; nothing to apply", role, port)
        return
    cluster.set_password(role, store.current_value(secret_id), port)
    if allow_login:
        cluster.enable_login(role, port)
    else:
        cluster.disable_login(role, port)


@task(name="check-role-credentials", **policy(timeout_seconds=60))
def check_role_credentials(cluster: PostgresCluster, store: SecretsManagerStore, role: str, secret_id: str,
                           contained_verifier_digest: str | None, expect_login: bool) -> list[CheckResult]:
    """The role's verifier changed since containment and is the stored new password's, so any other password
    (the old one included) is refused; and the new password logs in (or, with logins disabled, nothing does)."""
    digest = cluster.password_verifier_digest(role)
    password = store.current_value(secret_id)
    changed = digest is not None and digest != contained_verifier_digest
    matches = cluster.password_matches(role, password)
    results = [CheckResult(f"password verifier replaced by the stored new password: {role}", changed and matches,
                           f"verifier {contained_verifier_digest or 'none'} at containment -> {digest or 'none'} now; "
                           f"it {'is' if matches else 'is NOT'} the verifier of the password in {secret_id}")]
    works = cluster.can_login(role, password)
    if expect_login:
        results.append(CheckResult(f"new password works: {role}", works,
                                   f"login with the password in {secret_id}: {'accepted' if works else 'refused'}"))
    else:
        results.append(CheckResult(f"logins disabled: {role}", not works and not cluster.role_can_login(role),
                                   f"login with the password in {secret_id}: {'accepted' if works else 'refused'}"))
    return results


@task(name="check-only-stored-key-active", **policy(timeout_seconds=60))
def check_only_stored_key_active(iam: IamPrincipals, store: SecretsManagerStore, user: str, secret_id: str,
                                 kept: list[str]) -> CheckResult:
    """The only Active keys of ``user`` are the stored new one and keys it had before that were not compromised."""
    stored = store.current_json(secret_id)["access_key_id"].get_secret_value()
    active = [k.access_key_id for k in iam.access_keys(user) if k.status == "Active"]
    stray = [k for k in active if k != stored and k not in kept]
    return CheckResult(f"only the stored key is active: {user}", stored in active and not stray,
                       f"active keys {active}; stored {stored}; kept uncompromised {kept or 'none'}; "
                       f"unaccounted {stray or 'none'}")


@task(name="check-access-key-replaced", **policy(timeout_seconds=60))
def check_access_key_replaced(iam: IamPrincipals, store: SecretsManagerStore, user: str, secret_id: str) -> CheckResult:
    """The stored new key is Active for ``user`` and AWS attributes a call made with it to ``user``."""
    stored = store.current_json(secret_id)
    key_id = stored["access_key_id"].get_secret_value()
    active = any(k.access_key_id == key_id and k.status == "Active" for k in iam.access_keys(user))
    arn = iam.caller_arn(key_id, stored["secret_access_key"]) if active else "-"
    ok = active and arn.endswith(f"/{user}")
    return CheckResult(f"new access key works: {user}", ok, f"{key_id} active={active}; caller {arn}")


@task(name="check-secret-rotated", **policy(timeout_seconds=60))
def check_secret_rotated(store: SecretsManagerStore, secret_id: str, block_name: str | None, version: str,
                         incident_id: str) -> CheckResult:
    """Secrets Manager's current value was rotated for ``incident_id``, and the Secret block holds the same value."""
    current = store.current_value(secret_id)
    same = True
    if block_name:
        held = Secret.load(block_name).value.get_secret_value()
        held = held if isinstance(held, str) else json.dumps(held)
        same = hmac.compare_digest(held.encode(), current.get_secret_value().encode())
    tag = store.tags(secret_id).get(INCIDENT_TAG)
    tagged = tag == incident_id
    where = f"Secrets Manager {secret_id} (version {version})" + (f" and block {block_name}" if block_name else "")
    return CheckResult(f"secret rotated: {secret_id}", same and tagged,
                       f"{where}: {'identical' if same else 'DIFFERENT'} values; rotation tag {tag or 'missing'} "
                       f"({'this incident' if tagged else 'NOT ' + incident_id})")
