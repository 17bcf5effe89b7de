"""A replica left on the timeline a point-in-time restore abandoned: never promoted, rebuilt by the recovery.

Real PostgreSQL 15 primary + streaming replica with pgBackRest, and a Prefect server.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from blocks.errors import PostgresError
from sandbox import pgcluster
from sandbox.paths import free_port
from runbook.evidence import load_report

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def pair(work_root, prefect_api):
    """A fresh primary + streaming replica with a first full backup, saved as a block: (name, block, layout)."""
    from blocks import PostgresCluster, PostgresInstance

    layout = pgcluster.ClusterLayout(work_root / f"tl-{uuid.uuid4().hex[:6]}", free_port(), free_port(), "t1me:l\\ne")
    pgcluster.build(layout, with_replica=True)
    block = PostgresCluster(
        primary=PostgresInstance(port=layout.primary_port, data_directory=str(layout.primary_dir)),
        replicas=[PostgresInstance(port=layout.replica_port, data_directory=str(layout.replica_dir))],
        password=layout.password, socket_directory=str(layout.socket_dir),
        pgbackrest_config=str(layout.pgbackrest_conf), recovery_directory=str(layout.recovery_dir),
        environment="sandbox",
    )
    name = f"tl-{uuid.uuid4().hex[:6]}"
    block.save(name)
    yield name, block, layout
    pgcluster.stop_all(layout.root)


def psql(layout, port: int, statement: str) -> str:
    return pgcluster.psql(layout, port, statement)


def rows(layout, port: int, note: str) -> int:
    return int(psql(layout, port, f"SELECT count(*) FROM ledger WHERE note = '{note}'"))


def corrupt_after_a_target(block, layout) -> datetime:
    """100 good rows, then 20 more and a destructive delete, all replayed by the replica; returns the target
    (1 us after the last good commit)."""
    P, R = layout.primary_port, layout.replica_port
    time.sleep(1.1)  # a target in the second the first backup ended is not recoverable
    psql(layout, P, "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
    psql(layout, P, "INSERT INTO ledger (note) SELECT 'before' FROM generate_series(1, 100)")
    micros = psql(layout, P, "SELECT (extract(epoch FROM max(pg_xact_commit_timestamp(xmin))) * 1000000)::bigint "
                             "FROM ledger")
    target = EPOCH + timedelta(microseconds=int(micros) + 1)
    psql(layout, P, "INSERT INTO ledger (note) SELECT 'after' FROM generate_series(1, 20)")
    psql(layout, P, "DELETE FROM ledger WHERE note = 'before' AND id % 2 = 0")  # the corruption
    assert block.replayed(R, psql(layout, P, "SELECT pg_current_wal_lsn()"), 30)
    assert rows(layout, R, "before") == 50  # the replica replayed the corruption too
    return target


def failover(name: str):
    from flows.db_failover import db_failover

    state = db_failover(cluster_block=name, approval_policy="auto", drill=True, lock_wait_seconds=5, return_state=True)
    return state, load_report(state.state_details.flow_run_id)


def test_a_replica_on_the_abandoned_timeline_is_never_promoted(pair):
    name, block, layout = pair
    P, R = layout.primary_port, layout.replica_port
    target = corrupt_after_a_target(block, layout)

    # A point-in-time recovery of the primary that leaves the replica as it was.
    block.archive_wal()
    block.fence()
    block.promote_candidate(block.restore_beside("pitr-replica-left", target))
    assert rows(layout, P, "before") == 100 and rows(layout, P, "after") == 0
    assert block.role(R) == "standby" and rows(layout, R, "before") == 50  # still serving the abandoned history

    check = block.history_check(R, P)
    assert (check.on_history, check.timeline, check.primary_timeline) == (False, 1, 2), check
    assert "timeline 1" in check.detail and "timeline 2" in check.detail and "abandoned" in check.detail
    lag = block.replica_lag(R, P)  # WAL positions of two histories are not compared: no "0 bytes behind"
    assert not lag.on_history and lag.bytes is None and lag.seconds is None and not lag.within(10**9), lag
    assert "timeline 1" in lag.detail

    # The restored primary is lost: the failover refuses the stale replica, naming both timelines.
    block.stop_at(P)
    state, report = failover(name)
    assert state.name == "NoCandidate", report.summary
    assert "on timeline 1" in report.summary and "the primary's timeline 2" in report.summary, report.summary
    assert block.role(R) == "standby" and block.writers() == []
    assert report.promotion is None or not report.promotion

    # The last guard: the promotion verb itself refuses it, before changing anything.
    with pytest.raises(PostgresError, match="is on timeline 1.*not on the primary's timeline 2"):
        block.promote(R)
    assert block.role(R) == "standby"


def test_the_recovery_rebuilds_the_replica_and_a_later_failover_loses_no_row(pair):
    from flows.db_corruption import db_corruption

    name, block, layout = pair
    P, R = layout.primary_port, layout.replica_port
    target = corrupt_after_a_target(block, layout)

    state = db_corruption(cluster_block=name, recovery_target=target.isoformat(),
                          incident_detected_at=datetime.now(timezone.utc), approval_policy="auto", drill=True,
                          take_backup_after=False, return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "Recovered", report.summary
    [rebuilt] = report.facts["replicas after the restore"]
    assert rebuilt.startswith(f"127.0.0.1:{R}: clone, old data directory kept at {layout.replica_dir}.abandoned-"), rebuilt
    aside = rebuilt.rsplit(" ", 1)[-1]
    assert os.path.exists(os.path.join(aside, "PG_VERSION"))  # moved aside, never deleted
    assert any(c.name == "replicas streaming" and c.passed for c in report.checks)
    check = block.history_check(R, P)
    assert check.on_history and check.timeline == check.primary_timeline == 2, check
    assert block.follows(R, P) and rows(layout, R, "before") == 100 and rows(layout, R, "after") == 0

    # Commits after the recovery, then the restored primary is lost: the failover keeps every one of them.
    psql(layout, P, "INSERT INTO ledger (note) SELECT 'post' FROM generate_series(1, 7)")
    assert block.replayed(R, psql(layout, P, "SELECT pg_current_wal_lsn()"), 30)
    block.stop_at(P)
    state, report = failover(name)
    assert state.name == "FailedOver", report.summary
    assert block.writers() == [R] and report.promotion["timeline"] == 3
    assert (rows(layout, R, "before"), rows(layout, R, "after"), rows(layout, R, "post")) == (100, 0, 7)


def test_a_replica_off_the_primary_timeline_ranks_last_and_is_never_within_the_rpo():
    from blocks._pg_replication import ReplicaLag
    from blocks.pgbackrest import parse_timeline_history
    from tasks.replication import order_candidates

    assert parse_timeline_history("1\t0/5000060\tno recovery target specified\n\n"
                                  "2\t0/A0000A8\tbefore 2026-12-02 15:20:28.123457+00\n") == {1: "0/5000060", 2: "0/A0000A8"}
    stale = ReplicaLag("h:1", 1, False, 0, 0.0, "primary", None, "on timeline 1", "9/0", 1, 2, False)
    behind = ReplicaLag("h:2", 2, False, 4096, 2.0, "primary", None, "4096 bytes behind", "0/100", 2, 2, True)
    assert not stale.within(10**9) and behind.within(3)
    assert [lag.port for lag in order_candidates([stale, behind])] == [2, 1]
