"""Point-in-time recovery is exact to the microsecond: real PostgreSQL 15, pgBackRest and a Prefect server.

Every commit's timestamp is read back with ``pg_xact_commit_timestamp`` (the sandbox runs with
``track_commit_timestamp = on``): it is the very value the commit's WAL record carries and
``recovery_target_time`` is compared with.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from blocks import VerificationQuery
from blocks.errors import InvalidInput
from blocks.pgbackrest import format_target_time
from conftest import sql
from flows.db_corruption import db_corruption
from runbook.evidence import load_report

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
US = timedelta(microseconds=1)


@pytest.mark.parametrize("moment,expected", [
    (datetime(2026, 11, 23, 10, 0, 0, 123457, tzinfo=timezone(timedelta(hours=2))), "2026-11-23 08:00:00.123457+00:00"),
    (datetime(2026, 11, 23, 8, 0, 0, 999999, tzinfo=timezone.utc), "2026-11-23 08:00:00.999999+00:00"),
    (datetime(2026, 1, 1, 0, 0, 0, 0, tzinfo=timezone(-timedelta(hours=5, minutes=30))), "2026-01-01 05:30:00.000000+00:00"),
    (datetime(2026, 3, 1, 0, 0, 0, 1, tzinfo=timezone(timedelta(hours=1))), "2026-02-28 23:00:00.000001+00:00"),
])
def test_target_time_keeps_every_microsecond_and_names_its_offset(moment, expected):
    text = format_target_time(moment)
    assert text == expected
    assert datetime.fromisoformat(text) == moment  # the same instant, to the microsecond


def test_target_time_without_an_offset_is_refused():
    with pytest.raises(InvalidInput, match="no time zone"):
        format_target_time(datetime(2026, 11, 23, 10, 0, 0, 5))


def commit_one_row_at_a_time(pg, rows: int) -> list[tuple[int, datetime]]:
    """Commit ``rows`` rows, one transaction each, as fast as the server goes; return (id, commit time) in order."""
    sql(pg, "CREATE TABLE ticks (id int PRIMARY KEY, payload text NOT NULL)")
    sql(pg, f"DO $$ BEGIN FOR i IN 1..{rows} LOOP INSERT INTO ticks VALUES (i, md5(i::text)); COMMIT; END LOOP; END $$")
    out = sql(pg, "SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint FROM ticks ORDER BY id")
    commits = []
    for line in out.splitlines():
        ident, micros = line.split("|")
        commits.append((int(ident), EPOCH + timedelta(microseconds=int(micros))))
    assert [i for i, _ in commits] == list(range(1, rows + 1))
    assert all(commits[i][1] < commits[i + 1][1] for i in range(rows - 1)), "commit times must rise with the ids"
    return commits


def pick(commits: list[tuple[int, datetime]], start: int, gap_before: bool) -> tuple[int, datetime]:
    """A commit at or after index ``start`` at least 2 us from its neighbour (after it, or before it with
    ``gap_before``), not in the last microsecond of its millisecond (a cut to milliseconds would spare it)."""
    for index in range(start, len(commits) - 1):
        ident, at = commits[index]
        gap = at - commits[index - 1][1] if gap_before else commits[index + 1][1] - at
        if gap >= 2 * US and at.microsecond % 1000 < 998:
            return ident, at
    raise AssertionError("no commit with a 2 us gap to its neighbour")


def test_a_commit_1us_before_the_target_is_restored_and_one_1us_after_it_is_not(cluster):
    name, block, pg = cluster
    time.sleep(1.1)  # a target in the second the first backup ended is not recoverable
    commits = commit_one_row_at_a_time(pg, 3000)
    sql(pg, "DELETE FROM ticks WHERE id % 3 = 0")  # the destructive transaction, after every commit

    # A target 1 us before a commit: that commit is not restored, the one before it is.
    after_id, after_at = pick(commits, 1000, gap_before=True)
    block.archive_wal()
    beside = block.restore_beside(f"exact-{after_id}", after_at - US)
    try:
        assert block.query_one("SELECT count(*) FROM ticks", port=beside.port) == after_id - 1
        assert block.query_one("SELECT max(id) FROM ticks", port=beside.port) == after_id - 1
        assert beside.target == format_target_time(after_at - US)
    finally:
        block.stop_instance(beside.data_directory)

    # Through the flow, the target written with another offset: the commit 1 us before it is restored,
    # and nothing after it.
    last_id, last_at = pick(commits, 2000, gap_before=False)
    target = (last_at + US).astimezone(timezone(timedelta(hours=5, minutes=30)))
    state = db_corruption(
        cluster_block=name, recovery_target=target.isoformat(), incident_detected_at=datetime.now(timezone.utc),
        approval_policy="auto", drill=True, take_backup_after=False, row_count_tables=["ticks"],
        verification_queries=[VerificationQuery(name="ticks", sql="SELECT count(*) FROM ticks", expected=str(last_id))],
        return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "Recovered", report.summary
    assert int(sql(pg, "SELECT count(*) FROM ticks")) == last_id
    assert int(sql(pg, "SELECT max(id) FROM ticks")) == last_id
    assert report.last_restored_commit == last_at  # the newest restored commit is the one 1 us before the target
    assert "+00:00" in block.read_marker(str(pg.primary_dir))["target"]
