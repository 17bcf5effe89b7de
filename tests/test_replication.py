"""Replication verbs on a real primary + streaming replica; Route53 and RDS verbs on moto's server."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from blocks.errors import InvalidInput, PostgresError
from sandbox import pgcluster
from sandbox.paths import free_port


@pytest.fixture(scope="module")
def pair(work_root):
    """A primary and one streaming replica for the module: (block, layout)."""
    from blocks import PostgresCluster, PostgresInstance

    layout = pgcluster.ClusterLayout(work_root / f"repl-{uuid.uuid4().hex[:6]}", free_port(), free_port(), "p@ss:w\\rd")
    pgcluster.build(layout, with_replica=True)
    block = PostgresCluster(
        primary=PostgresInstance(port=layout.primary_port, data_directory=str(layout.primary_dir)),
        replicas=[PostgresInstance(port=layout.replica_port, data_directory=str(layout.replica_dir))],
        password=layout.password, socket_directory=str(layout.socket_dir),
        pgbackrest_config=str(layout.pgbackrest_conf), recovery_directory=str(layout.recovery_dir),
        environment="sandbox",
    )
    pgcluster.psql(layout, layout.primary_port, "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
    yield block, layout
    pgcluster.stop_all(layout.root)


@pytest.fixture
def cluster_pair(pair):
    """The pair in its original topology: primary on its port, replica streaming from it."""
    block, layout = pair
    P, R = layout.primary_port, layout.replica_port
    if block.role(P) != "primary" or not block.follows(R, P):
        if block.role(P) == "unreachable" and block.role(R) == "primary":
            block.resync_as_standby(P, R)
        block.switchover(P)
    return block, layout


def rows(layout, port: int, note: str) -> int:
    return int(pgcluster.psql(layout, port, f"SELECT count(*) FROM ledger WHERE note = '{note}'"))


def test_lag_roles_and_writers(cluster_pair):
    block, layout = cluster_pair
    P, R = layout.primary_port, layout.replica_port
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('a')")
    time.sleep(0.3)
    caught_up = block.replica_lag(R)
    assert caught_up.bytes == 0 and caught_up.seconds == 0.0 and caught_up.within(0)
    assert block.role(P) == "primary" and block.role(R) == "standby"
    assert block.writers() == [P] and block.accepts_writes(P) and not block.accepts_writes(R)
    assert block.follows(R, P) and not block.follows(P, R)

    block.query_one("SELECT pg_wal_replay_pause()", port=R)
    try:
        pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('b')")
        time.sleep(1.2)
        behind = block.replica_lag(R)
        assert behind.bytes > 0 and behind.seconds >= 1.0 and behind.measured_from == "primary"
        assert not behind.within(1.0) and behind.within(3600)
        newest = str(block.query_one("SELECT pg_current_wal_lsn()", port=P))
        assert not block.replayed(R, newest, 0.5)  # bounded: gives up instead of waiting forever
    finally:
        block.query_one("SELECT pg_wal_replay_resume()", port=R)
    assert block.replayed(R, newest, 10)
    with pytest.raises(InvalidInput, match="WAL position"):
        block.replayed(R, "latest")

    with pytest.raises(InvalidInput, match="no instance of this cluster listens on port 1"):
        block.replica_lag(1)
    with pytest.raises(InvalidInput, match="cannot follow itself"):
        block.resync_as_standby(R, R)
    with pytest.raises(InvalidInput, match="port 2"):
        block.switchover(2)
    with pytest.raises(InvalidInput, match="stop mode"):
        block.stop_at(R, "now")


def test_fence_promote_rewind_and_switch_back(cluster_pair):
    block, layout = cluster_pair
    P, R = layout.primary_port, layout.replica_port
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('before')")

    # Split brain on purpose: the replica is promoted while the old primary still runs and takes a write.
    promotion = block.promote(R)
    assert not promotion.already_primary and block.role(R) == "primary"
    assert block.promote(R).already_primary  # idempotent
    # pgBackRest archives only from the stanza's pg1-path unless told the promoted replica's directory.
    assert f"--pg1-path={layout.replica_dir} archive-push" in block.query_one("SHOW archive_command", port=R)
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('diverged')")
    pgcluster.psql(layout, R, "INSERT INTO ledger (note) VALUES ('during')")
    assert sorted(block.writers()) == sorted([P, R])

    fenced = block.fence_old_primary(P)
    assert fenced["state"] == "stopped" and block.writers() == [R] and fenced["final_lsn"]
    assert block.fence_old_primary(P)["state"] == "unreachable"

    resync = block.resync_as_standby(P, R)
    assert resync.method == "rewind" and resync.moved_aside is None, resync
    assert block.follows(P, R) and block.role(P) == "standby"
    assert rows(layout, P, "diverged") == 0  # the old primary's divergent write is rewound away
    assert block.resync_as_standby(P, R).method == "already-following"

    result = block.switchover(P)
    assert result["new_primary"].endswith(f":{P}") and result["resyncs"][0]["method"] in ("rewind", "already-following")
    assert block.writers() == [P] and block.follows(R, P) and pgcluster.replica_streaming(layout)
    assert rows(layout, P, "during") == 1 and rows(layout, P, "before") == 1
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('after')")  # the primary takes writes again
    assert not block.is_fenced()


def test_loss_window_with_the_primary_unreachable_and_replica_ranking(cluster_pair):
    from datetime import datetime, timedelta, timezone

    from blocks._pg_replication import ReplicaLag
    from tasks.replication import order_candidates

    block, layout = cluster_pair
    P, R = layout.primary_port, layout.replica_port
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('window')")
    time.sleep(0.8)
    # The primary, asked on an address nothing listens on, cannot be asked; it was "lost" before its last commit.
    lost = block.model_copy(update={"primary": block.primary.model_copy(update={"host": "127.0.0.2"})})
    lag = lost.replica_lag(R, P, primary_lost_at=datetime.now(timezone.utc) - timedelta(hours=1))
    assert lag.measured_from == "replica" and lag.received_lsn and lag.received_position > 0
    assert lag.seconds is not None and 0.5 <= lag.seconds < 600, lag  # never clamped to 0 s
    assert not lag.within(0.1) and "until now" in lag.detail

    def replica(port: int, lsn: str | None, seconds: float | None) -> ReplicaLag:
        return ReplicaLag(f"h:{port}", port, False, 0, seconds, "replica", None, "", lsn)

    ranked = order_candidates([replica(1, "0/3000000", 1.0), replica(2, "1/100", 9.0), replica(3, None, 0.5)])
    assert [lag.port for lag in ranked] == [2, 1, 3]  # most WAL received first, unknown last


def test_old_primary_that_refuses_our_login_is_stopped_not_skipped(cluster_pair):
    block, layout = cluster_pair
    P = layout.primary_port
    hba = layout.primary_dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("host all all 127.0.0.1/32 reject\n" + original)
    block._pg_ctl("reload", "-D", str(layout.primary_dir))
    try:
        time.sleep(0.3)
        assert block.role(P) == "refusing"  # a running server turning us away is not "unreachable"
        with pytest.raises(PostgresError, match="cannot be fenced from here"):
            block.fence_old_primary(P, stop=False)
        remote = block.model_copy(update={"primary": block.primary.model_copy(update={"data_directory": None})})
        with pytest.raises(PostgresError, match="pg_hba.conf"):
            remote.fence_old_primary(P)  # not on this host: nothing can stop it, the failover is blocked
        assert block.instance_running(str(layout.primary_dir))
        fenced = block.fence_old_primary(P)
        assert fenced["state"] == "stopped" and not block.instance_running(str(layout.primary_dir))
        assert block.role(P) == "unreachable" and block.fence_old_primary(P)["state"] == "unreachable"
    finally:
        hba.write_text(original)
        block.start_at(P)
    assert block.role(P) == "primary"


def test_a_replica_is_reached_on_its_own_host(cluster_pair):
    block, layout = cluster_pair
    R = layout.replica_port
    elsewhere = block.model_copy(update={"replicas": [block.replicas[0].model_copy(update={"host": "127.0.0.2"})]})
    # The replica listens on 127.0.0.1 only: asking 127.0.0.2 proves the listed host is the one used.
    assert elsewhere.role(R) == "unreachable" and block.role(R) == "standby"
    with pytest.raises(Exception, match="127.0.0.2"):
        elsewhere.query_one("SELECT 1", port=R)


def test_switchover_never_leaves_the_serving_primary_fenced_nor_reopens_a_fenced_one(cluster_pair):
    from blocks.errors import RecoveryError

    block, layout = cluster_pair
    P, R = layout.primary_port, layout.replica_port
    block.query_one("SELECT pg_wal_replay_pause()", port=R)
    try:
        pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('unreplayed')")
        with pytest.raises(RecoveryError, match="to replay"):
            block.switchover(R, timeout_seconds=1)  # the standby cannot catch up: nothing is promoted
    finally:
        block.query_one("SELECT pg_wal_replay_resume()", port=R)
    assert block.writers() == [P] and not block.is_fenced() and block.role(R) == "standby"

    block.fence_instance(P)  # a fenced primary is not opened again by a switchover "to" it
    try:
        with pytest.raises(PostgresError, match="fenced primary"):
            block.switchover(P)
        assert block.is_fenced()
    finally:
        block.unfence_instance(P)
    assert block.writers() == [P]


def test_resync_falls_back_to_a_clone_and_keeps_the_old_directory(cluster_pair):
    block, layout = cluster_pair
    P, R = layout.primary_port, layout.replica_port
    block.stop_at(R)
    # A data directory pg_rewind cannot use: its control file is gone.
    (layout.replica_dir / "global" / "pg_control").unlink()
    resync = block.resync_as_standby(R, P)
    assert resync.method == "clone" and resync.moved_aside
    assert Path(resync.moved_aside, "PG_VERSION").exists()  # moved aside, not deleted
    assert block.follows(R, P) and pgcluster.replica_streaming(layout)

    # A clone that failed half-way left no data directory: the re-run takes the configuration from the copy.
    block.stop_at(R)
    aside = f"{layout.replica_dir}.failed-29991231T000000Z"
    layout.replica_dir.rename(aside)
    again = block.resync_as_standby(R, P)
    assert again.method == "clone" and again.moved_aside == aside
    assert block.follows(R, P) and (layout.replica_dir / "pg_hba.conf").read_text() == Path(aside, "pg_hba.conf").read_text()


# ---------------------------------------------------------------------------------------------- Route53


def make_zone(aws, ttl: int = 30):
    from blocks.dns import DnsRecord, DnsZone

    r53 = aws.get_client("route53")
    zone_id = r53.create_hosted_zone(Name="example.test", CallerReference=uuid.uuid4().hex)["HostedZone"]["Id"]
    zone = DnsZone(hosted_zone_id=zone_id, records=[DnsRecord(name="api.example.test"), DnsRecord(name="www.example.test")],
                   primary_target="lb.primary.example.test", secondary_target="lb.dr.example.test", ttl=ttl,
                   credentials=aws, poll_interval_seconds=0.1, insync_timeout_seconds=10)
    zone.upsert(zone.primary_target)
    return zone


def test_dns_cutover_is_idempotent(aws):
    zone = make_zone(aws)
    assert zone.points_at(zone.primary_target)
    assert zone.plan(zone.secondary_target) == [
        "DNS api.example.test. CNAME: lb.primary.example.test -> lb.dr.example.test (TTL 30 s)",
        "DNS www.example.test. CNAME: lb.primary.example.test -> lb.dr.example.test (TTL 30 s)",
    ]
    first = zone.cutover(zone.secondary_target)
    assert first.change_id and not first.already_pointing and first.status == "INSYNC"
    assert first.before["api.example.test. CNAME"] == ["lb.primary.example.test"]
    assert zone.current_targets() == {"api.example.test. CNAME": ["lb.dr.example.test"],
                                      "www.example.test. CNAME": ["lb.dr.example.test"]}
    again = zone.cutover(zone.secondary_target)
    assert again.already_pointing and again.change_id is None
    assert zone.plan(zone.secondary_target) == []

    # A change submitted by an attempt whose INSYNC wait failed is waited on by the next attempt.
    submitted = zone.upsert(zone.primary_target, "attempt whose wait failed")
    retried = zone.cutover(zone.primary_target)
    assert retried.change_id == submitted and not retried.already_pointing and retried.status == "INSYNC"
    assert zone.cutover(zone.primary_target).already_pointing


def test_dns_refuses_bad_inputs(aws):
    from blocks.dns import DnsRecord, DnsZone

    zone = make_zone(aws)
    with pytest.raises(InvalidInput, match="neither the primary"):
        zone.cutover("lb.elsewhere.example.test")
    with pytest.raises(ValidationError, match="greater than 0"):
        DnsZone(hosted_zone_id="Z1", records=[DnsRecord(name="a.example.test")], primary_target="a", secondary_target="b",
                ttl=0, credentials=aws)
    with pytest.raises(ValidationError, match="both"):
        DnsZone(hosted_zone_id="Z1", records=[DnsRecord(name="a.example.test")], primary_target="a", secondary_target="a",
                credentials=aws)
    with pytest.raises(InvalidInput, match="no hosted zone"):
        zone.model_copy(update={"hosted_zone_id": "ZNOSUCHZONE"}).check_zone()
    assert zone.points_at(zone.primary_target)  # nothing changed


# ---------------------------------------------------------------------------------------------- RDS


def test_rds_promotion_is_idempotent(aws):
    from blocks.rds import RdsDatabase

    rds = aws.get_client("rds")
    rds.create_db_instance(DBInstanceIdentifier="orders", DBInstanceClass="db.t3.micro", Engine="postgres",
                           MasterUsername="app", MasterUserPassword="not-a-real-one", AllocatedStorage=20)
    rds.create_db_instance_read_replica(DBInstanceIdentifier="orders-dr", SourceDBInstanceIdentifier="orders")
    db = RdsDatabase(instance_identifier="orders", replica_identifier="orders-dr", credentials=aws,
                     poll_interval_seconds=0.1, available_timeout_seconds=10)
    assert db.describe("orders-dr")["source"] == "orders"
    assert not db.is_promoted()
    assert db.replica_lag_seconds() is None  # no CloudWatch datapoint on this endpoint
    first = db.promote_read_replica()
    assert not first.already_promoted and first.status == "available"
    assert db.is_promoted()
    second = db.promote_read_replica()
    assert second.already_promoted and second.promoted_at == first.promoted_at
    with pytest.raises(InvalidInput, match="no DB instance"):
        db.describe("nope")
    from blocks.rds import proves_not_writing

    assert proves_not_writing("stopped") and proves_not_writing("deleting")
    assert not proves_not_writing("available") and not proves_not_writing("modifying")
    assert not proves_not_writing(None)  # a status that could not be read proves nothing
    with pytest.raises(ValidationError):
        RdsDatabase(instance_identifier="a", replica_identifier="a", credentials=aws)
