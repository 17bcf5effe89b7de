"""Application deployment failure: roll the deployment back to its previous revision and verify.

Runbook (continuity plan: "Application Deployment Rollback"):
  1. identify the current deployment: ``kubectl rollout history`` (revision and image now, the
     revision to return to); refuse when the deployment is missing or has no previous revision
  2. approval: a rollback is reversible, so by default the operator's trigger is the decision
     (policy 'none', recorded as such); 'required' asks a named approver; 'auto' is for drills
  3. roll back to the previous version: ``kubectl rollout undo``
  4. wait for the rollback to complete: ``kubectl rollout status`` (bounded)
  5. verify service health: every pod of the deployment Running and ready on the restored
     image, and the health endpoints answering (consecutive successes)
  6. the incident report: RTO against the ``application`` objective
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State

from blocks import CheckResult, RecoveryObjectives
from blocks.errors import InvalidInput
from blocks.health import HealthEndpoints
from blocks.kubernetes import KubernetesTarget, RollbackPlan, RolloutNotReady, template_digest
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import approval_step, check_approval_settings
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from tasks.health import probe_health
from tasks.kubernetes import (
    list_deployment_pods,
    plan_rollback,
    read_deployment,
    read_rollout_history,
    read_rollout_status,
    undo_rollout,
    wait_for_rollout,
)
from runbook.locks import recovery_lock

SCENARIO = "app-rollback"
INCIDENT_ANNOTATION = "dr-pipelines.io/rollback-incident"
FROM_ANNOTATION = "dr-pipelines.io/rolled-back-from"
# Digests of the pod templates a rollback went from and to (blocks.kubernetes.template_digest).
FROM_TEMPLATE_ANNOTATION = "dr-pipelines.io/rolled-back-from-template"
RESTORED_TEMPLATE_ANNOTATION = "dr-pipelines.io/restored-template"
INCIDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RollbackApproval = Literal["none", "required", "auto"]


def _refuse_bad_input(detected: datetime, started: datetime, to_revision: int | None, rollout_timeout: float,
                      failures_required: int, window: float, interval: float, policy: str, approvers: list[str],
                      approval_timeout: int, drill: bool, incident_id: str | None) -> None:
    if detected.tzinfo is None or detected.utcoffset() is None:
        raise InvalidInput(f"incident_detected_at {detected.isoformat()} has no time zone; give it with a UTC offset")
    if detected > started:
        raise InvalidInput(f"incident_detected_at {detected.isoformat()} is in the future (now {started.isoformat()})")
    if to_revision is not None and to_revision < 1:
        raise InvalidInput(f"to_revision {to_revision} must be a revision number >= 1 (or empty for the previous one)")
    if not 0 < rollout_timeout <= 3600:
        raise InvalidInput(f"rollout timeout {rollout_timeout} s: expected 0 < timeout <= 3600")
    if failures_required < 1 or not 0 < interval <= window <= 3600 or (failures_required - 1) * interval > window:
        raise InvalidInput(f"health check: {failures_required} consecutive results, interval {interval} s, window "
                           f"{window} s: expected at least 1 result, 0 < interval <= window <= 3600 and "
                           f"(results - 1) x interval <= window")
    if policy not in ("none", "required", "auto"):
        raise InvalidInput(f"approval policy {policy!r} is not 'none', 'required' or 'auto'")
    if policy != "none":
        check_approval_settings(policy, approvers, approval_timeout, drill)
    if incident_id is not None and not INCIDENT_ID.match(incident_id):
        raise InvalidInput(f"incident_id {incident_id!r} must be a plain name (letters, digits, '.', '_', '-')")


def _health_endpoints(health_block: str | None, health_urls: list[str] | None) -> HealthEndpoints | None:
    if health_block and health_urls:
        raise InvalidInput("give either health_block or health_urls, not both")
    if health_block:
        return load_block(HealthEndpoints, health_block)
    if health_urls:
        bad = [u for u in health_urls if not re.match(r"^https?://[^\s/]+", u)]
        if bad:
            raise InvalidInput(f"health URLs {bad} are not http(s) URLs")
        return HealthEndpoints(endpoints={f"url-{i + 1}": u for i, u in enumerate(health_urls)})
    return None


def _annotations(dep: dict) -> dict[str, str]:
    return (dep.get("metadata") or {}).get("annotations") or {}


def _incident_id(dep: dict, deployment: str, given: str | None) -> str:
    """The incident a run is about: the one given; else the one whose rollback the deployment still runs;
    else one named after the deployment and the template it runs now (the failed release), so every
    run for the same failed release gets the same id."""
    if given:
        return given
    annotations = _annotations(dep)
    running = template_digest((dep.get("spec") or {}).get("template") or {})
    if annotations.get(INCIDENT_ANNOTATION) and annotations.get(RESTORED_TEMPLATE_ANNOTATION) == running:
        return annotations[INCIDENT_ANNOTATION]
    return f"{deployment[:100]}-{running}"


def _rolled_back_for(dep: dict, incident: str) -> bool:
    """Whether an earlier run of ``incident`` rolled the deployment back and it still runs what that run restored
    (the same release deployed again after the rollback is a new failure to roll back)."""
    annotations = _annotations(dep)
    if annotations.get(INCIDENT_ANNOTATION) != incident:
        return False
    restored = annotations.get(RESTORED_TEMPLATE_ANNOTATION)
    return restored is None or restored == template_digest((dep.get("spec") or {}).get("template") or {})


def _refuse_roll_forward(dep: dict, plan: RollbackPlan, to_revision: int | None) -> None:
    """Refuse to go 'back' to the release an earlier rollback went away from (``kubectl rollout undo`` toggles)."""
    annotations = _annotations(dep)
    if (to_revision is None and annotations.get(FROM_TEMPLATE_ANNOTATION) == plan.to_digest
            and annotations.get(RESTORED_TEMPLATE_ANNOTATION) == plan.from_digest):
        raise InvalidInput(
            f"deployment {plan.name!r} was rolled back from {', '.join(plan.to_images)} by incident "
            f"{annotations.get(INCIDENT_ANNOTATION)!r}; its previous revision is that failed release. Give "
            f"incident_id {annotations.get(INCIDENT_ANNOTATION)!r} to verify that rollback again, or to_revision "
            "to choose a revision")


def _preview(report: RecoveryReport, plan: RollbackPlan, target: KubernetesTarget) -> str:
    return "\n".join([
        f"## Roll back `{plan.name}` in `{target.namespace}`?",
        "",
        f"- **Now**: revision {plan.from_revision}, image {', '.join(plan.from_images)}",
        f"- **After**: revision {plan.to_revision}, image {', '.join(plan.to_images)} (ReplicaSet {plan.replicaset})",
        f"- **Rollout now**: {report.facts.get('rollout status before', '-')}",
        "",
        "The rollback is reversible: the current revision stays in the history and can be rolled out again.",
    ])


@recovery_flow(name="application-rollback", description="Roll a failed application deployment back to its previous revision.")
def app_rollback(
    kubernetes_block: str,
    deployment: str,
    to_revision: int | None = None,
    incident_detected_at: datetime | None = None,
    health_block: str | None = None,
    health_urls: list[str] | None = None,
    health_consecutive_required: int = 2,
    health_window_seconds: float = 60,
    health_interval_seconds: float = 5,
    rollout_timeout_seconds: float = 300,
    approval_policy: RollbackApproval = "none",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 1800,
    approval_poll_seconds: float = 5,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "application",
    incident_id: str | None = None,
    lock_wait_seconds: int = 30,
) -> State:
    """Roll ``deployment`` back to its previous revision (or ``to_revision``) and verify the service.

    Args:
        kubernetes_block: name of the KubernetesTarget block (cluster and namespace of the deployment).
        deployment: the deployment whose rollout failed.
        to_revision: revision to return to; empty for the previous one (as ``kubectl rollout undo``).
        incident_detected_at: when the failure was detected (tz-aware); the RTO counts from it. Default: the
            start of this run.
        health_block: name of a HealthEndpoints block of the service.
        health_urls: health URLs of the service, instead of a block.
        health_consecutive_required: consecutive successful probes that make the service healthy.
        health_window_seconds: longest time to probe the health endpoints.
        health_interval_seconds: time between probes.
        rollout_timeout_seconds: longest wait for the rolled-back deployment to be ready.
        approval_policy: 'none' (default: a rollback is reversible; the trigger is the decision, recorded),
            'required' (a named approver) or 'auto' (drills only).
        allowed_approvers: who may approve, with policy 'required'.
        approval_timeout_seconds: how long to wait for approval before giving up without rolling back.
        approval_poll_seconds: how often a paused run checks for an answer.
        dry_run: record the plan (image and revision, from -> to) and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; a re-run with the same id does not roll back twice. Default:
            the deployment and a digest of the failed release's pod template (stable across re-runs; a re-run
            after the rollback finds the incident on the deployment).
        lock_wait_seconds: how long to wait for another recovery of the same deployment to finish.
    """
    approvers = list(allowed_approvers or [])
    started = utcnow()
    detected = incident_detected_at or started
    target_name = f"{kubernetes_block}/{deployment}"
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=target_name,
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None, drill=drill, dry_run=dry_run,
        incident_detected_at=detected, started_at=started, recovery_target="previous revision"
        if to_revision is None else f"revision {to_revision}", rto_objective_seconds=0, rpo_objective_seconds=0,
    )
    try:
        with report.step("Preflight: validate inputs") as step:
            check_parameters()
            _refuse_bad_input(detected, started, to_revision, rollout_timeout_seconds, health_consecutive_required,
                              health_window_seconds, health_interval_seconds, approval_policy, approvers,
                              approval_timeout_seconds, drill, incident_id)
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            report.severity = objective.priority
            target = load_block(KubernetesTarget, kubernetes_block)
            if approval_policy == "auto" and target.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused for {kubernetes_block!r}: its environment is production")
            health = _health_endpoints(health_block, health_urls)
            if health is not None:
                health.check_settings(health_consecutive_required, health_window_seconds, health_interval_seconds)
            # Refused before the lock and before anything changes: a missing deployment or revision,
            # a deployment without a previous revision, a paused deployment, a 'previous' revision that
            # is the release an earlier rollback left. A re-run of an incident whose rollback is done
            # goes on to verification.
            current = read_deployment(target, deployment)
            report.incident_id = _incident_id(current, deployment, incident_id)
            if not _rolled_back_for(current, report.incident_id):
                _refuse_roll_forward(current, plan_rollback(target, deployment, to_revision), to_revision)
            step.detail = f"{target.api_server} namespace {target.namespace}; incident {report.incident_id}"

        with recovery_lock(f"{kubernetes_block}-{deployment}", lock_wait_seconds, runtime.flow_run.id):
            return _rollback(target, deployment, to_revision, health, report, approval_policy, approvers,
                             approval_timeout_seconds, approval_poll_seconds, dry_run, rollout_timeout_seconds,
                             health_consecutive_required, health_window_seconds, health_interval_seconds)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The rollback stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        publish_evidence(report)


def _rollback(target: KubernetesTarget, deployment: str, to_revision: int | None, health: HealthEndpoints | None,
              report: RecoveryReport, approval_policy: str, approvers: list[str], approval_timeout: int,
              approval_poll: float, dry_run: bool, rollout_timeout: float, consecutive: int, window: float,
              interval: float) -> State:
    logger = get_run_logger()
    with report.step("Identify the current deployment") as step:
        status = read_rollout_status(target, deployment)
        history = read_rollout_history(target, deployment)
        dep = read_deployment(target, deployment)
        dep_annotations = _annotations(dep)
        report.facts.update({
            "namespace": target.namespace,
            "revision before": status.revision,
            "image before": ", ".join(status.images),
            "rollout status before": status.message,
            "revisions": ", ".join(f"{r.revision}: {', '.join(r.images)}" for r in history),
        })
        step.detail = f"revision {status.revision}, image {', '.join(status.images)}; {status.message}"

    resumed = _rolled_back_for(dep, report.incident_id)
    if resumed:
        with report.step("Resume: rollback already done for this incident") as step:
            report.facts["rolled back from"] = dep_annotations.get(FROM_ANNOTATION, "-")
            step.detail = (f"deployment {deployment} was rolled back by an earlier run of {report.incident_id} "
                           f"(from {dep_annotations.get(FROM_ANNOTATION, '-')}); not rolled back again")
            report.plan = [f"deployment {deployment}: keep revision {status.revision} (already rolled back)",
                           f"wait until {deployment} is rolled out and verify its health"]
        if dry_run:
            report.outcome = "DryRun"
            report.summary = f"Dry run: {deployment} was already rolled back for {report.incident_id}. Nothing was changed."
            return Completed(name="DryRun", message=report.summary)
    else:
        with report.step("Preflight: previous revision") as step:
            plan = plan_rollback(target, deployment, to_revision)
            _refuse_roll_forward(dep, plan, to_revision)
            if plan.noop:
                raise InvalidInput(f"deployment {deployment!r} already runs the template of revision "
                                   f"{to_revision or plan.to_revision}; nothing to roll back")
            report.plan = [
                plan.describe(),
                f"wait until {deployment} is rolled out and every pod is ready (at most {rollout_timeout:g} s)",
                f"check every pod of {deployment} runs {', '.join(plan.to_images)}",
                f"probe {', '.join(sorted(health.endpoints)) if health else 'no health endpoints (none configured)'}: "
                f"{consecutive} consecutive successes within {window:g} s",
            ]
            report.facts.update({"revision to restore": plan.to_revision, "image to restore": ", ".join(plan.to_images)})
            step.detail = plan.describe()

        if dry_run:
            report.outcome = "DryRun"
            report.summary = f"Dry run: {plan.describe()}. Nothing was changed."
            return Completed(name="DryRun", message=report.summary)

        decision = approval_step(report, approval_policy, _preview(report, plan, target), approvers,
                                 approval_timeout, approval_poll)
        if decision is None or not decision.approved:
            name = "ApprovalTimedOut" if decision is None else "Rejected"
            report.outcome = name
            report.summary = f"The rollback of {deployment} was {'not approved in time' if decision is None else 'rejected'}; nothing changed."
            return Failed(name=name, message=report.summary) if decision is None else Cancelled(name=name, message=report.summary)

        with report.step("Roll back (kubectl rollout undo)") as step:
            # The target is named by its ReplicaSet (a rollback renumbers its revision), and the incident
            # marker goes in the same patch as the rollback: a retry after the patch landed is a no-op,
            # and a re-run finds the marker exactly when the rollback happened.
            done = undo_rollout(target, deployment, replicaset=plan.replicaset, annotations={
                INCIDENT_ANNOTATION: report.incident_id,
                FROM_ANNOTATION: f"revision {plan.from_revision} ({', '.join(plan.from_images)})",
                FROM_TEMPLATE_ANNOTATION: plan.from_digest,
                RESTORED_TEMPLATE_ANNOTATION: plan.to_digest,
            })
            step.detail = plan.describe() if done.noop else done.describe()
            report.facts["rollback"] = step.detail

    with report.step("Wait for the rollout to complete") as step:
        try:
            final = wait_for_rollout(target, deployment, rollout_timeout)
        except RolloutNotReady as exc:
            step.outcome = "failed"
            step.detail = str(exc)
            report.add_checks("rollout", [CheckResult("rollout complete", False, str(exc))])
            report.outcome = "RolloutNotReady"
            report.summary = (f"{deployment} was rolled back but did not become ready within {rollout_timeout:g} s: "
                              f"{exc.status.message}")
            report.action_items += [f"inspect the pods of {deployment}: kubectl get pods -n {target.namespace}",
                                    "roll back to an older revision with to_revision"]
            return Failed(name="RolloutNotReady", message=report.summary)
        report.facts.update({"revision after": final.revision, "image after": ", ".join(final.images)})
        step.detail = f"{final.message}: {final.ready}/{final.replicas} ready, revision {final.revision}"
        report.add_checks("rollout", [CheckResult("rollout complete", True, final.message)])

    with report.step("Verify service health") as step:
        pods = list_deployment_pods(target, deployment)
        expected = final.images
        bad = [p["name"] for p in pods if p["phase"] != "Running" or not p["ready"] or p["images"] != expected]
        pods_ok = len(pods) >= final.replicas and not bad
        checks = [CheckResult("pods running", pods_ok,
                              f"{len(pods) - len(bad)}/{len(pods)} pods Running and ready on {', '.join(expected)}"
                              + (f"; not ready: {', '.join(bad[:5])}" if bad else ""))]
        if health is not None:
            evidence = probe_health(health, consecutive, window, interval, until="healthy")
            report.facts["health probes"] = evidence.summary()
            checks.append(CheckResult("health endpoints", evidence.all_healthy, evidence.summary()))
        else:
            checks.append(CheckResult("health endpoints", False, "no health endpoints configured", critical=False))
            report.action_items.append(f"configure health endpoints for {deployment} so rollbacks verify the service")
        report.add_checks("health", checks)
        failed = report.failed_critical("health")
        step.outcome = "ok" if not failed else "failed"
        step.detail = "; ".join(f"{c.name}: {'pass' if c.passed else 'FAIL'}" for c in checks)

    if report.failed_critical("health"):
        report.outcome = "HealthCheckFailed"
        report.summary = (f"{deployment} was rolled back to {', '.join(final.images)} but the service is not healthy; "
                          "see Verification Results.")
        report.action_items.append(f"investigate {deployment}: the previous revision does not restore the service")
        logger.warning(report.summary)
        return Failed(name="HealthCheckFailed", message=report.summary)

    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.outcome = "RolledBack"
    report.summary = (f"{deployment} in {target.namespace} runs {', '.join(final.images)} (revision {final.revision}) "
                      f"again; {final.ready} pods ready and the service is healthy.")
    if not resumed:
        report.action_items.append(f"find why {report.facts['image before']} failed before rolling it out again")
    return Completed(name="RolledBack", message=report.summary)
