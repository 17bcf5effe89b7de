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

import hashlib
import random
from datetime import datetime, timezone
from typing import Literal

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State
from pydantic import SecretStr

from blocks import CheckResult, RecoveryObjectives
from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.object_store import ObjectStore, ObjectStoreError, ReplicaComparison, RestorePlan
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalPolicy, approval_step, check_approval_settings
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, StepRecord, publish_evidence, utcnow
from tasks.kubernetes import annotate_deployment, restart_rollout, set_app_secret, wait_for_rollout
from runbook.locks import recovery_lock
from tasks.object_store import (
    apply_prefix_restore,
    compare_replica,
    deployment_annotated,
    find_missing_deployments,
    list_bucket,
    plan_prefix_restore,
    require_bucket,
    secret_keys_to_set,
    verify_readable,
)

SCENARIO = "object-storage"
Mode = Literal["verify-replica", "failover", "restore-prefix"]
FAILOVER_ANNOTATION = "dr.recovery/object-storage-endpoint"
LISTED = 50  # keys listed by name in the report's facts; the counts are always complete


def _incident_key(store_block: str, mode: str, detected: datetime, detail: str) -> str:
    digest = hashlib.sha256(f"{store_block}|{mode}|{detail}|{detected.isoformat()}".encode()).hexdigest()[:6]
    return f"{store_block}-{mode}-{detected.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{digest}"


def _listed(items: list[str]) -> list[str]:
    return items[:LISTED] + ([f"... and {len(items) - LISTED} more"] if len(items) > LISTED else [])


