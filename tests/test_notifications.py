"""Notifications: the plans' templates, posted in Slack's webhook shape to a local receiver, for approval
requests and failed drills; and the drill's seed-004 test report."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from prefect import flow
from prefect.variables import Variable

from blocks.errors import InvalidInput
from blocks.notify import slack_compatible_webhook
from sandbox.drillkit import DrillResult
from runbook.approval import request_approval
from tasks.notify import DEFAULT_NOTIFIER_VARIABLE, initial_alert, load_notifier, resolved, status_update

AT = datetime(2026, 3, 1, 9, 30, tzinfo=timezone.utc)


def test_templates_follow_the_plan():
    alert = initial_alert("P1", "payments", "database corrupted", AT, commander="alice")
    assert alert.splitlines() == [
        "\U0001f6a8 INCIDENT ALERT - P1", "Service: payments", "Impact: database corrupted",
        "Start Time: 2026-03-01 09:30:00 UTC", "Incident Commander: alice", "Status Page: -",
        "War Room: #incident-202603010930",
    ]
    update = status_update("In Progress", ["fenced", "restored"], "approve", eta="10 min", at=AT)
    assert update.splitlines()[0] == "\U0001f4ca INCIDENT UPDATE - 2026-03-01 09:30:00 UTC"
    assert "Actions Taken: fenced; restored" in update and "ETA: 10 min" in update
    done = resolved("12 min", "bad migration", ["PITR"], at=AT)
    assert done.splitlines()[0] == "\u2705 INCIDENT RESOLVED - 2026-03-01 09:30:00 UTC" and "Duration: 12 min" in done


def test_webhook_url_is_kept_secret_and_validated(prefect_api):
    block = slack_compatible_webhook("https://hooks.slack.com/services/T0/B0/SECRET")
    assert "SECRET" not in block.url and "SECRET" not in json.dumps(block.model_dump(mode="json"))
    with pytest.raises(InvalidInput, match="http"):
        slack_compatible_webhook("hooks.slack.com/services/x")
    with pytest.raises(InvalidInput, match="<block-type-slug>/<block-name>"):
        load_notifier("just-a-name")


@flow(name="approval-notification-probe")
def _ask(notifier: str | None):
    decision, answers = request_approval("## Promote the restored database?\n\nevidence", ["alice"], timeout_seconds=2,
                                         poll_interval_seconds=0.5, notifier=notifier)
    return decision, answers


def test_every_approval_request_is_announced(notifier, webhook, prefect_api):
    decision, answers = _ask(notifier)
    assert decision is None and answers == []  # nobody answered: a timeout, never an approval
    text = webhook.wait_for(lambda t: "INCIDENT UPDATE" in t)[0]
    assert "Current Status: Awaiting approval: Promote the restored database?" in text
    assert "alice approves or rejects with Resume at http" in text and "/runs/flow-run/" in text
    assert "ETA: approval deadline" in text


def test_the_default_notifier_comes_from_a_variable(notifier, webhook, prefect_api):
    Variable.set(DEFAULT_NOTIFIER_VARIABLE, notifier, overwrite=True)
    try:
        _ask(None)
    finally:
        Variable.unset(DEFAULT_NOTIFIER_VARIABLE)
    assert webhook.wait_for(lambda t: "Awaiting approval" in t)


def _result(scenario: str, passed: bool) -> DrillResult:
    return DrillResult(scenario=scenario, passed=passed, rto_seconds=42.0, rto_objective_seconds=900, rpo_seconds=1.5,
                       rpo_objective_seconds=300, flow_run_id=None, outcome="Recovered" if passed else "VerificationFailed",
                       report="/tmp/report.md", ui_url="",
                       checks=[{"name": "rows back", "passed": passed, "detail": "500 of 500" if passed else "12 of 500"}])


def test_a_failed_drill_alerts_and_reports_in_the_template_shape(notifier, webhook, prefect_api, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.dr_drill import dr_drill
    from sandbox import drills

    monkeypatch.setattr(drills, "DRILLS", {"good": lambda rows: _result("good", True),
                                           "bad": lambda rows: _result("bad", False)})
    with pytest.raises(InvalidInput, match="unknown drill"):
        dr_drill(scenario="nope")
    state = dr_drill(scenario="all", rows=1000, notifier=notifier, return_state=True)
    assert state.is_failed() and state.name == "DrillFailed"
    assert [r["scenario"] for r in state.result(raise_on_failure=False)] == ["good", "bad"]
    text = webhook.wait_for(lambda t: "INCIDENT ALERT" in t)[0]
    assert "drill failed: bad: VerificationFailed" in text
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    body = next(a for a in arts if a.key == "dr-drill-test-report").data
    reports = json.loads(body.removeprefix("```json\n").removesuffix("\n```\n"))
    bad = reports[1]
    assert set(bad) >= {"test_id", "test_date", "test_type", "scenario", "results"}
    assert bad["results"]["success_criteria_met"] is False and bad["results"]["issues_found"] == 1
    assert bad["results"]["rto_achieved"] == "42.0 seconds" and bad["results"]["rpo_achieved"] == "1.5 seconds"
    assert bad["results"]["recommendations"] == ["fix: rows back (12 of 500)"]
    assert reports[0]["results"]["success_criteria_met"] is True


@flow(name="notification-probe")
def _deliver(notifier: str) -> bool:
    from tasks.notify import deliver

    return deliver(notifier, "probe message")


def test_a_refused_webhook_logs_no_url(prefect_api):
    import threading
    import time
    import uuid
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from sandbox.paths import free_port

    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    token = f"XOXB{uuid.uuid4().hex}"
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        name = f"hook-{uuid.uuid4().hex[:8]}"
        slack_compatible_webhook(f"http://127.0.0.1:{server.server_port}/services/T0/B0/{token}").save(name)
        state = _deliver(f"custom-webhook/{name}", return_state=True)
    finally:
        server.shutdown()
        server.server_close()
    assert state.result() is False  # not delivered, and not fatal
    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    deadline, messages = time.monotonic() + 15, []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            messages = [log.message for log in client.read_logs(log_filter=flt)]
        if any("Notification through" in m for m in messages):
            break
        time.sleep(0.25)
    warning = next(m for m in messages if "Notification through" in m)
    assert f"custom-webhook/{name}" in warning and "HTTP 404" in warning
    assert not any(token in m or "/services/T0/B0" in m for m in messages)
