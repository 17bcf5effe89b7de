"""Model corruption: restore a known-good model version, verify it, approve, promote, restart serving.

Runbook (continuity plan: "Scenario 2: Model Corruption", "Backup Strategy Tiers"):
  1. preflight: the version exists in the backup bucket; every artifact is downloaded from the
     newest object version whose sha256 matches the manifest (nothing changes yet)
  2. suspend the training jobs so they cannot overwrite models again
  3. verify model functionality: load the restored model, reproduce its golden outputs
  4. a named approver approves, seeing the checks; only then are training jobs deleted (when asked)
  5. make the verified object versions current again where they were damaged, and check every current
     object against the manifest; a mismatch stops here: nothing is promoted, nothing restarted
  6. flip the production pointer with a compare-and-swap write (the previous value is kept in the evidence)
  7. restart the serving deployments and wait until they are ready
  8. post-checks: the pointer names the version
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from prefect.states import State

from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.loading import load_block
from blocks.models import ModelRegistry, RestoredModel, check_name
from blocks.results import CheckResult
from runbook.evidence import utcnow
from runbook.parameters import recovery_flow
from runbook.run import Approval, ApprovalPolicy, Recovery
from tasks.kubernetes import restart_rollout, stop_training_jobs, wait_for_rollout
from tasks.models import (
    check_model_function,
    flip_production_pointer,
    read_model_manifest,
    read_production_pointer,
    repair_model_objects,
    restore_model_version,
    verify_model_objects,
)

SCENARIO = "model-corruption"


@dataclass(frozen=True)
class Workloads:
    """The model's workloads in Kubernetes: training Jobs stopped before the promotion, serving restarted after."""

    kube: KubernetesTarget | None
    job_selector: str | None
    delete_jobs: bool
    deployments: tuple[str, ...]
    rollout_timeout: float

    @property
    def training(self) -> bool:
        return bool(self.job_selector and self.kube)

    def stop_training(self, run: Recovery, delete: bool) -> None:
        """Suspend (or, after the approval, delete) the training Jobs, recorded as one step."""
        name, fact = ("Delete training jobs", "training jobs deleted") if delete else ("Suspend training jobs", "training jobs")
        with run.step(name) as step:
            done = stop_training_jobs(self.kube, self.job_selector, delete)
            run.report.facts[fact] = [f"{s['job']}: {s['action']}" for s in done] or ["none found"]
            step.detail = "; ".join(f"{s['job']} {s['action']}" for s in done) or f"no Job matches {self.job_selector}"

    def restart_serving(self, run: Recovery) -> None:
        with run.step("Restart serving") as step:
            details = []
            for name in self.deployments:
                stamp = restart_rollout(self.kube, name)
                status = wait_for_rollout(self.kube, name, self.rollout_timeout)
                details.append(f"{name} restarted at {stamp}: {status.message}")
            run.report.facts["serving restarted"] = details
            step.detail = "; ".join(details)


def _record_candidate(run: Recovery, restored: RestoredModel) -> list[str]:
    damaged = [a.file for a in restored.damaged]
    run.report.candidate = {"directory": restored.directory, "damaged": damaged,
                            "artifacts": {a.file: {"object_version": a.version_id, "current_ok": a.current_ok,
                                                   "sha256": a.sha256} for a in restored.artifacts}}
    return damaged


def _passed(run: Recovery, stage: str, results: list[CheckResult]) -> bool:
    """Record the checks of ``stage``; whether none of its critical checks failed."""
    run.report.add_checks(stage, results)
    return not run.report.failed_critical(stage)


def _preview(run: Recovery, model: str, version: str, previous: str | None) -> str:
    report = run.report
    failed = report.failed_critical()
    restored = report.candidate or {}
    return "\n".join([
        f"## Promote `{model}` version `{version}` to production?",
        "",
        f"- **Production pointer now**: {previous or 'unset'}",
        f"- **Restored into**: {restored.get('directory')}",
        f"- **Damaged in the bucket (restored from older object versions)**: {', '.join(restored.get('damaged') or []) or 'none'}",
        "",
        *report.checks_markdown(),
        "",
        f"Approving makes the verified object versions current again, points production at `{version}` "
        f"(was `{previous or 'unset'}`) and restarts serving. Rejecting promotes nothing; training stays stopped.",
        "" if not failed else f"**{len(failed)} critical check(s) failed.**",
    ])


