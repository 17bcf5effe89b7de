"""Database server failover against a real primary + replica and the Kubernetes emulator."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from prefect.flow_runs import resume_flow_run

from conftest import wait_for_run
from fixtures_kube import seed_deployment
from sandbox import pgcluster
from sandbox.paths import free_port
from runbook.evidence import load_report


@pytest.fixture(scope="module")
def pair(work_root, prefect_api):
    from blocks import PostgresCluster, PostgresInstance

    layout = pgcluster.ClusterLayout(work_root / f"dbfo-{uuid.uuid4().hex[:6]}", free_port(), free_port(), "f41l:over")
    pgcluster.build(layout, with_replica=True)
    pgcluster.psql(layout, layout.primary_port, "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
    block = PostgresCluster(
        primary=PostgresInstance(port=layout.primary_port, data_directory=str(layout.primary_dir)),
        replicas=[PostgresInstance(port=layout.replica_port, data_directory=str(layout.replica_dir))],
        password=layout.password, socket_directory=str(layout.socket_dir),
        pgbackrest_config=str(layout.pgbackrest_conf), recovery_directory=str(layout.recovery_dir),
        environment="sandbox",
    )
    name = f"dbfo-{uuid.uuid4().hex[:6]}"
    block.save(name)
    yield name, block, layout
    pgcluster.stop_all(layout.root)


@pytest.fixture
def db(pair, kube):
    """The pair in its original topology, and an application namespace with its DSN secret: (name, block, layout, kube)."""
    name, block, layout = pair
    P, R = layout.primary_port, layout.replica_port
    if not (block.role(P) == "primary" and block.follows(R, P)):
        if block.role(P) == "unreachable" and block.role(R) == "primary":
            block.resync_as_standby(P, R)
        elif block.role(P) == "unreachable":
            block.start_at(P)
        block.switchover(P)
    kube.deployments = {"core-api": 2}
    seed_deployment(kube, "core-api", replicas=2)
    kube.set_secret_value("db", "DATABASE_URL", f"postgresql://postgres@127.0.0.1:{P}/postgres")
    kube.save(f"apps-{uuid.uuid4().hex[:6]}")
    return name, block, layout, kube


def params(name, kube, **extra) -> dict:
    values = dict(cluster_block=name, kubernetes_target=kube._block_document_name, database_secret="db",
                  restart_deployments=["core-api"], smoke_queries=["SELECT count(*) FROM ledger"],
                  approval_policy="auto", drill=True, lock_wait_seconds=5)
    values.update(extra)
    return values


def run(**kwargs):
    from flows.db_failover import db_failover

    state = db_failover(**kwargs, return_state=True)
    return state, load_report(state.state_details.flow_run_id)


def dsn(kube) -> str:
    return kube.read_secret_value("db", "DATABASE_URL").get_secret_value()


def test_dry_run_failover_and_rerun(db):
    name, block, layout, kube = db
    P, R = layout.primary_port, layout.replica_port
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('before')")
    time.sleep(0.2)
    block.stop_at(P)  # the server is lost

    state, report = run(**params(name, kube, dry_run=True))
    assert state.name == "DryRun"
    assert report.plan[0] == f"old primary 127.0.0.1:{P}: unreachable -> fenced and stopped (or recorded unreachable)"
    assert report.plan[1] == f"database 127.0.0.1:{R}: standby -> primary (promoted, open for writes)"
    assert f"-> postgresql://postgres@127.0.0.1:{R}/postgres" in report.plan[2]
    assert block.role(R) == "standby" and dsn(kube).endswith(f":{P}/postgres")

    state, report = run(**params(name, kube))
    assert state.name == "FailedOver", report.summary
    assert block.writers() == [R] and dsn(kube).endswith(f":{R}/postgres")
    assert report.facts["old primary"] == f"127.0.0.1:{P}: unreachable"
    assert report.rpo_seconds is not None and report.rpo_seconds < report.rpo_objective_seconds
    assert kube.get_deployment("core-api")["spec"]["template"]["metadata"].get("annotations", {}).get(
        "kubectl.kubernetes.io/restartedAt")
    assert int(pgcluster.psql(layout, R, "SELECT count(*) FROM ledger WHERE note = 'before'")) == 1

    state, again = run(**params(name, kube))  # a re-run promotes nothing twice
    assert state.name == "FailedOver" and again.promotion["already_promoted"] is True
    assert "chosen replica" in again.facts and block.writers() == [R]


def test_lag_above_rpo_blocks_unless_the_approver_accepts_the_loss(db, prefect_api):
    from blocks import Objective, RecoveryObjectives

    name, block, layout, kube = db
    P, R = layout.primary_port, layout.replica_port
    tight = f"tight-{uuid.uuid4().hex[:6]}"
    RecoveryObjectives(functions={"database": Objective(rto_seconds=900, rpo_seconds=1)}).save(tight)
    block.query_one("SELECT pg_wal_replay_pause()", port=R)
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('lagging')")
    time.sleep(1.5)

    state, report = run(**params(name, kube, objectives_block=tight))
    assert state.name == "LagAboveRpo" and report.rpo_seconds > 1
    assert block.writers() == [P] and block.role(R) == "standby" and dsn(kube).endswith(f":{P}/postgres")

    run_name = f"accept-{uuid.uuid4().hex[:6]}"

    def approve():
        paused = wait_for_run(run_name, lambda fr: fr.state is not None and fr.state.is_paused(), timeout=240)
        resume_flow_run(paused.id, run_input={"approve": True, "approver": "bob", "comment": "accept 2 s",
                                              "accept_data_loss": True})

    answer = threading.Thread(target=approve, daemon=True)
    answer.start()
    from flows.db_failover import db_failover

    state = db_failover.with_options(flow_run_name=run_name)(
        **params(name, kube, objectives_block=tight, approval_policy="required", drill=False,
                 allowed_approvers=["bob"], approval_poll_seconds=0.3, approval_timeout_seconds=300),
        return_state=True)
    answer.join(timeout=60)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "FailedOver", report.summary
    assert report.approvals[0].details == {"accept_data_loss": True}
    assert report.facts["old primary"] == f"127.0.0.1:{P}: stopped"  # fenced and stopped before the promotion
    # Replay was paused: the fenced primary's last WAL was not replayed, so the lag was measured again.
    assert "replayed before promotion" not in report.facts and report.facts["replica lag at promotion"]["bytes"] >= 0
    assert block.writers() == [R]


def test_bad_inputs_are_refused_before_any_change(db):
    name, block, layout, kube = db
    for change, message in [
        ({"failed_port": 1}, "no instance of this cluster listens on port 1"),
        ({"restart_deployments": ["nope"]}, "deployment 'nope' does not exist"),
        ({"drill": False}, "approval policy 'auto' is allowed only for drills"),
    ]:
        state, report = run(**params(name, kube, **change))
        assert state.is_failed() and report.outcome == "Refused" and message in report.summary, report.summary
    assert block.writers() == [layout.primary_port] and block.follows(layout.replica_port, layout.primary_port)
    assert dsn(kube).endswith(f":{layout.primary_port}/postgres")
