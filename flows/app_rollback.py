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
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from prefect.states import State

from blocks import CheckResult
from blocks.errors import InvalidInput
from blocks.health import HealthEndpoints
from blocks.kubernetes import KubernetesTarget, RollbackPlan, RolloutNotReady, RolloutStatus, template_digest
from blocks.loading import load_block
from runbook.evidence import utcnow
from runbook.parameters import recovery_flow
from runbook.run import Approval, Recovery
from tasks.health import probe_health
from tasks.kubernetes import (list_deployment_pods, plan_rollback, read_deployment, read_rollout_history,
                              read_rollout_status, undo_rollout, wait_for_rollout)

SCENARIO = "app-rollback"
INCIDENT_ANNOTATION = "dr-pipelines.io/rollback-incident"
FROM_ANNOTATION = "dr-pipelines.io/rolled-back-from"
# Digests of the pod templates a rollback went from and to (blocks.kubernetes.template_digest).
FROM_TEMPLATE_ANNOTATION = "dr-pipelines.io/rolled-back-from-template"
RESTORED_TEMPLATE_ANNOTATION = "dr-pipelines.io/restored-template"
RollbackApproval = Literal["none", "required", "auto"]


@dataclass(frozen=True)
class Verification:
    """How a rollback is verified: the bounded wait for the rollout, then the service's health endpoints."""

    rollout_timeout: float
    consecutive: int
    window: float
    interval: float
    health: HealthEndpoints | None

    @classmethod
    def of(cls, rollout_timeout: float, consecutive: int, window: float, interval: float,
           health_block: str | None, health_urls: list[str] | None) -> "Verification":
        """The settings, refused (InvalidInput) when they cannot work."""
        if not 0 < rollout_timeout <= 3600:
            raise InvalidInput(f"rollout timeout {rollout_timeout} s: expected 0 < timeout <= 3600")
        if consecutive < 1 or not 0 < interval <= window <= 3600 or (consecutive - 1) * interval > window:
            raise InvalidInput(f"health check: {consecutive} consecutive results, interval {interval} s, window "
                               f"{window} s: expected at least 1 result, 0 < interval <= window <= 3600 and "
                               f"(results - 1) x interval <= window")
        if health_block and health_urls:
            raise InvalidInput("give either health_block or health_urls, not both")
        bad = [u for u in health_urls or [] if not re.match(r"^https?://[^\s/]+", u)]
        if bad:
            raise InvalidInput(f"health URLs {bad} are not http(s) URLs")
        health = (load_block(HealthEndpoints, health_block) if health_block else
                  HealthEndpoints(endpoints={f"url-{i + 1}": u for i, u in enumerate(health_urls)}) if health_urls else None)
        if health is not None:
            health.check_settings(consecutive, window, interval)
        return cls(rollout_timeout, consecutive, window, interval, health)

    def plan(self, deployment: str, images: list[str]) -> list[str]:
        probed = ", ".join(sorted(self.health.endpoints)) if self.health else "no health endpoints (none configured)"
        return [f"wait until {deployment} is rolled out and every pod is ready (at most {self.rollout_timeout:g} s)",
                f"check every pod of {deployment} runs {', '.join(images)}",
                f"probe {probed}: {self.consecutive} consecutive successes within {self.window:g} s"]


@dataclass(frozen=True)
class Marker:
    """What an earlier rollback wrote on the deployment (annotations), and the digest of the template it runs now."""

    annotations: dict[str, str]
    running: str

    @classmethod
    def on(cls, dep: dict) -> "Marker":
        return cls((dep.get("metadata") or {}).get("annotations") or {},
                   template_digest((dep.get("spec") or {}).get("template") or {}))

    def incident(self, deployment: str) -> str:
        """The incident whose rollback the deployment still runs; else one named after the deployment and the
        template it runs now (the failed release), so every run for the same failed release gets the same id."""
        if self.annotations.get(INCIDENT_ANNOTATION) and self.annotations.get(RESTORED_TEMPLATE_ANNOTATION) == self.running:
            return self.annotations[INCIDENT_ANNOTATION]
        return f"{deployment[:100]}-{self.running}"

    def done_for(self, incident: str) -> bool:
        """Whether an earlier run of ``incident`` rolled the deployment back and it still runs what that run
        restored (the same release deployed again after the rollback is a new failure to roll back)."""
        restored = self.annotations.get(RESTORED_TEMPLATE_ANNOTATION)
        return self.annotations.get(INCIDENT_ANNOTATION) == incident and restored in (None, self.running)

    def refuse_roll_forward(self, plan: RollbackPlan, to_revision: int | None) -> None:
        """Refuse to go 'back' to the release an earlier rollback went away from (``kubectl rollout undo`` toggles)."""
        by = self.annotations.get(INCIDENT_ANNOTATION)
        if (to_revision is None and self.annotations.get(FROM_TEMPLATE_ANNOTATION) == plan.to_digest
                and self.annotations.get(RESTORED_TEMPLATE_ANNOTATION) == plan.from_digest):
            raise InvalidInput(
                f"deployment {plan.name!r} was rolled back from {', '.join(plan.to_images)} by incident {by!r}; its "
                f"previous revision is that failed release. Give incident_id {by!r} to verify that rollback again, "
                "or to_revision to choose a revision")


