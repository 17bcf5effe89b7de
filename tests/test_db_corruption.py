"""The database-corruption recovery against real PostgreSQL, pgBackRest and a Prefect server."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from blocks import VerificationQuery
from conftest import seed_before_after, sql, start_flow, wait_for_run
from flows.db_corruption import db_corruption
from runbook.evidence import load_report, render_markdown


def run(name: str, **params):
    params.setdefault("approval_policy", "auto")
    params.setdefault("drill", True)
    params.setdefault("incident_detected_at", datetime.now(timezone.utc))
    params.setdefault("take_backup_after", False)
    return db_corruption(cluster_block=name, return_state=True, **params)


def ledger(layout) -> tuple[int, int]:
    before = int(sql(layout, "SELECT count(*) FROM ledger WHERE note = 'before'"))
    after = int(sql(layout, "SELECT count(*) FROM ledger WHERE note = 'after'"))
    return before, after


def test_pitr_to_a_time_returns_exactly_the_rows_committed_before_it(cluster):
    name, block, pg = cluster
    target = seed_before_after(pg)
    sql(pg, "DELETE FROM ledger WHERE id % 2 = 0")  # the destructive transaction
    state = run(name, recovery_target=target.isoformat(), row_count_tables=["ledger"],
                verification_queries=[VerificationQuery(name="ledger", sql="SELECT count(*) FROM ledger", expected="300")])
    assert state.name == "Recovered", state.message
    assert ledger(pg) == (300, 0)
    report = load_report(state.state_details.flow_run_id)
    assert report.rto_seconds is not None and report.rpo_seconds is not None
    assert report.last_restored_commit is not None and report.last_restored_commit <= target
    assert os.path.isdir(report.promotion["old_primary_aside"])  # kept aside, not deleted
    assert [a.policy for a in report.approvals] == ["auto (drill)"]
    # A replica cloned from the promoted primary must not inherit the restore's target and promote itself.
    auto_conf = (pg.primary_dir / "postgresql.auto.conf").read_text()
    assert "recovery_target" not in auto_conf and "restore_command" not in auto_conf, auto_conf


def test_pitr_to_a_named_restore_point(cluster):
    name, block, pg = cluster
    sql(pg, "CREATE TABLE ledger (id int PRIMARY KEY, note text NOT NULL)")
    sql(pg, "INSERT INTO ledger SELECT g, 'before' FROM generate_series(1, 120) g")
    sql(pg, "SELECT pg_create_restore_point('before_incident')")
    sql(pg, "INSERT INTO ledger SELECT g, 'after' FROM generate_series(121, 130) g")
    newer = block.backup("full")  # a backup after the point: the restore must use the one before it
    state = run(name, recovery_target="before_incident")
    assert state.name == "Recovered", state.message
    assert ledger(pg) == (120, 0)
    assert load_report(state.state_details.flow_run_id).candidate["backup_set"] != newer.label


def test_dry_run_records_the_plan_and_changes_nothing(cluster):
    name, block, pg = cluster
    target = seed_before_after(pg)
    state = run(name, recovery_target=target.isoformat(), dry_run=True)
    assert state.name == "DryRun"
    report = load_report(state.state_details.flow_run_id)
    assert any("restore" in step for step in report.plan) and any("move" in step for step in report.plan)
    assert not block.is_fenced()
    assert ledger(pg) == (300, 50)
    assert not os.path.exists(block.candidate_directory(report.incident_id))


def test_failed_verification_does_not_promote(cluster):
    name, block, pg = cluster
    target = seed_before_after(pg)
    state = run(name, recovery_target=target.isoformat(),
                verification_queries=[VerificationQuery(name="wrong", sql="SELECT count(*) FROM ledger", expected="999")])
    assert state.name == "VerificationFailed"
    assert ledger(pg) == (300, 50)  # the primary was not replaced
    report = load_report(state.state_details.flow_run_id)
    assert os.path.isdir(report.candidate["data_directory"])  # kept for inspection
    assert any(c.name == "sentinel: wrong" and not c.passed for c in report.checks)


@pytest.mark.parametrize(
    "case",
    ["naive", "future", "before-earliest", "unknown-restore-point", "unknown-block", "unreachable", "auto-outside-drill",
     "poll-zero", "lock-wait-negative", "timeout-huge", "incident-id-newline"],
)
def test_bad_inputs_are_refused_before_any_change(cluster, case):
    name, block, pg = cluster
    seed_before_after(pg)
    now = datetime.now(timezone.utc)
    params = dict(recovery_target=(now - timedelta(seconds=1)).isoformat())
    expected = None
    if case == "naive":
        params["recovery_target"] = expected = "2026-01-01T10:00:00"
    elif case == "future":
        params["recovery_target"] = expected = (now + timedelta(hours=1)).isoformat()
    elif case == "before-earliest":
        params["recovery_target"] = expected = (now - timedelta(days=3)).isoformat()
    elif case == "unknown-restore-point":
        params["recovery_target"] = expected = "no_such_point"
    elif case == "unknown-block":
        name = expected = "no-such-cluster"
    elif case == "unreachable":
        block.primary.port = pg.primary_port + 1 if pg.primary_port < 65535 else 1024
        name = "unreachable-" + name
        block.save(name)
        expected = f"127.0.0.1:{block.primary.port}"
    elif case == "auto-outside-drill":
        params["drill"] = False
        expected = "'auto'"
    elif case == "poll-zero":
        params["approval_poll_seconds"] = 0
        expected = "approval_poll_seconds=0 (out of range); expected a number of seconds from 0.1 to 60"
    elif case == "lock-wait-negative":
        params["lock_wait_seconds"] = -1
        expected = "lock_wait_seconds=-1 (out of range)"
    elif case == "timeout-huge":
        params["approval_timeout_seconds"] = 10**12
        expected = "approval_timeout_seconds=1000000000000 (out of range)"
    elif case == "incident-id-newline":
        params["incident_id"] = "inc-42\n"
        expected = "incident_id='inc-42\\n' (malformed)"
    state = run(name, **params)
    assert state.is_failed()
    message = str(state.message) + str(load_report(state.state_details.flow_run_id).summary)
    assert expected in message, message
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Refused"
    sql(pg, "INSERT INTO ledger VALUES (1000, 'still writable')")  # not fenced
    assert ledger(pg) == (300, 50)
    assert not any(pg.recovery_dir.iterdir())  # nothing restored


def test_incident_detected_in_the_future_or_naive_is_refused(cluster):
    name, block, pg = cluster
    target = seed_before_after(pg)
    state = run(name, recovery_target=target.isoformat(), incident_detected_at=datetime(2026, 1, 1, 12, 0))
    assert state.is_failed() and "incident_detected_at" in load_report(state.state_details.flow_run_id).summary
    future = datetime.now(timezone.utc) + timedelta(hours=2)
    state = run(name, recovery_target=target.isoformat(), incident_detected_at=future)
    assert state.is_failed() and "in the future" in load_report(state.state_details.flow_run_id).summary


def test_rerun_after_a_crash_after_promotion_does_not_promote_twice(cluster, prefect_api):
    name, block, pg = cluster
    target = seed_before_after(pg)
    detected = datetime.now(timezone.utc)
    params = dict(cluster_block=name, recovery_target=target.isoformat(), incident_detected_at=detected.isoformat(),
                  approval_policy="auto", drill=True, take_backup_after=True)
    proc = start_flow(prefect_api, "crash-after-promotion", params)
    deadline = time.monotonic() + 120
    while (block.promoted_incident() is None) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert block.promoted_incident() is not None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)  # the worker dies right after promotion
    proc.wait(timeout=30)
    killed = wait_for_run("crash-after-promotion", lambda r: r.state is not None)
    with get_client(sync_client=True) as client:  # what a heartbeat automation or the operator does
        client.set_flow_run_state(killed.id, Crashed(message="worker killed"), force=True)
    asides = sorted(p.name for p in pg.primary_dir.parent.glob("primary.replaced-*"))
    assert len(asides) == 1

    params.pop("cluster_block")
    params["incident_detected_at"] = detected
    params["lock_wait_seconds"] = 5
    state = db_corruption(cluster_block=name, return_state=True, **params)
    assert state.name == "Recovered", state.message
    report = load_report(state.state_details.flow_run_id)
    assert report.promotion["already_promoted"] is True
    assert [s.step for s in report.steps if "Restore" in s.step or "Promote" in s.step] == []
    assert sorted(p.name for p in pg.primary_dir.parent.glob("primary.replaced-*")) == asides
    assert ledger(pg) == (300, 0)


def test_report_is_rebuilt_from_the_api_alone(cluster, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from conftest import dr

    name, block, pg = cluster
    target = seed_before_after(pg)
    state = run(name, recovery_target=target.isoformat())
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_type = {a.type: a for a in artifacts}
    assert {"markdown", "table"} <= set(by_type)
    table = by_type["table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["step"] for row in rows][-3:] == ["Promote the restored instance", "Post-checks at the endpoint",
                                                   "Full backup of the recovered primary"][: len(rows[-3:])] or \
        "Promote the restored instance" in [row["step"] for row in rows]
    assert {"step", "start", "end", "outcome"} <= set(rows[0])
    out = dr(prefect_api, "report", str(run_id), "--format", "md")
    assert out.returncode == 0, out.stderr
    assert out.stdout == by_type["markdown"].data
    for heading in ("## Incident Summary", "## Timeline", "## Recovery Objectives", "## Approvals", "## Verification Results"):
        assert heading in out.stdout
    as_json = dr(prefect_api, "report", str(run_id), "--format", "json")
    assert as_json.returncode == 0 and '"outcome": "Recovered"' in as_json.stdout
    assert render_markdown(load_report(run_id)) == out.stdout
    for evidence in (out.stdout, as_json.stdout, by_type["markdown"].data, str(by_type["table"].data)):
        assert pg.password not in evidence and "s3cret" not in evidence


def test_a_quiet_database_with_no_commit_after_the_target_recovers(cluster):
    name, block, pg = cluster
    time.sleep(1.1)
    sql(pg, "CREATE TABLE ledger (id int PRIMARY KEY, note text NOT NULL)")
    sql(pg, "INSERT INTO ledger SELECT g, 'before' FROM generate_series(1, 10) g")
    time.sleep(0.5)
    target = datetime.now(timezone.utc)  # nothing is committed after this
    state = run(name, recovery_target=target.isoformat())
    assert state.name == "Recovered", state.message
    assert ledger(pg) == (10, 0)


def test_a_second_recovery_follows_the_timeline_of_the_first(cluster):
    """After a recovery, the archive holds the new timeline: a later PITR lands on it, not on the old branch."""
    name, block, pg = cluster
    target = seed_before_after(pg)
    assert run(name, recovery_target=target.isoformat()).name == "Recovered"
    time.sleep(1.1)
    sql(pg, "INSERT INTO ledger SELECT g, 'second' FROM generate_series(1001, 1040) g")
    time.sleep(0.5)
    second_target = datetime.now(timezone.utc)
    time.sleep(0.5)
    sql(pg, "DELETE FROM ledger")
    state = run(name, recovery_target=second_target.isoformat())
    assert state.name == "Recovered", state.message
    assert ledger(pg) == (300, 0)
    assert int(sql(pg, "SELECT count(*) FROM ledger WHERE note = 'second'")) == 40


@pytest.mark.parametrize("interrupted_after", ["journal", "old-primary-moved-aside", "candidate-moved-in"])
def test_a_promotion_interrupted_at_any_step_is_finished_by_a_rerun(cluster, interrupted_after):
    name, block, pg = cluster
    target = seed_before_after(pg)
    detected = datetime.now(timezone.utc)
    params = dict(recovery_target=target.isoformat(), incident_detected_at=detected)
    # A first run that was approved and then lost its worker at the given step of the promotion.
    dry = run(name, dry_run=True, **params)
    incident = load_report(dry.state_details.flow_run_id).incident_id
    block.archive_wal()
    block.fence()
    candidate = block.restore_beside(incident, target)
    marker = block.read_marker(candidate.data_directory)
    primary, aside = str(pg.primary_dir), f"{pg.primary_dir}.replaced-{incident}"
    block._write_marker(candidate.data_directory, {**marker, "state": "promoting", "old_primary_aside": aside})
    if interrupted_after in ("old-primary-moved-aside", "candidate-moved-in"):
        block.stop_instance(candidate.data_directory)
        block.stop_instance(primary)
        os.rename(primary, aside)
    if interrupted_after == "candidate-moved-in":
        os.rename(candidate.data_directory, primary)

    state = run(name, **params)
    assert state.name == "Recovered", state.message
    report = load_report(state.state_details.flow_run_id)
    assert any(s.step == "Resume: finish the interrupted promotion" for s in report.steps)
    assert not any(s.step == "Restore beside the primary" for s in report.steps)
    assert ledger(pg) == (300, 0)
    assert os.path.isdir(aside) and block.promoted_incident()["incident_id"] == incident
    assert report.rpo_seconds is not None


def test_fencing_keeps_application_roles_out_until_unfenced(cluster):
    import psycopg

    name, block, pg = cluster
    sql(pg, "CREATE ROLE app LOGIN PASSWORD 'app-pass'")
    sql(pg, "ALTER DATABASE postgres CONNECTION LIMIT 40")
    dsn = f"host=127.0.0.1 port={pg.primary_port} dbname=postgres user=app password=app-pass connect_timeout=5"
    session = psycopg.connect(dsn)
    assert block.fence() >= 1
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")  # its session was ended
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        psycopg.connect(dsn)  # and it cannot come back
    assert block.fence() == 0  # idempotent
    block.unfence()
    with psycopg.connect(dsn) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)
    assert sql(pg, "SELECT datconnlimit FROM pg_database WHERE datname = 'postgres'") == "40"


def test_an_incident_id_that_is_not_a_plain_name_is_refused(cluster):
    name, block, pg = cluster
    target = seed_before_after(pg)
    for bad in ("../../etc", "/var/lib/postgresql/data", "a b"):
        state = run(name, recovery_target=target.isoformat(), incident_id=bad)
        assert state.is_failed()
        assert repr(bad) in load_report(state.state_details.flow_run_id).summary
    assert not block.is_fenced()


def test_auto_approval_is_refused_for_a_production_cluster(cluster):
    name, block, pg = cluster
    target = seed_before_after(pg)
    block.environment = "production"
    block.save(name, overwrite=True)
    state = run(name, recovery_target=target.isoformat())
    assert state.is_failed() and "production" in load_report(state.state_details.flow_run_id).summary
    assert not block.is_fenced()
