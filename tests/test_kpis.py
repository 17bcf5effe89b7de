"""KPIs from run history: computed from a known set of runs, and read back from the Prefect API."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from datetime import datetime, timedelta, timezone

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.input.actions import create_flow_run_input
from prefect.states import Cancelled, Completed, Failed, Running

from blocks.errors import InvalidInput
from runbook.evidence import REPORT_KEY
from runbook.kpis import RunRecord, collect_runs, compute_kpis, parse_since, render_kpis

NOW = datetime(2026, 6, 30, 12, 0, tzinfo=timezone.utc)
SINCE = NOW - timedelta(days=30)


def rec(flow_name="database-corruption-recovery", state="COMPLETED", scenario="db-corruption", rto=600.0, rpo=60.0,
        rto_obj=900, rpo_obj=300, drill=False, dry_run=False, outcome="Recovered", days_ago=1,
        run_kind=None) -> RunRecord:
    return RunRecord(flow_run_id=str(uuid.uuid4()), flow_name=flow_name, state_type=state, state_name=outcome or state,
                     started_at=NOW - timedelta(days=days_ago), scenario=scenario, outcome=outcome, drill=drill,
                     dry_run=dry_run, rto_seconds=rto, rto_objective_seconds=rto_obj, rpo_seconds=rpo,
                     rpo_objective_seconds=rpo_obj, run_kind=run_kind)


KNOWN = [
    rec(rto=600, rpo=60),                                        # met both
    rec(rto=1200, rpo=60, drill=True),                           # RTO missed
    rec(rto=300, rpo=400),                                       # RPO missed
    rec(state="FAILED", rto=None, rpo=None, outcome="VerificationFailed"),  # failed: meets nothing
    rec(scenario="cache-corruption", rto=30, rpo=0, rto_obj=1800, rpo_obj=0, drill=True),
    rec(dry_run=True, outcome="DryRun", rto=None, rpo=None),     # excluded: dry run
    rec(state="FAILED", outcome="Refused", rto=None, rpo=None),  # excluded: refused input
    rec(flow_name="object-storage-recovery", scenario="object-storage-loss", outcome="ReplicaComplete", rto=None,
        rpo=None, run_kind="assurance"),                         # excluded: scheduled replica check
    rec(state="CANCELLED", outcome="Rejected", rto=None, rpo=None),  # a recovery, not successful, not in RTO/RPO
    rec(days_ago=45),                                            # excluded: outside the window
    rec(flow_name="backup-validation", scenario=None, outcome=None),
    rec(flow_name="backup-validation", scenario=None, outcome=None),
    rec(flow_name="backup-validation", state="FAILED", scenario=None, outcome=None),
    rec(flow_name="restore-test", scenario="restore-test", outcome="Restored"),
]


def test_kpis_from_a_known_set_of_runs():
    k = compute_kpis(KNOWN, SINCE, NOW)
    assert k.recovery_runs == 6 and k.drill_runs == 2  # not the dry run, refused, assurance run or restore test
    assert (k.restored_runs, k.not_approved_runs) == (4, 1)
    assert k.rto_compliance == 75.0  # 3 of the 4 restored runs: 600, 300, 30 within objective
    assert k.rpo_compliance == 75.0  # 3 of 4: 60, 60, 0
    assert k.recovery_success_rate == 66.7  # 4 of 6: the failed and the rejected run did not recover
    assert k.backup_runs == 4 and k.backup_success_rate == 75.0
    by = {s.scenario: s for s in k.scenarios}
    assert set(by) == {"db-corruption", "cache-corruption"}  # the assurance run adds no scenario
    db = by["db-corruption"]
    assert (db.runs, db.succeeded, db.restored, db.rto_met, db.mttr_seconds) == (5, 3, 3, 2, 700.0)
    assert by["cache-corruption"].mttr_seconds == 30.0
    text = render_kpis(k)
    assert "| RTO compliance | 75.0 % | >= 95 % |" in text
    assert "| db-corruption | 5 | 3 | 3 | 2 | 2 | 11.7 min |" in text
    assert "1 not approved" in text and "Rejected and approval-timed-out runs" in text


def test_assurance_and_not_approved_runs_alone():
    k = compute_kpis([rec(outcome="ReplicaComplete", rto=None, rpo=None, run_kind="assurance"),
                      rec(state="FAILED", outcome="ApprovalTimedOut", rto=None, rpo=None)], SINCE, NOW)
    assert (k.recovery_runs, k.not_approved_runs, k.restored_runs) == (1, 1, 0)
    assert k.recovery_success_rate == 0.0
    assert k.rto_compliance is None and k.rpo_compliance is None  # nothing restored: no RTO/RPO to judge


def test_empty_window_reports_no_rate():
    k = compute_kpis([], SINCE, NOW)
    assert k.rto_compliance is None and k.backup_success_rate is None
    assert "n/a (no runs)" in render_kpis(k)


def test_window_parsing():
    assert parse_since("30d", NOW) == NOW - timedelta(days=30)
    assert parse_since("12h", NOW) == NOW - timedelta(hours=12)
    assert parse_since("2026-06-01T00:00:00+00:00", NOW) == datetime(2026, 6, 1, tzinfo=timezone.utc)
    for bad in ("30", "0d", "yesterday", "2026-06-01T00:00:00"):
        with pytest.raises(InvalidInput):
            parse_since(bad, NOW)


@flow(name="database-corruption-recovery")
def _recovery_stand_in() -> None:
    """Only its name is used: runs are created through the API with their reports."""


@flow(name="backup-validation")
def _validation_stand_in() -> None:
    """Only its name is used."""


def test_kpis_read_from_the_run_history(prefect_api):
    tag = f"kpi-{uuid.uuid4().hex[:8]}"
    reports = [  # (flow, final state, report)
        (_recovery_stand_in, Completed(), dict(scenario="db-corruption", outcome="Recovered", rto_seconds=100.0,
                                              rto_objective_seconds=900, rpo_seconds=2.0, rpo_objective_seconds=300)),
        (_recovery_stand_in, Failed(), dict(scenario="db-corruption", outcome="Failed", rto_seconds=None,
                                           rto_objective_seconds=900, rpo_seconds=None, rpo_objective_seconds=300)),
        (_validation_stand_in, Completed(), None),
    ]
    with get_client(sync_client=True) as client:
        for fl, final, report in reports:
            run = client.create_flow_run(fl, tags=[tag], state=Running())
            if report is not None:
                create_flow_run_input(REPORT_KEY, {"drill": True, "dry_run": False, **report}, flow_run_id=run.id)
            client.set_flow_run_state(run.id, final, force=True)
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    records = collect_runs(since, tags=[tag])
    assert len(records) == 3
    k = compute_kpis(records, since, datetime.now(timezone.utc))
    assert (k.recovery_runs, k.restored_runs, k.recovery_success_rate) == (2, 1, 50.0)
    assert k.rto_compliance == 100.0  # the failed run never restored service: it counts in the success rate only
    assert (k.backup_runs, k.backup_success_rate) == (1, 100.0)
    assert k.scenarios[0].mttr_seconds == 100.0


def _create_runs(tag: str, runs) -> None:
    with get_client(sync_client=True) as client:
        for fl, final, report in runs:
            run = client.create_flow_run(fl, tags=[tag], state=Running())
            if report is not None:
                create_flow_run_input(REPORT_KEY, report, flow_run_id=run.id)
            client.set_flow_run_state(run.id, final, force=True)


def test_dr_kpis_command(prefect_api, tmp_path):
    import json as _json
    import subprocess

    from conftest import subprocess_env

    scenario = f"kpi-cli-{uuid.uuid4().hex[:8]}"
    base = dict(scenario=scenario, drill=True, dry_run=False, rto_objective_seconds=900, rpo_objective_seconds=300)
    _create_runs(scenario, [
        (_recovery_stand_in, Completed(), dict(base, outcome="Recovered", rto_seconds=120.0, rpo_seconds=5.0)),
        (_recovery_stand_in, Completed(), dict(base, outcome="Recovered", rto_seconds=2000.0, rpo_seconds=5.0)),
        (_recovery_stand_in, Cancelled(name="Rejected"), dict(base, outcome="Rejected")),
        (_recovery_stand_in, Completed(), dict(base, outcome="ReplicaComplete", facts={"run_kind": "assurance"})),
    ])
    env = dict(subprocess_env(prefect_api), PREFECT_HOME=str(tmp_path))
    out = subprocess.run([str(Path(sys.executable).parent / "dr"), "kpis", "--since", "1h", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = _json.loads(out.stdout)
    mine = [s for s in data["scenarios"] if s["scenario"] == scenario]
    assert mine == [dict(scenario=scenario, runs=3, succeeded=2, restored=2, rto_met=1, rpo_met=2, mttr_seconds=1060.0)]
    since = datetime.now(timezone.utc) - timedelta(hours=1)
    expected = compute_kpis(collect_runs(since), since, datetime.now(timezone.utc)).as_dict()
    for key in ("recovery_runs", "restored_runs", "not_approved_runs", "rto_compliance", "rpo_compliance",
                "recovery_success_rate", "backup_runs", "backup_success_rate"):
        assert data[key] == expected[key], key
    assert data["not_approved_runs"] >= 1 and data["recovery_runs"] >= 3
