"""Approvals: a paused recovery promotes only on an allowed approver's yes, given from anywhere."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
from prefect.flow_runs import resume_flow_run

from conftest import dr, seed_before_after, sql, start_flow, wait_for_run
from runbook.evidence import load_report


def params_for(name: str, target: datetime, **extra) -> dict:
    params = dict(cluster_block=name, recovery_target=target.isoformat(),
                  incident_detected_at=datetime.now(timezone.utc).isoformat(),
                  approval_policy="required", allowed_approvers=["alice", "bob"],
                  approval_timeout_seconds=120, approval_poll_seconds=0.5, take_backup_after=False)
    params.update(extra)
    return params


def paused(run) -> bool:
    return run.state is not None and run.state.is_paused()


def finished(run) -> bool:
    return run.state is not None and run.state.is_final()


def ledger(layout) -> tuple[int, int]:
    return (int(sql(layout, "SELECT count(*) FROM ledger WHERE note = 'before'")),
            int(sql(layout, "SELECT count(*) FROM ledger WHERE note = 'after'")))


@dataclass
class PausedRecovery:
    """A recovery running in another process, paused for approval."""

    name: str
    block: object
    pg: object
    run_name: str
    proc: subprocess.Popen
    run: object

    def finish(self):
        run = wait_for_run(self.run_name, finished)
        self.proc.wait(timeout=60)
        return run


@pytest.fixture
def paused_recovery(cluster, prefect_api) -> PausedRecovery:
    name, block, pg = cluster
    target = seed_before_after(pg)
    run_name = f"approval-{uuid.uuid4().hex[:8]}"
    proc = start_flow(prefect_api, run_name, params_for(name, target))
    recovery = PausedRecovery(name, block, pg, run_name, proc, wait_for_run(run_name, paused))
    yield recovery
    if proc.poll() is None:
        proc.kill()


def test_approval_from_another_process_promotes(paused_recovery, prefect_api):
    rec = paused_recovery
    assert rec.block.is_fenced()  # writes stopped while waiting
    assert ledger(rec.pg) == (300, 50)  # nothing promoted before the answer

    out = dr(prefect_api, "approve", str(rec.run.id), "--approver", "alice", "--comment", "counts match the ledger")
    assert out.returncode == 0, out.stderr
    run = rec.finish()
    assert run.state.name == "Recovered", rec.proc.stdout.read()
    assert ledger(rec.pg) == (300, 0)
    report = load_report(run.id)
    assert [(a.approver, a.approved, a.comment, a.policy) for a in report.approvals] == [
        ("alice", True, "counts match the ledger", "required")
    ]


def test_rejection_promotes_nothing_and_keeps_the_candidate(paused_recovery, prefect_api):
    rec = paused_recovery
    name, block, pg = rec.name, rec.block, rec.pg
    resume_flow_run(rec.run.id, run_input={"approve": False, "approver": "bob", "comment": "wrong target"})
    run = rec.finish()
    assert run.state.name == "Rejected" and run.state.is_cancelled(), run.state.message
    assert block.promoted_incident() is None
    assert not list(pg.primary_dir.parent.glob("primary.replaced-*"))
    report = load_report(run.id)
    assert os.path.isdir(report.candidate["data_directory"])
    assert report.candidate["data_directory"] in report.summary
    assert block.is_fenced()  # stays fenced until someone decides
    assert dr(prefect_api, "unfence", name).returncode == 0
    assert not block.is_fenced()


def test_approval_timeout_promotes_nothing(cluster, prefect_api):
    name, block, pg = cluster
    target = seed_before_after(pg)
    run_name = f"timeout-{uuid.uuid4().hex[:6]}"
    proc = start_flow(prefect_api, run_name, params_for(name, target, approval_timeout_seconds=3))
    run = wait_for_run(run_name, finished, timeout=180)
    proc.wait(timeout=60)
    assert run.state.name == "ApprovalTimedOut" and run.state.is_failed(), run.state.message
    assert block.promoted_incident() is None
    assert load_report(run.id).outcome == "ApprovalTimedOut"


def test_an_approver_not_allowed_is_refused_and_the_run_stays_paused(paused_recovery, prefect_api):
    rec = paused_recovery
    block, run, run_name = rec.block, rec.run, rec.run_name

    out = dr(prefect_api, "approve", str(run.id), "--approver", "mallory", "--comment", "let me in")
    assert out.returncode == 2
    assert "'mallory'" in out.stderr and "alice" in out.stderr
    assert wait_for_run(run_name, paused).state.is_paused()

    # The same answer through the API (as the UI form sends it) is refused by the flow itself.
    resume_flow_run(run.id, run_input={"approve": True, "approver": "mallory", "comment": "let me in"})
    wait_for_run(run_name, lambda r: paused(r) and r.state.state_details.pause_key == "approval-2")
    assert block.promoted_incident() is None

    resume_flow_run(run.id, run_input={"approve": True, "approver": "bob", "comment": "checked"})
    run = rec.finish()
    assert run.state.name == "Recovered"
    approvals = load_report(run.id).approvals
    assert [(a.approver, a.accepted) for a in approvals] == [("mallory", False), ("bob", True)]


def test_an_empty_or_partial_answer_is_not_an_approval(paused_recovery, prefect_api):
    rec = paused_recovery
    block, run, run_name = rec.block, rec.run, rec.run_name
    out = dr(prefect_api, "approve", str(run.id), "--approver", "alice", "--comment", "  ")
    assert out.returncode == 2 and "--comment" in out.stderr
    for partial in ({"approve": True}, {"approve": True, "approver": "alice", "comment": "   "}):
        with pytest.raises(Exception, match="(?i)required|pattern|match|valid"):  # refused by the server's schema
            resume_flow_run(run.id, run_input=partial)
        assert wait_for_run(run_name, paused).state.is_paused()
    assert block.promoted_incident() is None
    resume_flow_run(run.id, run_input={"approve": False, "approver": "alice", "comment": "cleanup"})
    run = rec.finish()
    assert run.state.name == "Rejected"


def test_one_recovery_per_cluster_is_held_through_the_pause(cluster, prefect_api):
    name, block, pg = cluster
    target = seed_before_after(pg)
    first = f"first-{uuid.uuid4().hex[:6]}"
    proc = start_flow(prefect_api, first, params_for(name, target))
    run = wait_for_run(first, paused)

    second = f"second-{uuid.uuid4().hex[:6]}"
    other = start_flow(prefect_api, second, params_for(name, target, lock_wait_seconds=2,
                                                       incident_detected_at=datetime.now(timezone.utc).isoformat()))
    blocked = wait_for_run(second, finished)
    other.wait(timeout=60)
    assert blocked.state.is_failed()
    assert "another recovery" in blocked.state.message

    resume_flow_run(run.id, run_input={"approve": False, "approver": "alice", "comment": "test done"})
    wait_for_run(first, finished)
    proc.wait(timeout=60)
