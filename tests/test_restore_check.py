"""Restore check (the restore-test flow): the latest backup restores into a scratch instance that matches the source, and the
scratch instance is always removed, also when the restore fails."""

from __future__ import annotations

import pytest
from prefect.logging import disable_run_logger

from blocks import VerificationQuery
from blocks.errors import InvalidInput
from conftest import sql
from flows.restore_check import restore_check
from tasks.checklist import check_database_connectivity
from runbook.evidence import load_report

pytestmark = pytest.mark.timeout(120)


def leftovers(pg) -> list[str]:
    return sorted(p.name for p in pg.recovery_dir.glob("restore-test-*")) if pg.recovery_dir.exists() else []


def test_restore_matches_the_source_and_is_removed(cluster, prefect_api):
    name, block, pg = cluster
    with disable_run_logger():
        assert check_database_connectivity.fn(block).passed  # the checklist's passing side, on a live primary
    sql(pg, "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
    sql(pg, "INSERT INTO accounts SELECT g, g * 10 FROM generate_series(1, 1234) g")

    with pytest.raises(InvalidInput, match="no_such_table"):
        restore_check(cluster_block=name, row_count_tables=["no_such_table"])
    assert leftovers(pg) == []
    refused = restore_check(cluster_block=name, row_count_tables=["no_such_table"], return_state=True)
    assert refused.is_failed() and "no_such_table" in str(refused.message), refused.message
    report = load_report(refused.state_details.flow_run_id)
    assert report.outcome == "Refused" and "no_such_table" in report.summary
    assert [s.step for s in report.steps] == ["Preflight: source reachable, tables exist"]  # nothing to clean up

    queries = [VerificationQuery(name="balance total", sql="SELECT sum(balance) FROM accounts",
                                 expected=str(sum(g * 10 for g in range(1, 1235))))]
    state = restore_check(cluster_block=name, row_count_tables=["accounts"], verification_queries=queries,
                         return_state=True)
    assert state.is_completed() and state.name == "Restored", state.message
    report = load_report(state.state_details.flow_run_id)
    checks = {c.name: (c.passed, c.detail) for c in report.checks}
    assert checks["row count: accounts"] == (True, "restored 1234, source 1234")
    assert checks["sentinel: balance total"][0] and checks["pg_amcheck"][0]
    assert report.rto_seconds is not None and report.rto_seconds < 60
    assert leftovers(pg) == []
    port = report.candidate["port"]
    assert not block.is_reachable(port)  # the scratch instance is stopped
    assert report.steps[-1].step == "Clean up the scratch instance" and "removed" in report.steps[-1].detail


def test_cleanup_after_an_injected_failure(cluster, notifier, webhook, prefect_api):
    name, block, pg = cluster
    # The injected failure: a sentinel query that errors while the scratch instance is up and running.
    broken = VerificationQuery(name="broken sentinel", sql="SELECT 1 / 0")
    state = restore_check(cluster_block=name, verification_queries=[broken], notifier=notifier, return_state=True)
    assert state.is_failed()
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Failed" and "division by zero" in report.summary
    compare = next(s for s in report.steps if s.step == "Compare with the source")
    assert compare.outcome == "failed"
    cleanup = report.steps[-1]
    assert cleanup.step == "Clean up the scratch instance" and cleanup.outcome == "ok"
    assert "removed" in cleanup.detail and "restore-test-" in cleanup.detail
    assert leftovers(pg) == []
    assert not block.is_reachable(report.candidate["port"])  # the running scratch instance was stopped
    assert block.is_reachable()  # the source was never touched
    text = webhook.wait_for(lambda t: "restore test failed" in t)[0]
    assert text.startswith("\U0001f6a8 INCIDENT ALERT - P2")


def test_a_restore_that_fails_is_cleaned_up_and_alerted(cluster, notifier, webhook, prefect_api):
    name, block, pg = cluster
    backup_files = sorted((pg.pgbackrest_dir / "repo" / "backup").glob("*/*/pg_data/**/*.lz4"),
                          key=lambda p: p.stat().st_size)
    assert backup_files, "the fixture's full backup is in the posix repository"
    backup_files[-1].write_bytes(b"not an lz4 frame" * 64)  # the injected failure: a corrupt file in the backup set
    state = restore_check(cluster_block=name, notifier=notifier, return_state=True)
    assert state.is_failed()
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Failed" and report.candidate is None
    restore = next(s for s in report.steps if s.step == "Restore the latest backup into a scratch instance")
    assert restore.outcome == "failed"
    cleanup = report.steps[-1]
    assert cleanup.step == "Clean up the scratch instance" and cleanup.outcome == "ok"
    assert "restore-test-" in cleanup.detail  # the partial restore's directory was there and was removed
    assert leftovers(pg) == []
    assert block.is_reachable()
    text = webhook.wait_for(lambda t: "restore test failed" in t)[0]
    assert f"flow run {report.flow_run_id}" in text
