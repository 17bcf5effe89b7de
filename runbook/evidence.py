"""Evidence of a recovery run: the timeline, the incident report, and their export from the Prefect API.

Each run leaves a timeline table artifact, a markdown report artifact in the shape of the
incident report template (summary, timeline, RTO/RPO against objectives, approvals,
verification results) and the same report as JSON under the flow-run input key
``dr-report``, so ``dr report`` can rebuild it later from the API alone.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator
from uuid import UUID

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.input.actions import create_flow_run_input, delete_flow_run_input, read_flow_run_input
from pydantic import BaseModel, Field

from blocks.errors import RecoveryError
from tasks._policy import policy

REPORT_KEY = "dr-report"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StepRecord(BaseModel):
    step: str
    start: datetime
    end: datetime | None = None
    outcome: str = "running"
    detail: str = ""


class ApprovalRecord(BaseModel):
    approver: str
    approved: bool
    comment: str
    at: datetime
    policy: str = Field(description="'required' (a person approved) or 'auto (drill)'.")
    accepted: bool = Field(default=True, description="False when the approver was not allowed and was refused.")
    details: dict = Field(default_factory=dict, description="Further fields of the decision form, e.g. an accepted data loss.")


class CheckRecord(BaseModel):
    name: str
    passed: bool
    detail: str
    critical: bool = True
    stage: str = ""


# Steps that only read the estate (a private local copy aside): a refusal during them leaves it as it was.
READ_ONLY_STEPS = ("Preflight", "Declare", "Health evidence", "Assess the", "Plan ", "Rank the", "Measure", "Inspect",
                   "Identify", "Read the applications", "Replication lag", "Compare the replica", "Database evidence",
                   "Restore and sha256-verify")


class RecoveryReport(BaseModel):
    """Everything an auditor needs about one recovery run."""

    scenario: str
    incident_id: str
    target: str
    flow_run_id: str | None = None
    outcome: str = "Running"
    summary: str = ""
    severity: str = "P1"
    drill: bool = False
    dry_run: bool = False
    incident_detected_at: datetime
    started_at: datetime
    ended_at: datetime | None = None
    service_restored_at: datetime | None = None
    recovery_target: str = ""
    recoverable_window: dict | None = None
    last_restored_commit: datetime | None = None
    rto_seconds: float | None = None
    rto_objective_seconds: int
    rpo_seconds: float | None = None
    rpo_objective_seconds: int
    candidate: dict | None = None
    promotion: dict | None = None
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    checks: list[CheckRecord] = Field(default_factory=list)
    steps: list[StepRecord] = Field(default_factory=list)
    plan: list[str] = Field(default_factory=list)
    facts: dict = Field(
        default_factory=dict,
        description="Scenario-specific figures for the Resolution section, e.g. containment time or a manifest hash.",
    )
    action_items: list[str] = Field(default_factory=list)

    @property
    def rto_met(self) -> bool | None:
        return None if self.rto_seconds is None else self.rto_seconds <= self.rto_objective_seconds

    @property
    def rpo_met(self) -> bool | None:
        return None if self.rpo_seconds is None else self.rpo_seconds <= self.rpo_objective_seconds

    def add_checks(self, stage: str, results) -> None:
        for r in results:
            self.checks.append(CheckRecord(name=r.name, passed=r.passed, detail=r.detail, critical=r.critical, stage=stage))

    def failed_critical(self, stage: str | None = None) -> list[CheckRecord]:
        return [c for c in self.checks if c.critical and not c.passed and (stage is None or c.stage == stage)]

    @contextmanager
    def step(self, name: str) -> Iterator[StepRecord]:
        """Record one step of the runbook: start, end and outcome (``failed: ...`` when it raises)."""
        record = StepRecord(step=name, start=utcnow())
        self.steps.append(record)
        try:
            yield record
        except BaseException as exc:
            record.end = utcnow()
            record.outcome = "failed"
            record.detail = record.detail or _one_line(exc)
            raise
        record.end = utcnow()
        if record.outcome == "running":
            record.outcome = "ok"

    def changed_anything(self) -> bool:
        """Whether a step that may change the estate has started (every step but the read-only ones)."""
        return any(not s.step.startswith(READ_ONLY_STEPS) for s in self.steps)

    def outcome_for(self, exc: BaseException) -> str:
        """The outcome of a run that stopped on ``exc``: Refused only when it stopped before any change."""
        from blocks.errors import InvalidInput

        return "Refused" if isinstance(exc, InvalidInput) and not self.changed_anything() else "Failed"

    def checks_markdown(self, with_stage: bool = False) -> list[str]:
        """The checks so far as a markdown table, for an approval preview."""
        if with_stage:
            head = ["| Check | Stage | Result | Detail |", "|---|---|---|---|"]
            return head + [f"| {c.name} | {c.stage} | {'pass' if c.passed else 'FAIL'} | {_cell(c.detail)} |"
                           for c in self.checks]
        head = ["| Check | Result | Detail |", "|---|---|---|"]
        return head + [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {_cell(c.detail)} |" for c in self.checks]

    def timeline_rows(self) -> list[dict]:
        return [
            {
                "step": s.step,
                "start": _t(s.start),
                "end": _t(s.end),
                "outcome": s.outcome,
                "detail": s.detail,
            }
            for s in self.steps
        ]


def _one_line(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return " ".join(text.split())[:500]


def _t(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(round(value), 60)
    return f"{value:.1f} s" if value < 60 else f"{minutes} min {seconds} s ({value:.0f} s)"


def _met(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[value]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: RecoveryReport) -> str:
    """The incident report, in the shape of the continuity plan's template."""
    end = report.service_restored_at or report.ended_at
    aware = report.incident_detected_at.tzinfo is not None  # a refused naive input is still reported
    duration = (end - report.incident_detected_at).total_seconds() if end and aware else None
    lines = [
        f"# Incident Report: {report.scenario} ({report.incident_id})",
        "",
        "## Incident Summary",
        f"- **Incident ID**: {report.incident_id}",
        f"- **Start Time**: {_t(report.incident_detected_at)}",
        f"- **End Time**: {_t(end)}",
        f"- **Duration**: {_secs(duration)}",
        f"- **Severity**: {report.severity}",
        f"- **Outcome**: {report.outcome}",
        f"- **Run type**: {'drill' if report.drill else 'incident'}{' (dry run: nothing changed)' if report.dry_run else ''}",
        f"- **Flow run**: {report.flow_run_id or '-'}",
        "",
        report.summary or "",
        "",
        "## Impact Assessment",
        f"- **Services Affected**: {report.target}",
        f"- **Data Loss**: {_secs(report.rpo_seconds)} of commits"
        + (f" (last restored commit {_t(report.last_restored_commit)})" if report.last_restored_commit else ""),
        "",
        "## Timeline",
        "| Step | Start | End | Outcome | Detail |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(r['step'])} | {r['start']} | {r['end']} | {_cell(r['outcome'])} | {_cell(r['detail'])} |"
        for r in report.timeline_rows()
    ]
    lines += [
        "",
        "## Recovery Objectives",
        "| Objective | Achieved | Target | Met |",
        "|---|---|---|---|",
        f"| RTO (detected -> service restored) | {_secs(report.rto_seconds)} | {_secs(report.rto_objective_seconds)} | {_met(report.rto_met)} |",
        f"| RPO (data-loss window) | {_secs(report.rpo_seconds)} | {_secs(report.rpo_objective_seconds)} | {_met(report.rpo_met)} |",
        "",
        "## Resolution",
        f"- **Recovery target**: {report.recovery_target or '-'}",
    ]
    if report.recoverable_window:
        w = report.recoverable_window
        lines.append(f"- **Recoverable window**: {w.get('earliest')} .. {w.get('latest')}")
    if report.candidate:
        c = report.candidate
        lines.append(
            f"- **Restored instance**: {c.get('data_directory')} on port {c.get('port')} (backup set {c.get('backup_set')})"
        )
    if report.promotion:
        p = report.promotion
        lines.append(
            f"- **Promotion**: {p.get('endpoint')} served from {p.get('data_directory')}; old primary kept at "
            f"{p.get('old_primary_aside')}" + (" (already promoted earlier; not repeated)" if p.get("already_promoted") else "")
        )
    for name, value in report.facts.items():
        shown = ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
        lines.append(f"- **{_cell(str(name))}**: {_cell(str(shown))}")
    if report.plan:
        lines += ["", "### Plan" if report.dry_run else "### Changes made"]
        lines += [f"{i}. {_cell(item)}" for i, item in enumerate(report.plan, 1)]
    lines += ["", "## Approvals"]
    if report.approvals:
        lines += ["| Approver | Decision | Time | Comment | Policy |", "|---|---|---|---|---|"]
        for a in report.approvals:
            decision = ("approved" if a.approved else "rejected") if a.accepted else "refused: not an allowed approver"
            lines.append(f"| {_cell(a.approver)} | {decision} | {_t(a.at)} | {_cell(a.comment)} | {a.policy} |")
    else:
        lines.append("No approval was recorded.")
    lines += ["", "## Verification Results"]
    if report.checks:
        lines += ["| Check | Stage | Critical | Result | Detail |", "|---|---|---|---|---|"]
        for c in report.checks:
            lines.append(
                f"| {_cell(c.name)} | {c.stage} | {'yes' if c.critical else 'no'} | "
                f"{'pass' if c.passed else 'FAIL'} | {_cell(c.detail)} |"
            )
    else:
        lines.append("No verification ran.")
    lines += ["", "## Action Items"]
    lines += [f"- [ ] {_cell(item)}" for item in report.action_items] or ["- none"]
    return "\n".join(lines) + "\n"


@task(name="publish-evidence", **policy(timeout_seconds=120))
def publish_evidence(report: RecoveryReport) -> str:
    """Write the timeline and report artifacts and the JSON report of this flow run; returns the markdown."""
    markdown = render_markdown(report)
    slug = report.scenario
    create_table_artifact(
        table=report.timeline_rows(), key=f"{slug}-timeline", description=f"Timeline of {report.incident_id}"
    )
    create_markdown_artifact(markdown=markdown, key=f"{slug}-report", description=f"Incident report {report.incident_id}")
    if read_flow_run_input(REPORT_KEY) is not None:  # a retried publish replaces its own earlier copy
        delete_flow_run_input(REPORT_KEY)
    create_flow_run_input(REPORT_KEY, report.model_dump(mode="json"))
    return markdown


def load_report(flow_run_id: UUID | str) -> RecoveryReport:
    """The report a run published, read back from the Prefect API."""
    value = read_flow_run_input(REPORT_KEY, flow_run_id=UUID(str(flow_run_id)))
    if value is None:
        raise RecoveryError(f"flow run {flow_run_id} has no recovery report (key {REPORT_KEY!r})")
    return RecoveryReport.model_validate(value)