def _require_aware(name: str, moment: datetime | None, now: datetime) -> None:
    if moment is None:
        return
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidInput(f"{name} {moment.isoformat()} has no time zone; give it with a UTC offset")
    if moment > now:
        raise InvalidInput(f"{name} {moment.isoformat()} is in the future (now {now.isoformat()})")


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
        dry_run: record every change the run would make and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same store to finish.
    """
    approvers = list(allowed_approvers or [])
    kube: KubernetesTarget | None = None
    started = utcnow()
    report = RecoveryReport(
        scenario=SCENARIO, incident_id="unassigned", target=store_block, severity="P2",
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None, drill=drill, dry_run=dry_run,
        incident_detected_at=incident_detected_at, started_at=started,
        recovery_target=(f"{prefix} as of {restore_as_of.isoformat()}" if mode == "restore-prefix" and restore_as_of
                         else f"{mode} {prefix}".strip()),
        rto_objective_seconds=0, rpo_objective_seconds=0,
    )
    if mode == "verify-replica":
        report.facts["run_kind"] = "assurance"  # a scheduled check, not a recovery: KPIs do not count it
    try:
        with report.step("Preflight: validate inputs") as step:
            check_parameters()
            if mode not in ("verify-replica", "failover", "restore-prefix"):
                raise InvalidInput(f"mode {mode!r} is not 'verify-replica', 'failover' or 'restore-prefix'")
            _require_aware("incident_detected_at", incident_detected_at, started)
            if mode != "verify-replica":
                check_approval_settings(approval_policy, approvers, approval_timeout_seconds, drill)
            if verify_sample < 1:
                raise InvalidInput(f"verify_sample {verify_sample} must be at least 1")
            if max_workers is not None and not 1 <= max_workers <= 256:
                raise InvalidInput(f"max_workers {max_workers} must be between 1 and 256")
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            store = load_block(ObjectStore, store_block)
            if approval_policy == "auto" and mode != "verify-replica" and store.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused for {store_block!r}: its environment is production")
            if mode == "restore-prefix":
                if not prefix or not prefix.strip():
                    raise InvalidInput("restore prefix is empty; name the prefix to restore (e.g. 'uploads/')")
                if restore_as_of is None:
                    raise InvalidInput("restore_as_of is required for mode 'restore-prefix'")
                _require_aware("restore_as_of", restore_as_of, started)
                if restore_as_of > incident_detected_at:
                    raise InvalidInput(f"restore_as_of {restore_as_of.isoformat()} is after the incident was "
                                       f"detected ({incident_detected_at.isoformat()})")
                require_bucket(store, "primary", versioned=True)
            elif mode == "verify-replica":
                require_bucket(store, "primary")
                require_bucket(store, "secondary")
            else:  # the primary may well be down: that is why applications fail over
                require_bucket(store, "secondary")
                if rollout_timeout_seconds <= 0:
                    raise InvalidInput(f"rollout_timeout_seconds {rollout_timeout_seconds} must be positive")
            if mode == "failover":
                kube = _failover_target(kube_block, secret_name, secret_key, list(restart_deployments or []), store)
            report.incident_id = _incident_key(store_block, mode, incident_detected_at,
                                               f"{prefix}|{restore_as_of.isoformat() if restore_as_of else ''}")
            step.detail = f"{mode} of {store.bucket_name} {prefix!r} with {store.client}; incident {report.incident_id}"

        if mode == "verify-replica":  # read-only: it never holds up a recovery of the same store
            return _verify_replica(store, report, prefix)
        with recovery_lock(store_block, lock_wait_seconds, runtime.flow_run.id):
            if mode == "restore-prefix":
                return _restore_prefix(store, report, prefix, restore_as_of, max_workers, verify_sample,
                                       approval_policy, approvers, approval_timeout_seconds, approval_poll_seconds,
                                       dry_run)
            return _failover(store, kube, report, prefix, secret_name, secret_key, bucket_key,
                             list(restart_deployments or []), rollout_timeout_seconds, verify_sample, approval_policy,
                             approvers, approval_timeout_seconds, approval_poll_seconds, dry_run)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The recovery stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        publish_evidence(report)


def _record_comparison(report: RecoveryReport, comparison: ReplicaComparison) -> None:
    report.facts["Replica"] = comparison.summary()
    report.facts["Missing in the replica"] = _listed(comparison.missing) or "none"
    report.facts["Stale in the replica"] = _listed([
        f"{s.key} (primary {s.primary_size} B {s.primary_etag}, replica {s.replica_size} B {s.replica_etag})"
        for s in comparison.stale]) or "none"
    report.add_checks("replica", [
        CheckResult("no object missing in the replica", not comparison.missing,
                    f"{len(comparison.missing)} of {comparison.checked} missing"),
        CheckResult("no stale object in the replica", not comparison.stale,
                    f"{len(comparison.stale)} of {comparison.checked} differ in size or etag"),
    ])
    lag = (report.incident_detected_at - comparison.oldest_unreplicated).total_seconds() \
        if comparison.oldest_unreplicated else 0.0
    report.rpo_seconds = max(0.0, lag)


def _verify_replica(store: ObjectStore, report: RecoveryReport, prefix: str) -> State:
    with report.step("Compare the replica with the primary") as step:
        comparison = compare_replica(store, prefix)
        _record_comparison(report, comparison)
        step.detail = comparison.summary()
        step.outcome = "ok" if comparison.complete else "incomplete"
    if not comparison.complete:
        report.outcome = "ReplicaIncomplete"
        report.summary = (f"The replica is incomplete: {comparison.summary()}. A failover now would lose "
                          f"{report.rpo_seconds:.0f} s of writes.")
        report.action_items.append(f"check replication from {comparison.primary_bucket} to {comparison.replica_bucket}")
        return Failed(name="ReplicaIncomplete", message=report.summary)
    report.outcome = "ReplicaComplete"
    report.summary = f"The replica is complete: {comparison.summary()}."
    return Completed(name="ReplicaComplete", message=report.summary)


def _approve(report: RecoveryReport, preview: str, approval_policy: str, approvers: list[str], timeout: int,
             poll: float):
    return approval_step(report, approval_policy, preview, approvers, timeout, poll)


def _not_approved(report: RecoveryReport, decision, what: str) -> State:
    name = "ApprovalTimedOut" if decision is None else "Rejected"
    report.outcome = name
    report.summary = f"The {what} was {'not approved in time' if decision is None else 'rejected'}; nothing changed."
    get_run_logger().warning(report.summary)
    return Failed(name=name, message=report.summary) if decision is None else Cancelled(name=name, message=report.summary)


def _sample(keys: list[str], size: int, seed: str) -> list[str]:
    return sorted(random.Random(seed).sample(keys, min(size, len(keys))))


def _restore_prefix(store: ObjectStore, report: RecoveryReport, prefix: str, as_of: datetime,
                    max_workers: int | None, verify_sample: int, approval_policy: str, approvers: list[str],
                    approval_timeout: int, approval_poll: float, dry_run: bool) -> State:
    with report.step("Plan the restore") as step:
        plan = plan_prefix_restore(store, prefix, as_of)
        counts = plan.counts()
        report.plan = [change.describe() for change in plan.changes]
        report.facts["Keys examined"] = plan.keys_examined
        report.facts["Changes"] = ", ".join(f"{n} {action}" for action, n in counts.items())
        report.facts["Versioning history begins"] = plan.history_starts.isoformat()
        report.recoverable_window = {"earliest": plan.history_starts.isoformat(),
                                     "latest": report.started_at.isoformat()}
        step.detail = f"{len(plan.changes)} changes over {plan.keys_examined} keys: {counts}"
    report.rpo_seconds = max(0.0, (report.incident_detected_at - as_of).total_seconds())

    if dry_run:
        report.outcome = "DryRun"
        report.summary = f"Dry run: {len(plan.changes)} changes were recorded and nothing was changed."
        return Completed(name="DryRun", message=report.summary)
    if plan.changes:
        preview = _restore_preview(store, plan, report)
        decision = _approve(report, preview, approval_policy, approvers, approval_timeout, approval_poll)
        if decision is None or not decision.approved:
            return _not_approved(report, decision, "restore")
        with report.step("Apply the restore") as step:
            result = apply_prefix_restore(store, plan, max_workers)
            report.facts["Applied"] = (f"{result.applied} changes in {result.seconds} s, at most "
                                       f"{result.peak_in_flight} of {result.max_workers} workers in flight")
            if result.failed:
                report.facts["Failed changes"] = _listed([f"{k}: {e}" for k, e in result.failed])
                step.outcome = "failed"
            step.detail = f"{result.applied} applied, {len(result.failed)} failed"

    with report.step("Verify the prefix matches its state at T") as step:
        remaining = plan_prefix_restore(store, prefix, as_of)
        restored = [c for c in plan.changes if c.action != "hide"]
        sample = _sample([c.key for c in restored], verify_sample, report.incident_id)
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
        failed = report.failed_critical("restored")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(remaining.changes)} keys still differ; {len(sample)} objects read back"
    if report.failed_critical():
        report.outcome = "VerificationFailed"
        report.summary = (f"The restore of {prefix!r} did not complete: see Verification Results. Re-running the "
                          "flow with the same time applies only what is still different.")
        return Failed(name="VerificationFailed", message=report.summary)
    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.outcome = "Recovered"
    report.summary = (f"Prefix {prefix!r} of {plan.bucket} is back to its state at {as_of.isoformat()}: "
                      f"{counts['restore']} restored, {counts['undelete']} undeleted, {counts['hide']} hidden; "
                      "every earlier version is kept.")
    return Completed(name="Recovered", message=report.summary)


def _restore_preview(store: ObjectStore, plan: RestorePlan, report: RecoveryReport) -> str:
    counts = plan.counts()
    lines = [
        f"## Restore `{plan.prefix}` of `{plan.bucket}` to {plan.as_of.isoformat()}?",
        "",
        f"- **Keys examined**: {plan.keys_examined}",
        f"- **Changes**: {counts['restore']} restore, {counts['undelete']} undelete, {counts['hide']} hide",
        f"- **Writes after T that are superseded**: {report.rpo_seconds:.0f} s (objective {report.rpo_objective_seconds} s)",
        "",
        "Every change adds a new version or delete marker; no version is deleted, so this can itself be undone.",
        "",
    ]
    lines += [f"- {c.describe()}" for c in plan.changes[:20]]
    if len(plan.changes) > 20:
        lines.append(f"- ... and {len(plan.changes) - 20} more (all listed in the report's plan)")
    return "\n".join(lines)


def _failover_target(kube_block: str | None, secret_name: str | None, secret_key: str, deployments: list[str],
                     store: ObjectStore) -> KubernetesTarget:
    """Refuse a failover that could not complete, before anything changes; return the applications' target."""
    if store.replica_endpoint is None:
        raise InvalidInput(f"object store {store.bucket_name!r}: the replica has no endpoint to fail over to")
    if not kube_block:
        raise InvalidInput("kube_block is required for mode 'failover': the applications' KubernetesTarget")
    if not secret_name or not secret_name.strip():
        raise InvalidInput("secret_name is required for mode 'failover': the Secret applications read the endpoint from")
    if not secret_key or not secret_key.strip():
        raise InvalidInput("secret_key is empty; name the Secret key holding the object-storage endpoint")
    kube = load_block(KubernetesTarget, kube_block)
    missing = find_missing_deployments(kube, deployments)
    if missing:
        raise InvalidInput(f"deployments {missing} do not exist in namespace {kube.namespace!r} of {kube_block!r}")
    return kube


