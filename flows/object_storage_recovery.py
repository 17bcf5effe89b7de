"""Object storage loss: check the replica, fail over to it, or restore a prefix to a point in time.

Runbook (continuity plans: "File Storage (MinIO)", "File Storage Backups"; RPO 15 min by replication):
  verify-replica
    1. both buckets exist; compare every key of the prefix: missing and stale (size, etag) objects
  failover
    1. the replica exists; measure what it lacks (the data-loss window)
    2. a named approver approves, seeing what the replica lacks
    3. point the secret applications read at the secondary endpoint; rollout restart the applications
    4. wait for the rollouts, read sampled objects back from the replica
  restore-prefix
    1. refuse what cannot be restored (empty prefix, no time zone, future time, unknown bucket,
       no versioning, no objects, a time before the versioning history begins)
    2. plan: per key, current version -> its version at T (deleted keys undeleted, later versions
       superseded, keys created after T hidden behind a delete marker); a dry run stops here
    3. a named approver approves the plan
    4. apply it concurrently (bounded); every change is a new version, nothing is deleted
    5. re-plan (nothing may be left to change) and read restored objects back
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from prefect.states import State
from pydantic import SecretStr

from blocks import CheckResult
from blocks.errors import InvalidInput
from blocks.loading import load_block
from blocks.object_store import ObjectStore, ObjectStoreError
from runbook.evidence import StepRecord, utcnow
from runbook.object_storage import (
    Applications,
    failover_preview,
    listed,
    record_comparison,
    restore_preview,
    sample_keys,
)
from runbook.parameters import recovery_flow
from runbook.run import Approval, ApprovalPolicy, Recovery, refuse_future, require_aware
from tasks.kubernetes import annotate_deployment, restart_rollout, set_app_secret, wait_for_rollout
from tasks.object_store import (
    apply_prefix_restore,
    compare_replica,
    deployment_annotated,
    list_bucket,
    plan_prefix_restore,
    require_bucket,
    secret_keys_to_set,
    verify_readable,
)

SCENARIO = "object-storage"
Mode = Literal["verify-replica", "failover", "restore-prefix"]
MODES = ("verify-replica", "failover", "restore-prefix")
FAILOVER_ANNOTATION = "dr.recovery/object-storage-endpoint"


@recovery_flow(name="object-storage-recovery",
      description="Check the replica of a bucket, fail over to it, or restore a prefix to its versions as of a time.")
def object_storage_recovery(
    store_block: str,
    mode: Mode,
    incident_detected_at: datetime,
    prefix: str = "",
    restore_as_of: datetime | None = None,
    kube_block: str | None = None,
    secret_name: str | None = None,
    secret_key: str = "endpoint",
    bucket_key: str | None = "bucket",
    restart_deployments: list[str] | None = None,
    rollout_timeout_seconds: float = 600,
    verify_sample: int = 20,
    max_workers: int | None = None,
    approval_policy: ApprovalPolicy = "required",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 3600,
    approval_poll_seconds: float = 5,
    severity: str | None = None,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "object-storage",
    lock_wait_seconds: int = 30,
) -> State:
    """Recover object storage: check the replica, fail over to it, or restore a prefix as of a time.

    Args:
        store_block: name of the ObjectStore block (primary bucket and its replica).
        mode: 'verify-replica', 'failover' or 'restore-prefix'.
        incident_detected_at: when the loss was detected (tz-aware); RTO and data loss count from it.
        prefix: the key prefix to check or restore (required for restore-prefix; '' checks a whole bucket).
        restore_as_of: restore-prefix: the time (with a UTC offset) whose versions come back.
        kube_block: failover: the KubernetesTarget block of the applications.
        secret_name: failover: the Secret the applications read the object-storage endpoint from.
        secret_key: failover: the key of that Secret holding the endpoint.
        bucket_key: failover: the key of that Secret holding the bucket name (empty: not changed).
        restart_deployments: failover: Deployments to restart so they read the new endpoint.
        rollout_timeout_seconds: failover: longest wait for each restarted Deployment to be ready.
        verify_sample: how many objects to read back after a failover or restore.
        max_workers: most object operations in flight (default: the block's).
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the failover or the restore.
        approval_timeout_seconds: how long to wait for approval before giving up without changing anything.
        approval_poll_seconds: how often a paused run checks for an answer.
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record every change the run would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same store to finish.
    """
    run = Recovery(
        SCENARIO, target=store_block, severity=severity, detected_at=incident_detected_at,
        recovery_target=(f"{prefix} as of {restore_as_of.isoformat()}" if mode == "restore-prefix" and restore_as_of
                         else f"{mode} {prefix}".strip()),
        # verify-replica only reads: it asks nobody, and its approval settings are not checked
        approval=None if mode == "verify-replica" else Approval.of(
            approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
    )
    if mode == "verify-replica":
        run.report.facts["run_kind"] = "assurance"  # a scheduled check, not a recovery: KPIs do not count it
    with run:
        # Preflight: refuse what cannot be done, before anything changes.
        with run.preflight() as step:
            if mode not in MODES:
                raise InvalidInput(f"mode {mode!r} is not 'verify-replica', 'failover' or 'restore-prefix'")
            if verify_sample < 1:
                raise InvalidInput(f"verify_sample {verify_sample} must be at least 1")
            if max_workers is not None and not 1 <= max_workers <= 256:
                raise InvalidInput(f"max_workers {max_workers} must be between 1 and 256")
            store = load_block(ObjectStore, store_block)
            run.refuse_unsafe_policy(store_block, store.environment)
            if mode == "restore-prefix":
                _check_restore_inputs(run, store, prefix, restore_as_of)
            elif mode == "verify-replica":
                require_bucket(store, "primary")
                require_bucket(store, "secondary")
            else:  # the primary may well be down: that is why applications fail over
                require_bucket(store, "secondary")
                apps = Applications.to_fail_over(store, kube_block, secret_name, secret_key, bucket_key,
                                                 restart_deployments, rollout_timeout_seconds)
            run.assign_incident(None, f"{store_block}-{mode}", prefix, restore_as_of or "")
            step.detail = f"{mode} of {store.bucket_name} {prefix!r} with {store.client}; incident {run.incident_id}"

        if mode == "verify-replica":  # read-only: it never holds up a recovery of the same store
            return _verify_replica(run, store, prefix)
        with run.locks(store_block, wait_seconds=lock_wait_seconds):
            if mode == "restore-prefix":
                return _restore_prefix(run, store, prefix, restore_as_of, max_workers, verify_sample)
            return _failover(run, store, apps, prefix, verify_sample)


def _check_restore_inputs(run: Recovery, store: ObjectStore, prefix: str, as_of: datetime | None) -> None:
    """restore-prefix 1: a prefix, an aware time before the detection, a versioned bucket."""
    if not prefix or not prefix.strip():
        raise InvalidInput("restore prefix is empty; name the prefix to restore (e.g. 'uploads/')")
    if as_of is None:
        raise InvalidInput("restore_as_of is required for mode 'restore-prefix'")
    require_aware("restore_as_of", as_of)
    refuse_future("restore_as_of", as_of, run.started_at)
    if as_of > run.detected_at:
        raise InvalidInput(f"restore_as_of {as_of.isoformat()} is after the incident was detected "
                           f"({run.detected_at.isoformat()})")
    require_bucket(store, "primary", versioned=True)


def _verify_replica(run: Recovery, store: ObjectStore, prefix: str) -> State:
    """verify-replica 1: compare every key of the prefix; missing and stale objects."""
    with run.step("Compare the replica with the primary") as step:
        comparison = compare_replica(store, prefix)
        record_comparison(run, comparison)
        step.detail = comparison.summary()
        step.outcome = "ok" if comparison.complete else "incomplete"
    if not comparison.complete:
        return run.finish(
            "ReplicaIncomplete", f"The replica is incomplete: {comparison.summary()}. A failover now would lose "
            f"{run.report.rpo_seconds:.0f} s of writes.",
            action_items=[f"check replication from {comparison.primary_bucket} to {comparison.replica_bucket}"])
    return run.finish("ReplicaComplete", f"The replica is complete: {comparison.summary()}.")


def _restore_prefix(run: Recovery, store: ObjectStore, prefix: str, as_of: datetime, max_workers: int | None,
                    verify_sample: int) -> State:
    report = run.report
    # 2. Plan: per key, the current version -> its version at T; a dry run stops here.
    with run.step("Plan the restore") as step:
        plan = plan_prefix_restore(store, prefix, as_of)
        counts = plan.counts()
        report.plan = [change.describe() for change in plan.changes]
        report.facts["Keys examined"] = plan.keys_examined
        report.facts["Changes"] = ", ".join(f"{n} {action}" for action, n in counts.items())
        report.facts["Versioning history begins"] = plan.history_starts.isoformat()
        report.recoverable_window = {"earliest": plan.history_starts.isoformat(), "latest": run.started_at.isoformat()}
        step.detail = f"{len(plan.changes)} changes over {plan.keys_examined} keys: {counts}"
    report.rpo_seconds = max(0.0, (run.detected_at - as_of).total_seconds())
    if run.dry_run:
        return run.planned(report.plan, f"Dry run: {len(plan.changes)} changes were recorded and nothing was changed.")

    if plan.changes:
        # 3. A named approver approves the plan.
        decision = run.approve(restore_preview(run, plan))
        if decision is None or not decision.approved:
            return run.declined(decision, "The restore")
        # 4. Apply it concurrently (bounded); every change is a new version, nothing is deleted.
        with run.step("Apply the restore") as step:
            result = apply_prefix_restore(store, plan, max_workers)
            report.facts["Applied"] = (f"{result.applied} changes in {result.seconds} s, at most "
                                       f"{result.peak_in_flight} of {result.max_workers} workers in flight")
            if result.failed:
                report.facts["Failed changes"] = listed([f"{k}: {e}" for k, e in result.failed])
                step.outcome = "failed"
            step.detail = f"{result.applied} applied, {len(result.failed)} failed"

    # 5. Re-plan (nothing may be left to change) and read restored objects back.
    with run.step("Verify the prefix matches its state at T") as step:
        remaining = plan_prefix_restore(store, prefix, as_of)
        restored = [c for c in plan.changes if c.action != "hide"]
        sample = sample_keys([c.key for c in restored], verify_sample, run.incident_id)
        targets = {c.key: (None, c.target_etag) for c in restored}
        readable = verify_readable(store, sample, "primary", {k: targets[k] for k in sample}) if sample else None
        report.add_checks("restored", [
            CheckResult("prefix matches its state at T", not remaining.changes,
                        f"{len(remaining.changes)} keys still differ" + (
                            f", e.g. {remaining.changes[0].describe()}" if remaining.changes else "")),
            CheckResult("restored objects readable", readable is None or readable.passed,
                        "no object to read back" if readable is None else
                        f"{readable.checked - len(readable.unreadable)} of {readable.checked} sampled objects read "
                        f"back with their version's etag" + (f"; {readable.unreadable[:3]}" if readable.unreadable else "")),
        ])
        step.outcome = "ok" if not report.failed_critical("restored") else "failed"
        step.detail = f"{len(remaining.changes)} keys still differ; {len(sample)} objects read back"
    if report.failed_critical():
        return run.finish("VerificationFailed", f"The restore of {prefix!r} did not complete: see Verification "
                          "Results. Re-running the flow with the same time applies only what is still different.")
    run.mark_restored()
    return run.finish("Recovered", f"Prefix {prefix!r} of {plan.bucket} is back to its state at {as_of.isoformat()}: "
                      f"{counts['restore']} restored, {counts['undelete']} undeleted, {counts['hide']} hidden; "
                      "every earlier version is kept.")


def _failover(run: Recovery, store: ObjectStore, apps: Applications, prefix: str, verify_sample: int) -> State:
    report, kube = run.report, apps.kube
    endpoint, replica_bucket = store.replica_endpoint, store.secondary_bucket_name
    # failover 1. Measure what the replica lacks (the data-loss window).
    with run.step("Measure what the replica lacks") as step:
        try:
            comparison = compare_replica.with_options(retries=0)(store, prefix)
        except ObjectStoreError as exc:  # the primary is often unreachable: that is why we fail over
            report.facts["Replica"] = f"not compared: the primary could not be listed ({exc})"
            report.action_items.append("compare the replica with the primary once the primary is back, and copy "
                                       "what it lacks")
            step.outcome, step.detail = "primary unreachable", str(exc)
        else:
            record_comparison(run, comparison)
            step.detail = comparison.summary()

    wanted = {apps.secret_key: endpoint} | ({apps.bucket_key: replica_bucket} if apps.bucket_key and replica_bucket else {})
    with run.step("Read the applications' current endpoint") as step:
        to_set = secret_keys_to_set(kube, apps.secret_name, wanted)
        pointing = not to_set
        pending = [d for d in apps.deployments if not deployment_annotated(kube, d, FAILOVER_ANNOTATION, endpoint)]
        step.detail = (f"secret {apps.secret}: "
                       f"{'every key already holds the replica' if pointing else 'keys ' + ', '.join(to_set) + ' to set'}; "
                       f"{len(pending)} of {len(apps.deployments)} deployments to restart")

    current = {apps.secret_key: "current endpoint", apps.bucket_key: "current bucket"}
    plan = [f"secret {apps.secret} key {key}: {current[key]} -> {wanted[key]}" for key in to_set]
    plan += [f"rollout restart deployment {kube.namespace}/{d} (annotate {FAILOVER_ANNOTATION}={endpoint})"
             for d in pending]
    plan += [f"wait at most {apps.rollout_timeout:g} s for deployment {kube.namespace}/{d} to be ready"
             for d in apps.deployments]
    plan.append(f"read {verify_sample} objects under {prefix!r} back from {replica_bucket} at {endpoint}")
    if run.dry_run and (len(to_set) < len(wanted) or len(pending) < len(apps.deployments)):
        plan.insert(0, f"failover partly done already: {len(wanted) - len(to_set)} of {len(wanted)} keys of secret "
                       f"{apps.secret} hold the replica, {len(apps.deployments) - len(pending)} of "
                       f"{len(apps.deployments)} deployments were restarted for it; a real run would redo none of it "
                       "and finish the steps below")
    if run.dry_run:
        return run.planned(plan, "Dry run: the failover plan was recorded and nothing was changed.")
    report.plan = plan

    # failover 2. A named approver approves, seeing what the replica lacks.
    if not pointing or pending:
        decision = run.approve(failover_preview(run, apps, endpoint, replica_bucket, plan))
        if decision is None or not decision.approved:
            return run.declined(decision, "The failover")
    # failover 3. Point the Secret applications read at the replica; rollout restart the applications.
    if not pointing:
        with run.step("Point the applications' secret at the replica") as step:
            for key in to_set:
                set_app_secret(kube, apps.secret_name, key, SecretStr(wanted[key]))
            step.detail = f"{apps.secret}: {', '.join(to_set)}"
    else:
        report.steps.append(StepRecord(step="Point the applications' secret at the replica", start=utcnow(),
                                       end=utcnow(), outcome="already done", detail="done by an earlier run"))
    for name in pending:
        with run.step(f"Restart {name}") as step:
            stamp = restart_rollout(kube, name)
            annotate_deployment(kube, name, {FAILOVER_ANNOTATION: endpoint})
            step.detail = f"restartedAt {stamp}"

    # failover 4. Wait for the rollouts, read sampled objects back from the replica.
    statuses = []
    for name in apps.deployments:
        with run.step(f"Wait for {name}") as step:
            statuses.append(wait_for_rollout(kube, name, apps.rollout_timeout))
            step.detail = statuses[-1].message
    with run.step("Read objects back from the replica") as step:
        objects = sorted(list_bucket(store, prefix, "secondary").items())
        sample = sample_keys([k for k, _ in objects], verify_sample, run.incident_id)
        expected = {k: (v.size, v.etag) for k, v in objects if k in set(sample)}
        readable = verify_readable(store, sample, "secondary", expected) if sample else None
        step.detail = "no object under the prefix" if readable is None else \
            f"{readable.checked - len(readable.unreadable)} of {readable.checked} read back"
    report.add_checks("endpoint", [
        CheckResult("applications rolled out", all(s.complete for s in statuses),
                    "; ".join(s.message for s in statuses) or "no deployment named"),
        CheckResult("replica objects readable", readable is not None and readable.passed,
                    "no object to read under the prefix" if readable is None else
                    f"{readable.checked - len(readable.unreadable)} of {readable.checked} sampled objects from "
                    f"{replica_bucket}" + (f"; {readable.unreadable[:3]}" if readable.unreadable else "")),
    ])
    if report.failed_critical():
        return run.finish("PostCheckFailed", "The applications point at the replica but post-checks failed; see "
                          "Verification Results.")
    run.mark_restored()
    report.promotion = {"endpoint": endpoint, "data_directory": replica_bucket, "old_primary_aside": store.bucket_name,
                        "already_promoted": bool(pointing and not pending),
                        "promoted_at": report.service_restored_at.isoformat()}
    return run.finish("FailedOver", f"Applications in {kube.namespace} read objects from {replica_bucket} at "
                      f"{endpoint}; the primary {store.bucket_name} is left as it was.",
                      action_items=[f"fail back to {store.bucket_name} once it is healthy and resynchronised"])
