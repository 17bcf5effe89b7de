"""What every drill shares: its result row, its checks, and where its report is written."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class DrillResult:
    """One drill's printed row and JSON object (``dr drill ... --json``)."""

    scenario: str
    passed: bool
    rto_seconds: float | None
    rto_objective_seconds: int
    rpo_seconds: float | None
    rpo_objective_seconds: int
    flow_run_id: str | None
    outcome: str
    report: str
    ui_url: str
    checks: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check(name: str, passed: bool, detail: str) -> dict:
    """One named check of a drill, as data."""
    return {"name": name, "passed": bool(passed), "detail": detail}


def save_report(root: Path, flow_run_id: str) -> Path:
    """Write the run's evidence (markdown and JSON) under ``<sandbox>/reports``; return the markdown path."""
    from runbook.evidence import load_report, render_markdown

    report = load_report(flow_run_id)
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / f"{flow_run_id}.md"
    path.write_text(render_markdown(report))
    (reports / f"{flow_run_id}.json").write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    return path