def _failover(store: ObjectStore, kube: KubernetesTarget, report: RecoveryReport, prefix: str, secret_name: str,
              secret_key: str, bucket_key: str | None, deployments: list[str], rollout_timeout: float,
              verify_sample: int, approval_policy: str, approvers: list[str], approval_timeout: int,
              approval_poll: float, dry_run: bool) -> State:
    endpoint, replica_bucket = store.replica_endpoint, store.secondary_bucket_name
    with report.step("Measure what the replica lacks") as step:
        try:
            comparison = compare_replica.with_options(retries=0)(store, prefix)
        except ObjectStoreError as exc:  # the primary is often unreachable: that is why we fail over
            comparison = None
            report.facts["Replica"] = f"not compared: the primary could not be listed ({exc})"
            report.action_items.append("compare the replica with the primary once the primary is back, and copy "
                                       "what it lacks")
            step.outcome, step.detail = "primary unreachable", str(exc)
        else:
            _record_comparison(report, comparison)
            step.detail = comparison.summary()

    wanted = {secret_key: endpoint} | ({bucket_key: replica_bucket} if bucket_key and replica_bucket else {})
    with report.step("Read the applications' current endpoint") as step:
        to_set = secret_keys_to_set(kube, secret_name, wanted)
        pointing = not to_set
        pending = [d for d in deployments if not deployment_annotated(kube, d, FAILOVER_ANNOTATION, endpoint)]
        step.detail = (f"secret {kube.namespace}/{secret_name}: "
                       f"{'every key already holds the replica' if pointing else 'keys ' + ', '.join(to_set) + ' to set'}; "
                       f"{len(pending)} of {len(deployments)} deployments to restart")

    current = {secret_key: "current endpoint", bucket_key: "current bucket"}
    plan = [f"secret {kube.namespace}/{secret_name} key {key}: {current[key]} -> {wanted[key]}" for key in to_set]
    plan += [f"rollout restart deployment {kube.namespace}/{d} (annotate {FAILOVER_ANNOTATION}={endpoint})"
             for d in pending]
    plan += [f"wait at most {rollout_timeout:g} s for deployment {kube.namespace}/{d} to be ready" for d in deployments]
    plan.append(f"read {verify_sample} objects under {prefix!r} back from {replica_bucket} at {endpoint}")
    if dry_run and (len(to_set) < len(wanted) or len(pending) < len(deployments)):
        plan.insert(0, f"failover partly done already: {len(wanted) - len(to_set)} of {len(wanted)} keys of secret "
                       f"{kube.namespace}/{secret_name} hold the replica, {len(deployments) - len(pending)} of "
                       f"{len(deployments)} deployments were restarted for it; a real run would redo none of it and "
                       "finish the steps below")
    report.plan = plan
    if dry_run:
        report.outcome = "DryRun"
        report.summary = "Dry run: the failover plan was recorded and nothing was changed."
        return Completed(name="DryRun", message=report.summary)

    if not pointing or pending:
        decision = _approve(report, _failover_preview(report, kube, secret_name, endpoint, replica_bucket, plan),
                            approval_policy, approvers, approval_timeout, approval_poll)
        if decision is None or not decision.approved:
            return _not_approved(report, decision, "failover")
    if not pointing:
        with report.step("Point the applications' secret at the replica") as step:
            for key in to_set:
                set_app_secret(kube, secret_name, key, SecretStr(wanted[key]))
            step.detail = f"{kube.namespace}/{secret_name}: {', '.join(to_set)}"
    else:
        report.steps.append(StepRecord(step="Point the applications' secret at the replica", start=utcnow(),
                                       end=utcnow(), outcome="already done", detail="done by an earlier run"))
    for name in pending:
        with report.step(f"Restart {name}") as step:
            stamp = restart_rollout(kube, name)
            annotate_deployment(kube, name, {FAILOVER_ANNOTATION: endpoint})
            step.detail = f"restartedAt {stamp}"
    statuses = []
    for name in deployments:
        with report.step(f"Wait for {name}") as step:
            status = wait_for_rollout(kube, name, rollout_timeout)
            statuses.append(status)
            step.detail = status.message

    with report.step("Read objects back from the replica") as step:
        listed = sorted(list_bucket(store, prefix, "secondary").items())
        sample = _sample([k for k, _ in listed], verify_sample, report.incident_id)
        expected = {k: (v.size, v.etag) for k, v in listed if k in set(sample)}
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
        report.outcome = "PostCheckFailed"
        report.summary = "The applications point at the replica but post-checks failed; see Verification Results."
        return Failed(name="PostCheckFailed", message=report.summary)
    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.promotion = {"endpoint": endpoint, "data_directory": replica_bucket, "old_primary_aside": store.bucket_name,
                        "already_promoted": bool(pointing and not pending),
                        "promoted_at": report.service_restored_at.isoformat()}
    report.outcome = "FailedOver"
    report.summary = (f"Applications in {kube.namespace} read objects from {replica_bucket} at {endpoint}; "
                      f"the primary {store.bucket_name} is left as it was.")
    report.action_items.append(f"fail back to {store.bucket_name} once it is healthy and resynchronised")
    return Completed(name="FailedOver", message=report.summary)


def _failover_preview(report: RecoveryReport, kube: KubernetesTarget, secret_name: str, endpoint: str,
                      bucket: str | None, plan: list[str]) -> str:
    lines = [
        f"## Fail applications in `{kube.namespace}` over to the replica `{bucket}`?",
        "",
        f"- **Replica**: {report.facts.get('Replica', '-')}",
        f"- **Missing in the replica**: {report.facts.get('Missing in the replica', '-')}",
        f"- **Data not yet replicated**: {'unknown' if report.rpo_seconds is None else f'{report.rpo_seconds:.0f} s'} "
        f"(objective {report.rpo_objective_seconds} s)",
        f"- **Secret**: `{secret_name}` will point at {endpoint}",
        "",
        "| Check | Result | Detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in report.checks]
    lines += ["", "Approving makes these changes:", ""] + [f"1. {item}" for item in plan]
    lines += ["", "Rejecting changes nothing."]
    return "\n".join(lines)
