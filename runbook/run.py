"""One recovery run: the machinery every recovery runbook shares, written once.

A flow builds a :class:`Recovery` from its flat parameters (the UI form) and reads as its runbook::

    run = Recovery(SCENARIO, target=cluster_block, detected_at=incident_detected_at, approval=Approval(...), ...)
    with run:                                   # evidence is published however the run ends
        with run.preflight() as step:           # parameter bounds, aware times, approval settings, objectives
            cluster = load_block(PostgresCluster, cluster_block)
            run.refuse_unsafe_policy(cluster_block, cluster.environment)
            run.assign_incident(incident_id, cluster_block, recovery_target)
        with run.locks(cluster_block, wait_seconds=lock_wait_seconds):
            ...                                 # the numbered steps, each ``with run.step(...)``
            return run.finish("Recovered", "The database ... serves applications again.")

The outcome of a run becomes its Prefect state in one place (:func:`state_for`): a rejection is
Cancelled, an outcome that left the target short of recovered is Failed, the rest are Completed.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

from prefect import get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Completed, Failed, State

from blocks import RecoveryObjectives
from blocks.errors import InvalidInput
from blocks.inputs import refuse_future, require_aware
from blocks.loading import load_block
from blocks.routing import normalize_severity
from runbook.approval import ApprovalDecision, ApprovalPolicy, approval_step, check_approval_settings
from runbook.evidence import ApprovalRecord, RecoveryReport, StepRecord, publish_evidence, utcnow
from runbook.locks import recovery_lock
from runbook.parameters import check_parameters

__all__ = ["Approval", "ApprovalPolicy", "Recovery", "incident_key", "refuse_future", "require_aware", "state_for"]

# Outcomes that leave the target short of what the run set out to do; a rejection is Cancelled.
FAILED_OUTCOMES = frozenset({
    "Failed", "Refused", "ApprovalTimedOut", "VerificationFailed", "PostCheckFailed", "HealthCheckFailed",
    "RolloutNotReady", "ReplicaIncomplete", "EvidenceNotPreserved", "HardeningFailed", "BackupValidationFailed",
    "DrillFailed", "RestoreTestFailed", "LagAboveRpo", "UnexpectedPrimary", "NoCandidate", "OutageNotConfirmed",
    "DrDatabaseDown", "DrDatabaseOffTimeline", "SplitBrainRisk", "SplitBrain", "NotFailedOver", "PrimaryRegionUnhealthy",
})
CANCELLED_OUTCOMES = frozenset({"Rejected"})

# The severity of a scenario's incident when the trigger does not say (P0 outage or data loss .. P3 minor).
DEFAULT_SEVERITY = {
    "db-corruption": "P1", "db-failover": "P1", "regional-failover": "P0", "regional-failback": "P2",
    "security-breach": "P0", "model-corruption": "P2", "vector-db": "P2", "object-storage": "P2", "cache": "P3",
    "app-rollback": "P1", "restore-test": "P2",
}


def state_for(outcome: str, message: str) -> State:
    """The Prefect state a run ends in for ``outcome``."""
    if outcome in CANCELLED_OUTCOMES:
        return Cancelled(name=outcome, message=message)
    if outcome in FAILED_OUTCOMES:
        return Failed(name=outcome, message=message)
    return Completed(name=outcome, message=message)


def incident_key(name: str, detected_at: datetime, *parts: object) -> str:
    """A stable incident id: a re-run of the same incident finds the work of the earlier run.

    ``name-YYYYmmddTHHMMSSZ-xxxxxx``, the digest over ``name``, the detection time and ``parts``.
    """
    detected = detected_at.astimezone(timezone.utc)
    text = "|".join([name, detected.isoformat(), *(_canonical(p) for p in parts)])
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80] or "incident"
    return f"{slug}-{detected:%Y%m%dT%H%M%SZ}-{digest}"


def _canonical(part: object) -> str:
    if isinstance(part, datetime) and part.tzinfo is not None:
        return part.astimezone(timezone.utc).isoformat()
    return str(part)


INCIDENT_TAG = "dr-incident:"  # every run of one incident carries it: the review finds them by it
INCIDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Approval:
    """How the irreversible step of a run is approved: the four approval parameters as one value.

    ``policy`` is 'required' (a named approver from ``approvers``), 'auto' (drills only, recorded as
    such) or, where a flow allows it for a reversible step, 'none' (the trigger is the decision).
    """

    policy: str = "required"
    approvers: tuple[str, ...] = ()
    timeout_seconds: int = 3600
    poll_seconds: float = 5
    allowed_policies: tuple[str, ...] = field(default=("required", "auto"))

    @classmethod
    def of(cls, policy: str, approvers: list[str] | None, timeout_seconds: int, poll_seconds: float = 5,
           allowed_policies: tuple[str, ...] = ("required", "auto")) -> "Approval":
        return cls(policy, tuple(a for a in (approvers or []) if a.strip()), timeout_seconds, poll_seconds,
                   allowed_policies)

    def check(self, drill: bool) -> None:
        """Refuse settings that could let an irreversible step through unchecked."""
        if self.policy not in self.allowed_policies:
            shown = ", ".join(repr(p) for p in self.allowed_policies)
            raise InvalidInput(f"approval_policy={self.policy!r} is not one of {shown}")
        if self.policy != "none":
            check_approval_settings(self.policy, list(self.approvers), self.timeout_seconds, drill)

    def describe(self) -> str:
        """Who decides, for the plan."""
        if self.policy == "required":
            return "ask " + ", ".join(self.approvers) + " to approve"
        return {"auto": "approve automatically (drill policy 'auto')",
                "none": "no approval: the operator's trigger is the decision (policy 'none')"}[self.policy]


class Recovery:
    """One recovery run: report, preflight, incident id, locks, approval, evidence and final state."""

    def __init__(
        self,
        scenario: str,
        *,
        target: str,
        detected_at: datetime,
        approval: Approval | None = None,
        drill: bool = False,
        dry_run: bool = False,
        objectives_block: str = "default",
        business_function: str | None = None,
        recovery_target: str = "",
        severity: str | None = None,
        incident_id: str | None = None,
    ) -> None:
        self.scenario = scenario
        self.approval = approval
        self.objectives_block = objectives_block
        self.business_function = business_function
        self.started_at = utcnow()
        self.report = RecoveryReport(
            scenario=scenario, incident_id=incident_id or "unassigned", target=target,
            flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None,
            severity=DEFAULT_SEVERITY.get(scenario, "P1"),
            drill=drill, dry_run=dry_run, incident_detected_at=detected_at, started_at=self.started_at,
            recovery_target=recovery_target, rto_objective_seconds=0, rpo_objective_seconds=0,
        )
        self.objective = None
        self._severity = severity

    # The run as a whole ---------------------------------------------------------------------------

    def __enter__(self) -> "Recovery":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.report.outcome = self.report.outcome_for(exc)
            self.report.summary = self.report.summary or f"The recovery stopped: {exc}"
        self.report.ended_at = utcnow()
        publish_evidence(self.report)
        return False

    @property
    def drill(self) -> bool:
        return self.report.drill

    @property
    def dry_run(self) -> bool:
        return self.report.dry_run

    @property
    def incident_id(self) -> str:
        return self.report.incident_id

    @property
    def detected_at(self) -> datetime:
        return self.report.incident_detected_at

    def step(self, name: str):
        """Record one numbered step of the runbook (see :meth:`RecoveryReport.step`)."""
        return self.report.step(name)

    @contextmanager
    def preflight(self, name: str = "Preflight: validate inputs") -> Iterator[StepRecord]:
        """The shared preflight, then the flow's own checks inside the same recorded step.

        Checks every parameter against its stated range, the detection time (aware, not in the future),
        the approval settings, and loads the objectives the run is measured against.
        """
        with self.report.step(name) as step:
            check_parameters()
            if self._severity:
                self.report.severity = normalize_severity(self._severity)
            self._tag_run()
            require_aware("incident_detected_at", self.detected_at)
            refuse_future("incident_detected_at", self.detected_at, self.started_at)
            if self.approval is not None:
                self.approval.check(self.drill)
            if self.business_function is not None:
                self.load_objectives()
            yield step
            if not step.detail:
                step.detail = f"incident {self.incident_id}"

    def tags(self) -> list[str]:
        """The flow run's tags that server-side automations route on: severity, scenario, drill."""
        tags = [f"dr-severity:{self.report.severity}", f"dr-scenario:{self.scenario}"]
        if self.report.incident_id != "unassigned":
            tags.append(f"{INCIDENT_TAG}{self.report.incident_id}")
        return tags + (["dr-drill"] if self.drill else [])

    def _tag_run(self) -> None:
        flow_run_id = runtime.flow_run.id
        if not flow_run_id:
            return
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run_id).tags or []
            wanted = [t for t in self.tags() if t not in current]
            stale = [t for t in current if t.startswith("dr-severity:") and t not in self.tags()]
            if wanted or stale:
                client.update_flow_run(flow_run_id, tags=[t for t in current if t not in stale] + wanted)

    def load_objectives(self) -> None:
        """The RTO and RPO objectives of the business function (built-in defaults for 'default')."""
        objectives = load_block(RecoveryObjectives, self.objectives_block,
                                default=RecoveryObjectives() if self.objectives_block == "default" else None)
        objective = objectives.for_function(self.business_function)
        self.objective = objective
        self.report.rto_objective_seconds = objective.rto_seconds
        self.report.rpo_objective_seconds = objective.rpo_seconds

    def refuse_unsafe_policy(self, block_name: str, environment: str, reversible: bool = False) -> None:
        """'auto' approval never acts on a production target; nor does 'none', unless the step is reversible."""
        policy = self.approval.policy if self.approval is not None else None
        unsafe = ("auto",) if reversible else ("auto", "none")
        if policy in unsafe and environment == "production":
            hint = "" if policy == "auto" else "; use 'required' with named approvers"
            raise InvalidInput(f"approval policy {policy!r} is refused for {block_name!r}: its environment is "
                               f"production{hint}")

    def assign_incident(self, given: str | None, name: str, *parts: object) -> str:
        """The incident id: the one given (a plain name), else one derived from the inputs."""
        if given:
            if not INCIDENT_ID.fullmatch(given) or ".." in given:
                raise InvalidInput(f"incident_id={given!r} is not a plain name: expected letters, digits, '.', '_' "
                                   "or '-', at most 128 characters, starting with a letter or digit")
            self.report.incident_id = given
        else:
            self.report.incident_id = incident_key(name, self.detected_at, *parts)
        self._tag_run()
        return self.report.incident_id

    @contextmanager
    def locks(self, *targets: str, wait_seconds: float) -> Iterator[list[str]]:
        """Hold the recovery lock of every target (in the order given) for the rest of the run."""
        with ExitStack() as stack:
            held = [stack.enter_context(recovery_lock(t, wait_seconds, runtime.flow_run.id)) for t in targets]
            if held:
                get_run_logger().info("Holding %s for incident %s", ", ".join(held), self.incident_id)
            yield held

    # Ending ---------------------------------------------------------------------------------------

    def finish(self, outcome: str, summary: str, *, action_items: list[str] | None = None) -> State:
        """Record the outcome and summary; the state the flow returns."""
        self.report.outcome = outcome
        self.report.summary = summary
        self.report.action_items += list(action_items or [])
        if outcome in FAILED_OUTCOMES or outcome in CANCELLED_OUTCOMES:
            get_run_logger().warning(summary)
        return state_for(outcome, summary)

    def planned(self, plan: list[str], summary: str = "Dry run: the plan was recorded and nothing was changed.") -> State:
        """Record the plan; the DryRun state a dry run returns here (the caller returns it)."""
        self.report.plan = list(plan)
        return self.finish("DryRun", summary)

    def mark_restored(self, at: datetime | None = None) -> None:
        """Service is restored now: the RTO counts from detection to this moment."""
        self.report.service_restored_at = at or utcnow()
        self.report.rto_seconds = (self.report.service_restored_at - self.detected_at).total_seconds()

    # Approval -------------------------------------------------------------------------------------

    def approve(self, preview_markdown: str, decision_model: type[ApprovalDecision] = ApprovalDecision,
                ) -> ApprovalRecord | None:
        """The runbook's approval step under this run's approval settings; None when the deadline passed."""
        a = self.approval
        if a is None:
            raise RuntimeError(f"{self.scenario}: this run has no approval settings")
        return approval_step(self.report, a.policy, preview_markdown, list(a.approvers), a.timeout_seconds,
                             a.poll_seconds, decision_model=decision_model)

    def declined(self, decision: ApprovalRecord | None, what: str, kept: str = "nothing was changed",
                 action_items: list[str] | None = None) -> State:
        """End a run whose irreversible step was rejected or not approved in time."""
        timed_out = decision is None
        outcome = "ApprovalTimedOut" if timed_out else "Rejected"
        verdict = "not approved in time" if timed_out else f"rejected by {decision.approver}"
        return self.finish(outcome, f"{what} was {verdict}; {kept}.", action_items=action_items)
