"""Tasks over an ObjectStore: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from prefect import get_run_logger, task

from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.object_store import ObjectStore, ReadCheck, ReplicaComparison, RestorePlan, RestoreResult
from tasks._policy import policy


@task(name="require-bucket", **policy(timeout_seconds=60))
def require_bucket(store: ObjectStore, which: Literal["primary", "secondary"] = "primary", versioned: bool = False) -> None:
    """Refuse a bucket that does not exist, or (``versioned``) whose versioning is not enabled."""
    store.require_bucket(which, versioned)


@task(name="compare-replica", **policy(timeout_seconds=1800))
def compare_replica(store: ObjectStore, prefix: str = "") -> ReplicaComparison:
    """Compare the replica with the primary under ``prefix``: missing and stale keys."""
    comparison = store.compare_replica(prefix)
    get_run_logger().info("Replica check: %s", comparison.summary())
    return comparison


@task(name="plan-prefix-restore", **policy(timeout_seconds=1800))
def plan_prefix_restore(store: ObjectStore, prefix: str, as_of: datetime) -> RestorePlan:
    """Every change that returns ``prefix`` to its state at ``as_of``."""
    plan = store.plan_restore(prefix, as_of)
    get_run_logger().info("Restore of %s as of %s: %s over %d keys", prefix, as_of.isoformat(), plan.counts(),
                          plan.keys_examined)
    return plan


@task(name="apply-prefix-restore", **policy(timeout_seconds=3600, retries=0))
def apply_prefix_restore(store: ObjectStore, plan: RestorePlan, max_workers: int | None = None) -> RestoreResult:
    """Apply a restore plan concurrently (bounded); every change adds a version, nothing is deleted."""
    result = store.apply_restore(plan, max_workers)
    get_run_logger().info("Applied %d changes (%d failed) in %.1f s, at most %d in flight", result.applied,
                          len(result.failed), result.seconds, result.peak_in_flight)
    return result


@task(name="verify-readable", **policy(timeout_seconds=900))
def verify_readable(store: ObjectStore, keys: list[str], which: Literal["primary", "secondary"] = "primary",
                    expected: dict[str, tuple[int | None, str | None]] | None = None) -> ReadCheck:
    """Read ``keys`` back in full from ``which`` bucket and compare sizes and etags."""
    return store.verify_readable(keys, which, expected)


@task(name="list-bucket", **policy(timeout_seconds=900))
def list_bucket(store: ObjectStore, prefix: str, which: Literal["primary", "secondary"] = "primary") -> dict:
    """The current objects under ``prefix`` of ``which`` bucket (key -> size, etag, last modified)."""
    return store.list_objects(prefix, which)


@task(name="secret-keys-to-set", **policy(timeout_seconds=60))
def secret_keys_to_set(target: KubernetesTarget, secret: str, wanted: dict[str, str]) -> list[str]:
    """The keys of Secret ``secret`` that do not yet hold their value in ``wanted`` (absent keys included).

    Values are compared, never returned or logged.
    """
    differ = []
    for key, value in wanted.items():
        try:
            current = target.read_secret_value(secret, key).get_secret_value()
        except InvalidInput:
            current = None
        if current != value:
            differ.append(key)
    return differ


@task(name="find-missing-deployments", **policy(timeout_seconds=60))
def find_missing_deployments(target: KubernetesTarget, deployments: list[str]) -> list[str]:
    """The names in ``deployments`` that do not exist in the target's namespace."""
    return [d for d in deployments if not target.deployment_exists(d)]


@task(name="deployment-annotated", **policy(timeout_seconds=60))
def deployment_annotated(target: KubernetesTarget, deployment: str, annotation: str, value: str) -> bool:
    """Whether Deployment ``deployment`` carries ``annotation`` = ``value`` (set when a failover restarted it)."""
    annotations = (target.get_deployment(deployment).get("metadata") or {}).get("annotations") or {}
    return annotations.get(annotation) == value