def _preview(run: Recovery, plan: RollbackPlan, target: KubernetesTarget) -> str:
    return "\n".join([
        f"## Roll back `{plan.name}` in `{target.namespace}`?",
        "",
        f"- **Now**: revision {plan.from_revision}, image {', '.join(plan.from_images)}",
        f"- **After**: revision {plan.to_revision}, image {', '.join(plan.to_images)} (ReplicaSet {plan.replicaset})",
        f"- **Rollout now**: {run.report.facts.get('rollout status before', '-')}",
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
    severity: str | None = None,
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
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record the plan (image and revision, from -> to) and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        incident_id: identifies the incident; a re-run with the same id does not roll back twice. Default:
            the deployment and a digest of the failed release's pod template (stable across re-runs; a re-run
            after the rollback finds the incident on the deployment).
        lock_wait_seconds: how long to wait for another recovery of the same deployment to finish.
    """
    run = Recovery(
        SCENARIO, target=f"{kubernetes_block}/{deployment}", severity=severity, detected_at=incident_detected_at or utcnow(),
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds,
                             allowed_policies=("none", "required", "auto")),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        recovery_target="previous revision" if to_revision is None else f"revision {to_revision}",
        incident_id=incident_id,
    )
    report = run.report
    with run:
        # Refused before the lock and before anything changes: a missing deployment or revision, a
        # deployment without a previous revision, a 'previous' revision that is the release an earlier
        # rollback left. A re-run of an incident whose rollback is done goes on to verification.
        with run.preflight() as step:
            verification = Verification.of(rollout_timeout_seconds, health_consecutive_required, health_window_seconds,
                                           health_interval_seconds, health_block, health_urls)
            target = load_block(KubernetesTarget, kubernetes_block)
            run.refuse_unsafe_policy(kubernetes_block, target.environment, reversible=True)
            current = Marker.on(read_deployment(target, deployment))
            run.assign_incident(incident_id or current.incident(deployment), deployment)
            if not current.done_for(run.incident_id):
                current.refuse_roll_forward(plan_rollback(target, deployment, to_revision), to_revision)
            step.detail = f"{target.api_server} namespace {target.namespace}; incident {run.incident_id}"

        with run.locks(f"{kubernetes_block}-{deployment}", wait_seconds=lock_wait_seconds):
            # 1. Identify the current deployment.
            with run.step("Identify the current deployment") as step:
                status = read_rollout_status(target, deployment)
                history = read_rollout_history(target, deployment)
                marker = Marker.on(read_deployment(target, deployment))
                report.facts.update({"namespace": target.namespace, "revision before": status.revision,
                                     "image before": ", ".join(status.images), "rollout status before": status.message,
                                     "revisions": ", ".join(f"{r.revision}: {', '.join(r.images)}" for r in history)})
                step.detail = f"revision {status.revision}, image {', '.join(status.images)}; {status.message}"

            resumed = marker.done_for(run.incident_id)
            if resumed:
                rolled_from = marker.annotations.get(FROM_ANNOTATION, "-")
                with run.step("Resume: rollback already done for this incident") as step:
                    report.facts["rolled back from"] = rolled_from
                    step.detail = (f"deployment {deployment} was rolled back by an earlier run of {run.incident_id} "
                                   f"(from {rolled_from}); not rolled back again")
                    report.plan = [f"deployment {deployment}: keep revision {status.revision} (already rolled back)",
                                   f"wait until {deployment} is rolled out and verify its health"]
                if dry_run:
                    return run.planned(report.plan, f"Dry run: {deployment} was already rolled back for "
                                       f"{run.incident_id}. Nothing was changed.")
            else:
                with run.step("Preflight: previous revision") as step:
                    plan = plan_rollback(target, deployment, to_revision)
                    marker.refuse_roll_forward(plan, to_revision)
                    if plan.noop:
                        raise InvalidInput(f"deployment {deployment!r} already runs the template of revision "
                                           f"{to_revision or plan.to_revision}; nothing to roll back")
                    report.plan = [plan.describe(), *verification.plan(deployment, plan.to_images)]
                    report.facts.update({"revision to restore": plan.to_revision,
                                         "image to restore": ", ".join(plan.to_images)})
                    step.detail = plan.describe()
                if dry_run:
                    return run.planned(report.plan, f"Dry run: {plan.describe()}. Nothing was changed.")

                # 2. Approval (by default the trigger: the rollback is reversible).
                decision = run.approve(_preview(run, plan, target))
                if decision is None or not decision.approved:
                    return run.declined(decision, f"The rollback of {deployment}")

                # 3. Roll back to the previous version.
                with run.step("Roll back (kubectl rollout undo)") as step:
                    # The target is named by its ReplicaSet (a rollback renumbers its revision), and the incident
                    # marker goes in the same patch as the rollback: a retry after the patch landed is a no-op,
                    # and a re-run finds the marker exactly when the rollback happened.
                    done = undo_rollout(target, deployment, replicaset=plan.replicaset, annotations={
                        INCIDENT_ANNOTATION: run.incident_id,
                        FROM_ANNOTATION: f"revision {plan.from_revision} ({', '.join(plan.from_images)})",
                        FROM_TEMPLATE_ANNOTATION: plan.from_digest,
                        RESTORED_TEMPLATE_ANNOTATION: plan.to_digest,
                    })
                    step.detail = plan.describe() if done.noop else done.describe()
                    report.facts["rollback"] = step.detail

            # 4. Wait for the rollback to complete.
            with run.step("Wait for the rollout to complete") as step:
                try:
                    final = wait_for_rollout(target, deployment, verification.rollout_timeout)
                except RolloutNotReady as exc:
                    step.outcome, step.detail = "failed", str(exc)
                    report.add_checks("rollout", [CheckResult("rollout complete", False, str(exc))])
                    return run.finish("RolloutNotReady", f"{deployment} was rolled back but did not become ready "
                                      f"within {verification.rollout_timeout:g} s: {exc.status.message}", action_items=[
                                          f"inspect the pods of {deployment}: kubectl get pods -n {target.namespace}",
                                          "roll back to an older revision with to_revision"])
                report.facts.update({"revision after": final.revision, "image after": ", ".join(final.images)})
                step.detail = f"{final.message}: {final.ready}/{final.replicas} ready, revision {final.revision}"
                report.add_checks("rollout", [CheckResult("rollout complete", True, final.message)])

            # 5. Verify service health.
            if not _healthy(run, target, deployment, final, verification):
                return run.finish("HealthCheckFailed", f"{deployment} was rolled back to {', '.join(final.images)} but "
                                  "the service is not healthy; see Verification Results.", action_items=[
                                      f"investigate {deployment}: the previous revision does not restore the service"])

            # 6. The service is back: the RTO stops here.
            run.mark_restored()
            return run.finish("RolledBack", f"{deployment} in {target.namespace} runs {', '.join(final.images)} "
                              f"(revision {final.revision}) again; {final.ready} pods ready and the service is healthy.",
                              action_items=[] if resumed else [
                                  f"find why {report.facts['image before']} failed before rolling it out again"])


def _healthy(run: Recovery, target: KubernetesTarget, deployment: str, final: RolloutStatus,
             verification: Verification) -> bool:
    """Every pod Running and ready on the restored image, and the health endpoints answering."""
    report = run.report
    with run.step("Verify service health") as step:
        pods = list_deployment_pods(target, deployment)
        bad = [p["name"] for p in pods if p["phase"] != "Running" or not p["ready"] or p["images"] != final.images]
        checks = [CheckResult("pods running", len(pods) >= final.replicas and not bad,
                              f"{len(pods) - len(bad)}/{len(pods)} pods Running and ready on {', '.join(final.images)}"
                              + (f"; not ready: {', '.join(bad[:5])}" if bad else ""))]
        if verification.health is not None:
            evidence = probe_health(verification.health, verification.consecutive, verification.window,
                                    verification.interval, until="healthy")
            report.facts["health probes"] = evidence.summary()
            checks.append(CheckResult("health endpoints", evidence.all_healthy, evidence.summary()))
        else:
            checks.append(CheckResult("health endpoints", False, "no health endpoints configured", critical=False))
            report.action_items.append(f"configure health endpoints for {deployment} so rollbacks verify the service")
        report.add_checks("health", checks)
        failed = report.failed_critical("health")
        step.outcome = "ok" if not failed else "failed"
        step.detail = "; ".join(f"{c.name}: {'pass' if c.passed else 'FAIL'}" for c in checks)
    return not failed
