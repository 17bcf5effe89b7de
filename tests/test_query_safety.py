"""Check queries (sentinel, verification, row counts, smoke) and the post-checks of application access,
against real PostgreSQL: one statement, read-only, bounded, checked before any change."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

import pytest

from blocks import VerificationQuery
from blocks.errors import InvalidInput
from conftest import seed_before_after, sql
from flows.db_corruption import db_corruption
from runbook.evidence import load_report


def run(name: str, **params):
    params.setdefault("approval_policy", "auto")
    params.setdefault("drill", True)
    params.setdefault("incident_detected_at", datetime.now(timezone.utc))
    params.setdefault("take_backup_after", False)
    return db_corruption(cluster_block=name, return_state=True, **params)


def people(pg) -> None:
    sql(pg, "CREATE TABLE people (id int PRIMARY KEY, email text NOT NULL)")
    sql(pg, "INSERT INTO people SELECT g, 'user' || g || CASE WHEN g <= 7 THEN '@corp' ELSE '@example.org' END "
            "FROM generate_series(1, 20) g")
    sql(pg, "CREATE SEQUENCE tickets")


def sentinel(block, text: str, expected: str | None = None):
    return block.run_sentinel(VerificationQuery(name="q", sql=text, expected=expected))


def test_percent_signs_are_ordinary_characters(cluster):
    name, block, pg = cluster
    people(pg)
    assert sentinel(block, "SELECT count(*) FROM people WHERE email LIKE '%@corp'", "7").passed
    assert sentinel(block, "SELECT count(*) FROM people WHERE id % 2 = 0", "10").passed
    assert block.query_refusal("SELECT count(*) FROM people WHERE email LIKE '%@corp' AND id % 2 = 1") is None


@pytest.mark.parametrize("text", ["SELECT 1; DROP TABLE people", "SELECT 1; DROP TABLE people;",
                                  "SELECT 1 /* ; */ ; DROP TABLE people", "SELECT ';'; DROP TABLE people --"])
def test_a_second_statement_is_refused_and_never_runs(cluster, text):
    name, block, pg = cluster
    people(pg)
    result = sentinel(block, text)
    assert not result.passed and "multiple commands" in result.detail, result.detail
    assert "more than one statement" in block.query_refusal(text)
    assert sql(pg, "SELECT count(*) FROM people") == "20"  # the table survives


def test_writes_are_refused_by_the_read_only_transaction(cluster):
    name, block, pg = cluster
    people(pg)
    block.query_role = None  # even as the superuser, the transaction itself refuses the write
    delete = "WITH gone AS (DELETE FROM people RETURNING id) SELECT count(*) FROM gone"
    result = sentinel(block, delete)
    assert not result.passed and "read-only transaction" in result.detail, result.detail
    result = sentinel(block, "SELECT nextval('tickets')")
    assert not result.passed and "read-only transaction" in result.detail, result.detail
    assert sql(pg, "SELECT count(*) FROM people") == "20"
    assert sql(pg, "SELECT is_called FROM tickets") == "f"  # the sequence never moved
    # Planned before the fence: a data-modifying statement is refused without being run.
    assert "writes or locks rows" in block.query_refusal(delete)
    assert "writes or locks rows" in block.query_refusal("SELECT id FROM people FOR UPDATE")
    assert "0 columns" in block.query_refusal("DELETE FROM people")


def test_queries_run_as_a_role_that_may_only_read(cluster):
    name, block, pg = cluster
    people(pg)
    assert block.query_role == "pg_read_all_data"
    assert sentinel(block, "SELECT count(*) FROM people", "20").passed
    result = sentinel(block, "SELECT pg_read_file('postgresql.auto.conf')")
    assert not result.passed and "permission denied" in result.detail, result.detail
    assert "permission denied" in block.query_refusal("SELECT pg_read_file('postgresql.auto.conf')")


def test_a_slow_query_stops_at_the_statement_timeout(cluster):
    name, block, pg = cluster
    block.query_timeout_seconds = 1
    started = time.monotonic()
    result = sentinel(block, "SELECT count(*) FROM pg_sleep(30)")
    assert time.monotonic() - started < 10
    assert not result.passed and "statement timeout of 1 s" in result.detail, result.detail
    with pytest.raises(Exception, match="statement timeout"):
        block.read_only_value("SELECT count(*) FROM pg_sleep(30)")


def test_row_counts_are_read_only_and_refuse_bad_names(cluster):
    name, block, pg = cluster
    people(pg)
    assert block.row_count("people") == 20 and block.row_count("public.people") == 20
    with pytest.raises(InvalidInput, match="no_such_table"):
        block.row_count("no_such_table")
    assert "does not exist" in block.table_refusal("no_such_table")
    assert "not a table name" in block.table_refusal("a..b")
    assert block.table_refusal("people") is None


def _untouched(block, pg) -> dict:
    """What must not change when a run is refused: fencing, timeline, the data directory, the postmaster."""
    return {"fenced": block.is_fenced(),
            "timeline": sql(pg, "SELECT timeline_id FROM pg_control_checkpoint()"),
            "inode": os.stat(pg.primary_dir).st_ino,
            "started": sql(pg, "SELECT pg_postmaster_start_time()"),
            "recovery dir": sorted(os.listdir(pg.recovery_dir))}


@pytest.mark.parametrize("case", ["two-statements", "write", "missing-table", "unknown-column", "unknown-database",
                                  "bad-table-name", "unknown-role"])
def test_bad_queries_and_names_are_refused_before_the_fence(cluster, case):
    name, block, pg = cluster
    target = seed_before_after(pg)
    params: dict = {"recovery_target": target.isoformat(), "row_count_tables": ["ledger"]}
    good = VerificationQuery(name="ledger", sql="SELECT count(*) FROM ledger", expected="300")
    params["verification_queries"] = [good]
    if case == "two-statements":
        expected = "SELECT 1; DROP TABLE ledger"
        params["verification_queries"] = [good, VerificationQuery(name="evil", sql=expected)]
    elif case == "write":
        expected = "DELETE FROM ledger RETURNING 1"
        params["verification_queries"] = [VerificationQuery(name="w", sql=expected)]
    elif case == "missing-table":
        expected = "no_such_table"
        params["row_count_tables"] = ["ledger", expected]
    elif case == "unknown-column":
        expected = "SELECT count(nope) FROM ledger"
        params["verification_queries"] = [VerificationQuery(name="col", sql=expected)]
    elif case == "unknown-database":
        expected = "no_such_db"
        params["verification_queries"] = [VerificationQuery(name="db", sql="SELECT 1", database=expected)]
    elif case == "bad-table-name":
        expected = "x..y"
        params["row_count_tables"] = [expected]
    else:
        expected = "no_such_app"
        block.application_roles = [expected]
        name = name + "-roles"
        block.save(name)
    before = _untouched(block, pg)
    state = run(name, **params)
    assert state.is_failed()
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Refused", report.summary
    assert repr(expected) in report.summary, report.summary
    assert not any(s.step == "Fence writes" for s in report.steps)
    assert _untouched(block, pg) == before  # not fenced, same timeline, data directory and postmaster, no candidate
    assert int(sql(pg, "SELECT count(*) FROM ledger")) == 350
    sql(pg, "INSERT INTO ledger VALUES (1000, 'still writable')")


def test_sentinels_with_percent_signs_pass_a_whole_recovery_and_the_app_role_is_checked(cluster):
    name, block, pg = cluster
    sql(pg, "CREATE ROLE app LOGIN PASSWORD 'app-pass'")
    sql(pg, "CREATE TABLE ledger (id int PRIMARY KEY, note text NOT NULL)")
    sql(pg, "GRANT SELECT, INSERT ON ledger TO app")  # before the target: the restored instance has it
    target = seed_before_after(pg)
    queries = [VerificationQuery(name="odd ids", sql="SELECT count(*) FROM ledger WHERE id % 2 = 1", expected="150"),
               VerificationQuery(name="notes", sql="SELECT count(*) FROM ledger WHERE note LIKE 'bef%'", expected="300")]
    state = run(name, recovery_target=target.isoformat(), verification_queries=queries, row_count_tables=["ledger"])
    assert state.name == "Recovered", state.message
    checks = {c.name: c for c in load_report(state.state_details.flow_run_id).checks}
    assert checks["sentinel: odd ids"].passed and checks["sentinel: notes"].passed
    assert checks["application role app can connect and write"].passed, checks
    assert checks["databases accept connections"].passed


def test_an_endpoint_the_app_role_cannot_use_ends_post_check_failed(cluster):
    name, block, pg = cluster
    sql(pg, "CREATE ROLE app LOGIN PASSWORD 'app-pass'")
    sql(pg, "ALTER ROLE app CONNECTION LIMIT 0")  # restored with it: the application cannot connect afterwards
    sql(pg, "CREATE TABLE ledger (id int PRIMARY KEY, note text NOT NULL)")
    sql(pg, "GRANT INSERT ON ledger TO app")
    target = seed_before_after(pg)
    state = run(name, recovery_target=target.isoformat())
    assert state.name == "PostCheckFailed", state.message
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "PostCheckFailed"
    check = next(c for c in report.checks if c.name == "application role app can connect and write")
    assert not check.passed and "may open no more connections (limit 0" in check.detail, check.detail
    assert block.is_reachable() and not block.is_fenced()


def test_the_write_check_follows_the_role_and_its_settings(cluster):
    name, block, pg = cluster
    people(pg)
    sql(pg, "CREATE ROLE app LOGIN PASSWORD 'app-pass'")
    sql(pg, "CREATE ROLE reader LOGIN PASSWORD 'reader-pass'")
    sql(pg, "GRANT INSERT ON people TO app")
    assert block.application_role_names() == ["app"]  # reader may write nothing: not an application role
    by_name = {c.name: c for c in block.application_access()}
    assert by_name["application role app can connect and write"].passed
    sql(pg, "ALTER ROLE app SET default_transaction_read_only = on")
    detail = {c.name: c for c in block.application_access()}["application role app can connect and write"]
    assert not detail.passed and "read-only transaction" in detail.detail, detail
    sql(pg, "ALTER ROLE app RESET default_transaction_read_only")
    block.fence()
    failed = {c.name: c for c in block.application_access() if not c.passed}
    assert {"databases accept connections", "application role app can connect and write"} <= set(failed)
    block.unfence()
    assert all(c.passed for c in block.application_access())
    block.application_roles = ["reader"]
    detail = block.application_access()[-1]
    assert not detail.passed and "may insert into or delete from no table" in detail.detail
    assert sql(pg, "SELECT count(*) FROM people") == "20"