@recovery_flow(name="model-corruption-recovery",
      description="Restore a sha256-verified model version, check it on golden inputs, approve, promote, restart serving.")
def model_corruption(
    registry_block: str,
    model: str,
    version: str,
    kube_block: str | None = None,
    training_job_selector: str | None = None,
    delete_training_jobs: bool = False,
    serving_deployments: list[str] | None = None,
    rollout_timeout_seconds: float = 600,
    incident_detected_at: datetime | None = None,
    incident_id: str | None = None,
    approval_policy: ApprovalPolicy = "required",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 3600,
    approval_poll_seconds: float = 5,
    severity: str | None = None,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "ml-models",
    lock_wait_seconds: int = 30,
) -> State:
    """Recover a corrupted model by promoting a verified earlier version.

    Args:
        registry_block: name of the ModelRegistry block (the backup bucket).
        model: model name, as in ``<prefix>/<model>/<version>/``.
        version: the known-good version to restore and promote.
        kube_block: KubernetesTarget block of the namespace running training and serving.
        training_job_selector: label selector of the training Jobs to stop, e.g. 'app=ppo-training'.
        delete_training_jobs: delete the Jobs instead of suspending them.
        serving_deployments: deployments restarted after the promotion so they load the version.
        rollout_timeout_seconds: how long each restarted deployment may take to be ready.
        incident_detected_at: when the corruption was detected (tz-aware); RTO counts from it. Now when empty.
        incident_id: identifies the incident; derived from the inputs when empty.
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the promotion.
        approval_timeout_seconds: how long to wait for approval before giving up without promoting.
        approval_poll_seconds: how often a paused run checks for an answer.
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same model to finish.
    """
    run = Recovery(
        SCENARIO, target=f"{registry_block}/{model}", severity=severity, detected_at=incident_detected_at or utcnow(),
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        recovery_target=f"{model} {version}", incident_id=incident_id,
    )
    report = run.report
    with run:
        # 1. Preflight: plain names, the estate, the incident; then the version's manifest.
        with run.preflight() as step:
            check_name("model", model)
            check_name("version", version)
            if (training_job_selector or serving_deployments) and not kube_block:
                raise InvalidInput("training_job_selector and serving_deployments need kube_block")
            registry = load_block(ModelRegistry, registry_block)
            kube = load_block(KubernetesTarget, kube_block) if kube_block else None
            run.refuse_unsafe_policy(registry_block, registry.environment)
            if kube is not None:
                run.refuse_unsafe_policy(kube_block, kube.environment)
            workloads = Workloads(kube, training_job_selector, delete_training_jobs, tuple(serving_deployments or []),
                                  rollout_timeout_seconds)
            run.assign_incident(incident_id, model, registry_block, version)
            step.detail = f"restore {model} {version}; incident {run.incident_id}"

        with run.step("Preflight: version and manifest") as step:
            manifest = read_model_manifest(registry, model, version)
            previous = read_production_pointer(registry, model)
            report.facts.update({"model": model, "version": version, "production before": previous or "unset",
                                 "artifacts": sorted(manifest.artifacts),
                                 "manifest sha256": hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()})
            step.detail = f"{len(manifest.artifacts)} artifacts; production points to {previous or 'nothing'}"
        was = previous or "nothing"

        with run.locks(f"models-{registry_block}-{model}", wait_seconds=lock_wait_seconds):
            restore_dir = f"{registry.restore_directory.rstrip('/')}/{model}/{version}-{run.incident_id}"
            selector, namespace = workloads.job_selector, kube.namespace if kube else None
            plan = [
                f"download the {len(manifest.artifacts)} artifacts of {model} {version} into {restore_dir}, each from "
                "the newest object version matching the manifest's sha256",
                (f"suspend training Jobs matching {selector!r} in {namespace}" if workloads.training
                 else "no training Jobs to stop (no selector given)"),
                "load the restored model and reproduce its golden outputs",
                run.approval.describe(),
                *([f"delete the suspended training Jobs matching {selector!r} in {namespace}"]
                  if workloads.delete_jobs and workloads.training else []),
                "make the verified object versions current again where the bucket's current object is damaged",
                "check every current object of the version against its manifest's sha256; stop here if one differs",
                f"production pointer {registry.pointer_key(model)}: {previous or 'unset'} -> {version} (compare-and-swap)",
                f"restart {', '.join(workloads.deployments) or 'no deployments'} and wait until ready",
            ]
            if dry_run:
                return run.planned(plan)
            report.plan = plan

            # 1. Restore every artifact from an object version whose sha256 matches the manifest.
            with run.step("Restore and sha256-verify the version") as step:
                restored = restore_model_version(registry, model, version, restore_dir)
                damaged = _record_candidate(run, restored)
                step.detail = (f"{len(restored.artifacts)} artifacts verified into {restored.directory}; "
                               f"damaged in the bucket: {', '.join(damaged) or 'none'}")

            # 2. Suspend the training jobs so they cannot overwrite models again.
            if workloads.training:
                workloads.stop_training(run, delete=False)

            # 3. Verify model functionality on the golden inputs.
            with run.step("Functional check on golden inputs") as step:
                works = _passed(run, "restored", check_model_function(registry, restored))
                step.outcome = "ok" if works else "failed"
                step.detail = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if c.stage == "restored")
            if not works:
                return run.finish("VerificationFailed", f"{model} {version} failed its functional check and was not "
                                  f"promoted; production still points to {was}.", action_items=[
                                      f"choose another version of {model}", "resume training only once a good model serves"])

            # 4. Approval; only then are the training jobs deleted (when asked).
            decision = run.approve(_preview(run, model, version, previous))
            if decision is None or not decision.approved:
                return run.declined(decision, f"Promotion of {model} {version}", f"production still points to {was}",
                                    [f"inspect the restored files in {restored.directory}"])
            if workloads.delete_jobs and workloads.training:
                workloads.stop_training(run, delete=True)

            # 5. Make the verified object versions current again, and check every current object.
            with run.step("Repair the damaged objects") as step:
                repaired = repair_model_objects(registry, restored)
                report.facts["repaired objects"] = repaired or ["none"]
                step.detail = f"{len(repaired)} objects made current again"
            with run.step("Verify the current objects before promotion") as step:
                sound = _passed(run, "repaired", verify_model_objects(registry, model, version))
                step.outcome = "ok" if sound else "failed"
                step.detail = (f"{len(report.failed_critical('repaired'))} of "
                               f"{sum(c.stage == 'repaired' for c in report.checks)} objects differ from the manifest")
            if not sound:
                return run.finish("VerificationFailed", f"The bucket's objects of {model} {version} still differ from "
                                  f"the manifest after the repair; the version was not promoted and production still "
                                  f"points to {was}.", action_items=[f"inspect the object versions of {model} {version}; "
                                                                     f"the verified files are in {restored.directory}"])

            # 6. Promote: flip the production pointer (compare-and-swap).
            with run.step("Promote: flip the production pointer") as step:
                flip = flip_production_pointer(registry, model, version, previous)
                report.promotion = {**flip.as_dict(), "repaired_objects": repaired}
                step.detail = f"{flip.key}: {flip.previous or 'unset'} -> {flip.current}" + (" (already set)" if flip.already else "")

            # 7. Restart serving so it loads the version.
            if workloads.deployments and kube:
                workloads.restart_serving(run)

            # 8. Post-checks: the pointer names the version.
            with run.step("Post-checks") as step:
                now = read_production_pointer(registry, model)
                serves = _passed(run, "production", [CheckResult("production pointer", now == version,
                                                                 f"{registry.pointer_key(model)} = {now}")])
                step.outcome = "ok" if serves else "failed"
                step.detail = f"1 checks, {len(report.failed_critical('production'))} critical failures"
            if not serves:
                return run.finish("PostCheckFailed", f"{model} {version} was promoted but post-checks failed; see "
                                  "Verification Results.")

            run.mark_restored()
            if manifest.created_at is not None:
                report.last_restored_commit = manifest.created_at
                report.rpo_seconds = max(0.0, (run.detected_at - manifest.created_at).total_seconds())
            return run.finish("Recovered", f"Production serves {model} {version} again (was {previous or 'unset'}), "
                              "verified on golden inputs.", action_items=[
                                  f"resume training ({selector}) once the cause of the corruption is fixed"]
                              if workloads.training else [])
