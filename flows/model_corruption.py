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
from datetime import datetime, timezone

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State

from blocks import RecoveryObjectives
from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.models import ModelRegistry, check_name
from blocks.postgres import CheckResult
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalPolicy, approval_step, check_approval_settings
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from tasks.kubernetes import restart_rollout, stop_training_jobs, wait_for_rollout
from runbook.locks import recovery_lock
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


def _preview(report: RecoveryReport, model: str, version: str, previous: str | None) -> str:
    failed = report.failed_critical()
    restored = report.candidate or {}
    lines = [
        f"## Promote `{model}` version `{version}` to production?",
        "",
        f"- **Production pointer now**: {previous or 'unset'}",
        f"- **Restored into**: {restored.get('directory')}",
        f"- **Damaged in the bucket (restored from older object versions)**: {', '.join(restored.get('damaged') or []) or 'none'}",
        "",
        "| Check | Result | Detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in report.checks]
    lines += [
        "",
        f"Approving makes the verified object versions current again, points production at `{version}` "
        f"(was `{previous or 'unset'}`) and restarts serving. Rejecting promotes nothing; training stays stopped.",
        "" if not failed else f"**{len(failed)} critical check(s) failed.**",
    ]
    return "\n".join(lines)


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
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same model to finish.
    """
    logger = get_run_logger()
    approvers = list(allowed_approvers or [])
    deployments = list(serving_deployments or [])
    started = utcnow()
    detected = incident_detected_at or started
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=f"{registry_block}/{model}",
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None,
        drill=drill, dry_run=dry_run, incident_detected_at=detected, started_at=started,
        recovery_target=f"{model} {version}", rto_objective_seconds=0, rpo_objective_seconds=0,
    )
    try:
        with report.step("Preflight: validate inputs") as step:
            check_parameters()
            if detected.tzinfo is None:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} has no time zone; give a UTC offset")
            if detected > started:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} is in the future")
            check_name("model", model)
            check_name("version", version)
            if incident_id:
                check_name("incident id", incident_id)
            if (training_job_selector or deployments) and not kube_block:
                raise InvalidInput("training_job_selector and serving_deployments need kube_block")
            if training_job_selector is not None and not training_job_selector.strip():
                raise InvalidInput("training_job_selector is empty: it would select every Job in the namespace")
            if rollout_timeout_seconds <= 0:
                raise InvalidInput(f"rollout_timeout_seconds {rollout_timeout_seconds} must be positive")
            check_approval_settings(approval_policy, approvers, approval_timeout_seconds, drill)
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            registry = load_block(ModelRegistry, registry_block)
            kube = load_block(KubernetesTarget, kube_block) if kube_block else None
            environments = {registry.environment} | ({kube.environment} if kube else set())
            if approval_policy == "auto" and "production" in environments:
                raise InvalidInput(f"approval policy 'auto' is refused for {registry_block!r}: production estate")
            digest = hashlib.sha256(f"{registry_block}|{model}|{version}|{detected.isoformat()}".encode()).hexdigest()
            report.incident_id = incident_id or f"{model}-{detected.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{digest[:6]}"
            step.detail = f"restore {model} {version}; incident {report.incident_id}"

        with report.step("Preflight: version and manifest") as step:
            manifest = read_model_manifest(registry, model, version)
            previous = read_production_pointer(registry, model)
            report.facts.update({"model": model, "version": version, "production before": previous or "unset",
                                 "artifacts": sorted(manifest.artifacts),
                                 "manifest sha256": hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()})
            step.detail = f"{len(manifest.artifacts)} artifacts; production points to {previous or 'nothing'}"

        with recovery_lock(f"models-{registry_block}-{model}", lock_wait_seconds, runtime.flow_run.id) as lock:
            logger.info("Holding %s for incident %s", lock, report.incident_id)
            return _recover(report, registry, kube, model, version, manifest, previous, training_job_selector,
                            delete_training_jobs, deployments, rollout_timeout_seconds, approval_policy, approvers,
                            approval_timeout_seconds, approval_poll_seconds, dry_run)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The recovery stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        publish_evidence(report)


def _recover(report: RecoveryReport, registry: ModelRegistry, kube: KubernetesTarget | None, model: str,
             version: str, manifest, previous: str | None, job_selector: str | None, delete_jobs: bool,
             deployments: list[str], rollout_timeout_seconds: float, approval_policy: str, approvers: list[str],
             approval_timeout_seconds: int, approval_poll_seconds: float, dry_run: bool) -> State:
    restore_dir = f"{registry.restore_directory.rstrip('/')}/{model}/{version}-{report.incident_id}"
    report.plan = [
        f"download the {len(manifest.artifacts)} artifacts of {model} {version} into {restore_dir}, each from the "
        "newest object version matching the manifest's sha256",
        (f"suspend training Jobs matching {job_selector!r} in {kube.namespace}"
         if job_selector and kube else "no training Jobs to stop (no selector given)"),
        "load the restored model and reproduce its golden outputs",
        "ask " + (", ".join(approvers) if approval_policy == "required" else "nobody (auto, drill)") + " to approve",
        *([f"delete the suspended training Jobs matching {job_selector!r} in {kube.namespace}"]
          if delete_jobs and job_selector and kube else []),
        "make the verified object versions current again where the bucket's current object is damaged",
        "check every current object of the version against its manifest's sha256; stop here if one differs",
        f"production pointer {registry.pointer_key(model)}: {previous or 'unset'} -> {version} (compare-and-swap)",
        f"restart {', '.join(deployments) or 'no deployments'} and wait until ready",
    ]
    if dry_run:
        report.outcome = "DryRun"
        report.summary = "Dry run: the plan was recorded and nothing was changed."
        return Completed(name="DryRun", message=report.summary)

    with report.step("Restore and sha256-verify the version") as step:
        restored = restore_model_version(registry, model, version, restore_dir)
        damaged = [a.file for a in restored.damaged]
        report.candidate = {"directory": restored.directory, "damaged": damaged,
                            "artifacts": {a.file: {"object_version": a.version_id, "current_ok": a.current_ok,
                                                   "sha256": a.sha256} for a in restored.artifacts}}
        step.detail = (f"{len(restored.artifacts)} artifacts verified into {restored.directory}; "
                       f"damaged in the bucket: {', '.join(damaged) or 'none'}")

    if job_selector and kube:
        with report.step("Suspend training jobs") as step:
            stopped = stop_training_jobs(kube, job_selector, False)
            report.facts["training jobs"] = [f"{s['job']}: {s['action']}" for s in stopped] or ["none found"]
            step.detail = "; ".join(f"{s['job']} {s['action']}" for s in stopped) or f"no Job matches {job_selector}"

    with report.step("Functional check on golden inputs") as step:
        report.add_checks("restored", check_model_function(registry, restored))
        failed = report.failed_critical("restored")
        step.outcome = "ok" if not failed else "failed"
        step.detail = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if c.stage == "restored")
    if report.failed_critical("restored"):
        report.outcome = "VerificationFailed"
        report.summary = (f"{model} {version} failed its functional check and was not promoted; production still "
                          f"points to {previous or 'nothing'}.")
        report.action_items += [f"choose another version of {model}", "resume training only once a good model serves"]
        return Failed(name="VerificationFailed", message=report.summary)

    decision = approval_step(report, approval_policy, _preview(report, model, version, previous), approvers,
                             approval_timeout_seconds, approval_poll_seconds)
    if decision is None or not decision.approved:
        name = "ApprovalTimedOut" if decision is None else "Rejected"
        report.outcome = name
        report.summary = (f"Promotion of {model} {version} was {'not approved in time' if decision is None else 'rejected'}; "
                          f"production still points to {previous or 'nothing'}.")
        report.action_items.append(f"inspect the restored files in {restored.directory}")
        return Failed(name=name, message=report.summary) if decision is None else Cancelled(name=name, message=report.summary)

    if delete_jobs and job_selector and kube:
        with report.step("Delete training jobs") as step:
            deleted = stop_training_jobs(kube, job_selector, True)
            report.facts["training jobs deleted"] = [f"{s['job']}: {s['action']}" for s in deleted] or ["none found"]
            step.detail = "; ".join(f"{s['job']} {s['action']}" for s in deleted) or f"no Job matches {job_selector}"

    with report.step("Repair the damaged objects") as step:
        repaired = repair_model_objects(registry, restored)
        report.facts["repaired objects"] = repaired or ["none"]
        step.detail = f"{len(repaired)} objects made current again"

    with report.step("Verify the current objects before promotion") as step:
        report.add_checks("repaired", verify_model_objects(registry, model, version))
        failed = report.failed_critical("repaired")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(failed)} of {sum(c.stage == 'repaired' for c in report.checks)} objects differ from the manifest"
    if report.failed_critical("repaired"):
        report.outcome = "VerificationFailed"
        report.summary = (f"The bucket's objects of {model} {version} still differ from the manifest after the repair; "
                          f"the version was not promoted and production still points to {previous or 'nothing'}.")
        report.action_items.append(f"inspect the object versions of {model} {version}; the verified files are in "
                                   f"{restored.directory}")
        return Failed(name="VerificationFailed", message=report.summary)

    with report.step("Promote: flip the production pointer") as step:
        flip = flip_production_pointer(registry, model, version, previous)
        report.promotion = {**flip.as_dict(), "repaired_objects": repaired}
        step.detail = (f"{flip.key}: {flip.previous or 'unset'} -> {flip.current}"
                       + (" (already set)" if flip.already else ""))

    if deployments and kube:
        with report.step("Restart serving") as step:
            details = []
            for name in deployments:
                stamp = restart_rollout(kube, name)
                status = wait_for_rollout(kube, name, rollout_timeout_seconds)
                details.append(f"{name} restarted at {stamp}: {status.message}")
            report.facts["serving restarted"] = details
            step.detail = "; ".join(details)

    with report.step("Post-checks") as step:
        now = read_production_pointer(registry, model)
        checks = [CheckResult("production pointer", now == version, f"{registry.pointer_key(model)} = {now}")]
        report.add_checks("production", checks)
        failed = report.failed_critical("production")
        step.outcome = "ok" if not failed else "failed"
        step.detail = f"{len(checks)} checks, {len(failed)} critical failures"
    if report.failed_critical("production"):
        report.outcome = "PostCheckFailed"
        report.summary = f"{model} {version} was promoted but post-checks failed; see Verification Results."
        return Failed(name="PostCheckFailed", message=report.summary)

    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    if manifest.created_at is not None:
        report.last_restored_commit = manifest.created_at
        report.rpo_seconds = max(0.0, (report.incident_detected_at - manifest.created_at).total_seconds())
    if job_selector and kube:
        report.action_items.append(f"resume training ({job_selector}) once the cause of the corruption is fixed")
    report.outcome = "Recovered"
    report.summary = f"Production serves {model} {version} again (was {previous or 'unset'}), verified on golden inputs."
    return Completed(name="Recovered", message=report.summary)

