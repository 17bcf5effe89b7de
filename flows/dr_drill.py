"""Drill (scheduled): inject a fault into the sandbox or staging estate, recover, measure, report.

Runbook (continuity plans: "Testing & Validation", "Test Execution Process", "Test Report Template"):
  1. prepare: seed the estate the scenario's recovery protects
  2. inject the fault and run the recovery flow (a subflow of this run) with the drill approval policy
  3. measure RTO and RPO against the objectives and check the outcome against what was committed
  4. clean up what the drill left, so the next drill starts from a healthy estate
  5. emit the test report (JSON, in the template's shape); a failed drill alerts on-call
"""

from __future__ import annotations

import json

from prefect import get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed, State

from blocks.errors import InvalidInput
from runbook.alerts import alert_on_call
from runbook.evidence import utcnow
from runbook.parameters import check_parameters, recovery_flow

TEST_TYPE = "disaster_recovery_drill"


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    if seconds < 120:
        return f"{seconds:.1f} seconds"
    if seconds < 7200:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds / 3600:.1f} hours"


def drill_test_report(result: dict, test_id: str, date: str) -> dict:
    """One drill's result in the shape of the continuity plan's test report template."""
    failed = [c for c in result.get("checks", []) if not c.get("passed")]
    recommendations = [f"fix: {c['name']} ({c['detail']})" for c in failed]
    if result.get("rto_seconds") is not None and result["rto_seconds"] > result.get("rto_objective_seconds", 0):
        recommendations.append("shorten the recovery: RTO objective missed")
    if result.get("rpo_seconds") is not None and result["rpo_seconds"] > result.get("rpo_objective_seconds", 0):
        recommendations.append("back up or archive more often: RPO objective missed")
    return {
        "test_id": test_id,
        "test_date": date,
        "test_type": TEST_TYPE,
        "scenario": result.get("scenario"),
        "results": {
            "rto_achieved": _human(result.get("rto_seconds")),
            "rto_objective": _human(result.get("rto_objective_seconds")),
            "rpo_achieved": _human(result.get("rpo_seconds")),
            "rpo_objective": _human(result.get("rpo_objective_seconds")),
            "success_criteria_met": bool(result.get("passed")),
            "issues_found": len(failed),
            "recommendations": recommendations,
        },
        "recovery_flow_run_id": result.get("flow_run_id"),
        "outcome": result.get("outcome"),
        "report": result.get("report"),
    }


@recovery_flow(name="dr-drill", description="Inject a fault into the sandbox, run its recovery as a subflow, measure RTO/RPO, report.")
def dr_drill(scenario: str = "all", rows: int = 100_000, notifier: str | None = None) -> State:
    """Run one registered drill, or every one with ``scenario='all'``.

    Args:
        scenario: a drill registered in ``sandbox.drills.DRILLS``, or 'all'.
        rows: rows the drill seeds before injecting the fault (at least 1000).
        notifier: notification block ('<block-type-slug>/<name>') alerted on a failed drill;
            defaults to the one the ``dr_notifier`` variable names.

    Returns:
        Completed("Passed") or Failed("DrillFailed"), carrying each drill's result as a dict.
    """
    from sandbox import drills

    logger = get_run_logger()
    check_parameters()
    names = list(drills.DRILLS) if scenario == "all" else [scenario]
    unknown = [n for n in names if n not in drills.DRILLS]
    if unknown:
        raise InvalidInput(f"unknown drill {unknown[0]!r}; known: {', '.join(drills.DRILLS)}, all")
    started = utcnow()
    run_id = str(runtime.flow_run.id) if runtime.flow_run.id else "local"
    results, reports = [], []
    for index, name in enumerate(names, 1):
        logger.info("Drill %s: injecting the fault and recovering", name)
        try:
            result = drills.DRILLS[name](rows=rows).as_dict()
        except Exception as exc:  # a drill that crashes is a failed drill, reported like any other
            logger.error("Drill %s raised: %s", name, exc)
            result = {"scenario": name, "passed": False, "rto_seconds": None, "rto_objective_seconds": 0,
                      "rpo_seconds": None, "rpo_objective_seconds": 0, "flow_run_id": None,
                      "outcome": "DrillError", "report": "", "ui_url": "",
                      "checks": [{"name": "drill ran to the end", "passed": False, "detail": f"{type(exc).__name__}: {exc}"}],
                      "extra": {}}
        results.append(result)
        reports.append(drill_test_report(result, f"DRT-{started:%Y-%m-%d}-{run_id[:8]}-{index:02d}", f"{started:%Y-%m-%d}"))
    body = json.dumps(reports if len(reports) > 1 else reports[0], indent=2)
    create_markdown_artifact(markdown=f"```json\n{body}\n```\n", key="dr-drill-test-report",
                             description=f"Drill test report: {', '.join(names)}")
    failed = [r for r in results if not r["passed"]]
    if failed:
        summary = "; ".join(f"{r['scenario']}: {r['outcome']}" for r in failed)
        alert_on_call(notifier, f"DR drill {scenario}", f"drill failed: {summary}", started)
        return Failed(name="DrillFailed", message=f"{len(failed)} of {len(results)} drills failed: {summary}", data=results)
    return Completed(name="Passed", message=f"{len(results)} drills passed", data=results)
