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
from prefect.states import Completed, Failed, Running

from blocks.errors import InvalidInput
from tasks.evidence import REPORT_KEY
from tasks.kpis import RunRecord, collect_runs, compute_kpis, parse_since, render_kpis

NOW = datetime(2026, 6, 30, 12, 0, tzinfo=timezone.utc)
SINCE = NOW - timedelta(days=30)


def rec(flow_name="database-corruption-recovery", state="COMPLETED", scenario="db-corruption", rto=600.0, rpo=60.0,
        rto_obj=900, rpo_obj=300, drill=False, dry_run=False, outcome="Recovered", days_ago=1) -> RunRecord:
    return RunRecord(flow_run_id=str(uuid.uuid4()), flow_name=flow_name, state_type=state, state_name=outcome or state,
                     started_at=NOW - timedelta(days=days_ago), scenario=scenario, outcome=outcome, drill=drill,
                     dry_run=dry_run, rto_seconds=rto, rto_objective_seconds=rto_obj, rpo_seconds=rpo,
                     rpo_objective_seconds=rpo_obj)


KNOWN = [
    rec(rto=600, rpo=60),                                        # met both
    rec(rto=1200, rpo=60, drill=True),                           # RTO missed
    rec(rto=300, rpo=400),                                       # RPO missed
    rec(state="FAILED", rto=None, rpo=None, outcome="VerificationFailed"),  # failed: meets nothing
    rec(scenario="cache-corruption", rto=30, rpo=0, rto_obj=1800, rpo_obj=0, drill=True),
    rec(dry_run=True, outcome="DryRun", rto=None, rpo=None),     # excluded: dry run
    rec(state="FAILED", outcome="Refused", rto=None, rpo=None),  # excluded: refused input
    rec(days_ago=45),                                            # excluded: outside the window
    rec(flow_name="backup-validation", scenario=None, outcome=None),
    rec(flow_name="backup-validation", scenario=None, outcome=None),
    rec(flow_name="backup-validation", state="FAILED", scenario=None, outcome=None),
    rec(flow_name="restore-test", scenario="restore-test", outcome="Restored"),
]


def test_kpis_from_a_known_set_of_runs():
    k = compute_kpis(KNOWN, SINCE, NOW)
    assert k.recovery_runs == 5 and k.drill_runs == 2
    assert k.rto_compliance == 60.0  # 3 of 5: 600, 300, 30 within objective
    assert k.rpo_compliance == 60.0  # 3 of 5: 60, 60, 0
    assert k.recovery_success_rate == 80.0
    assert k.backup_runs == 4 and k.backup_success_rate == 75.0
    by = {s.scenario: s for s in k.scenarios}
    assert set(by) == {"db-corruption", "cache-corruption"}
    assert (by["db-corruption"].runs, by["db-corruption"].succeeded, by["db-corruption"].mttr_seconds) == (4, 3, 700.0)
    assert by["cache-corruption"].mttr_seconds == 30.0
    text = render_kpis(k)
    assert "| RTO compliance | 60.0 % | >= 95 % |" in text
    assert "| db-corruption | 4 | 3 | 2 | 2 | 11.7 min |" in text


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
    assert (k.recovery_runs, k.recovery_success_rate, k.rto_compliance) == (2, 50.0, 50.0)
    assert (k.backup_runs, k.backup_success_rate) == (1, 100.0)
    assert k.scenarios[0].mttr_seconds == 100.0


def test_dr_kpis_command(prefect_api, tmp_path):
    import json as _json
    import subprocess

    from conftest import subprocess_env

    env = dict(subprocess_env(prefect_api), PREFECT_HOME=str(tmp_path))
    out = subprocess.run([str(Path(sys.executable).parent / "dr"), "kpis", "--since", "1h", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = _json.loads(out.stdout)
    assert {"rto_compliance", "rpo_compliance", "recovery_success_rate", "backup_success_rate", "scenarios"} <= set(data)
