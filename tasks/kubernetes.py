"""Tasks over a KubernetesTarget: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.kubernetes import KubernetesTarget, Replicas, Revision, RollbackPlan, RolloutStatus, ScaleResult
from tasks._policy import policy


@task(name="read-replicas", **policy(timeout_seconds=60))
def read_replicas(target: KubernetesTarget, deployment: str) -> Replicas:
    """Desired and observed replica counts of a deployment."""
    return target.get_replicas(deployment)


@task(name="scale-deployment", **policy(timeout_seconds=120))
def scale_deployment(target: KubernetesTarget, deployment: str, replicas: int) -> ScaleResult:
    """Set a deployment's replica count (idempotent)."""
    result = target.scale(deployment, replicas)
    get_run_logger().info("Scaled %s/%s: %d -> %d%s", target.namespace, deployment, result.previous, result.replicas,
                          "" if result.changed else " (already there)")
    return result


@task(name="scale-declared-deployments", **policy(timeout_seconds=300))
def scale_declared_deployments(target: KubernetesTarget, factor: float = 1.0) -> list[ScaleResult]:
    """Scale every deployment the target declares to its declared count (times ``factor``)."""
    return target.scale_to_declared(factor)


@task(name="restart-rollout", **policy(timeout_seconds=120))
def restart_rollout(target: KubernetesTarget, deployment: str) -> str:
    """Restart a deployment's pods (``kubectl rollout restart``); returns the restartedAt stamp."""
    return target.rollout_restart(deployment)


@task(name="read-rollout-history", **policy(timeout_seconds=60))
def read_rollout_history(target: KubernetesTarget, deployment: str) -> list[Revision]:
    """A deployment's revisions, oldest first (``kubectl rollout history``)."""
    return target.rollout_history(deployment)


@task(name="plan-rollback", **policy(timeout_seconds=60))
def plan_rollback(target: KubernetesTarget, deployment: str, to_revision: int | None = None) -> RollbackPlan:
    """Work out a rollback (revision and images, from -> to) without changing anything."""
    return target.plan_rollback(deployment, to_revision)


@task(name="undo-rollout", **policy(timeout_seconds=120))
def undo_rollout(target: KubernetesTarget, deployment: str, to_revision: int | None = None,
                 replicaset: str | None = None, annotations: dict[str, str] | None = None) -> RollbackPlan:
    """Roll a deployment back to a revision (default: the previous one) or ReplicaSet, as ``kubectl rollout undo``.

    ``annotations`` are set in the same patch. Naming the target by ``replicaset`` makes a retry
    after the patch landed a no-op (the revision number changes with the rollback, the name does not).
    """
    plan = target.rollout_undo(deployment, to_revision, replicaset, annotations)
    get_run_logger().info("Rollback %s", plan.describe() if not plan.noop else f"of {deployment}: already at that revision")
    return plan


@task(name="read-rollout-status", **policy(timeout_seconds=60))
def read_rollout_status(target: KubernetesTarget, deployment: str) -> RolloutStatus:
    """A deployment's rollout state now (``kubectl rollout status`` without waiting)."""
    return target.rollout_status(deployment)


@task(name="wait-for-rollout", **policy(timeout_seconds=3600, retries=0))
def wait_for_rollout(target: KubernetesTarget, deployment: str, timeout_seconds: float | None = None) -> RolloutStatus:
    """Wait (bounded) until a deployment is fully rolled out and ready."""
    return target.wait_ready(deployment, timeout_seconds)


@task(name="list-pods", **policy(timeout_seconds=60))
def list_pods(target: KubernetesTarget, selector: dict[str, str] | str | None = None) -> list[dict]:
    """Pods matching a label selector: name, phase, ready, labels, images."""
    return target.list_pods(selector)


@task(name="list-deployment-pods", **policy(timeout_seconds=60))
def list_deployment_pods(target: KubernetesTarget, deployment: str) -> list[dict]:
    """The pods a deployment selects (``kubectl get pods -l ...``)."""
    return target.deployment_pods(deployment)


@task(name="stop-training-jobs", **policy(timeout_seconds=300))
def stop_training_jobs(target: KubernetesTarget, label_selector: dict[str, str] | str, delete: bool = False) -> list[dict]:
    """Suspend (or delete) every Job matching the selector; returns what was done per job."""
    done = []
    for job in target.list_jobs(label_selector):
        if delete:
            changed = target.delete_job(job["name"])
            done.append({"job": job["name"], "action": "deleted" if changed else "already gone"})
        else:
            changed = target.suspend_job(job["name"])
            done.append({"job": job["name"], "action": "suspended" if changed else "already suspended"})
    get_run_logger().info("Stopped %d jobs matching %s in %s", len(done), label_selector, target.namespace)
    return done


@task(name="isolate-workloads", **policy(timeout_seconds=120))
def isolate_workloads(target: KubernetesTarget, policy_name: str, pod_selector: dict[str, str] | None = None) -> dict:
    """Apply a deny-all NetworkPolicy to the selected pods (all pods of the namespace when empty)."""
    return target.apply_deny_all(policy_name, pod_selector)


@task(name="read-network-policy", **policy(timeout_seconds=60))
def read_network_policy(target: KubernetesTarget, policy_name: str) -> dict | None:
    """A NetworkPolicy, or None when absent."""
    return target.get_network_policy(policy_name)


@task(name="dump-workloads", **policy(timeout_seconds=300))
def dump_workloads(target: KubernetesTarget, kinds: list[str], selector: dict[str, str] | str | None = None) -> list[dict]:
    """Every object of the given kinds matching the selector, for forensic evidence (secret values redacted)."""
    return target.dump_objects(kinds, selector)


@task(name="list-secret-keys", **policy(timeout_seconds=60))
def list_secret_keys(target: KubernetesTarget, secret: str) -> list[str]:
    """The data keys of a Secret (never its values)."""
    return target.read_secret_keys(secret)


@task(name="set-app-secret", **policy(timeout_seconds=60))
def set_app_secret(target: KubernetesTarget, secret: str, key: str, value) -> bool:
    """Set one key of an application Secret (value given as SecretStr; never logged)."""
    created = target.set_secret_value(secret, key, value)
    get_run_logger().info("%s key %r of secret %s/%s", "Created" if created else "Updated", key, target.namespace, secret)
    return created


@task(name="read-app-config", **policy(timeout_seconds=60))
def read_app_config(target: KubernetesTarget, config_map: str) -> dict[str, str]:
    """The data of a ConfigMap."""
    return target.read_config(config_map)


@task(name="set-app-config", **policy(timeout_seconds=60))
def set_app_config(target: KubernetesTarget, config_map: str, key: str, value: str) -> str | None:
    """Set one key of a ConfigMap; returns the previous value."""
    return target.set_config(config_map, key, value)


@task(name="annotate-deployment", **policy(timeout_seconds=60))
def annotate_deployment(target: KubernetesTarget, deployment: str, annotations: dict[str, str | None]) -> dict:
    """Set annotations on a deployment (not on its pod template: no new rollout)."""
    return target.annotate_deployment(deployment, annotations)


@task(name="read-deployment", **policy(timeout_seconds=60))
def read_deployment(target: KubernetesTarget, deployment: str) -> dict:
    """The deployment object; a missing one is refused (InvalidInput) naming it."""
    return target.get_deployment(deployment)
