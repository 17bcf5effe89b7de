"""Regional failover and failback against a real primary + replica, moto's Route53, the Kubernetes
emulator and switchable health endpoints."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import pytest
from prefect.flow_runs import resume_flow_run

from conftest import start_flow, wait_for_run
from fixtures_kube import seed_deployment
from sandbox import pgcluster
from sandbox.paths import free_port
from runbook.evidence import load_report

TIERS = {"auth": 2, "core-api": 2, "dashboard": 1}


@pytest.fixture(scope="module")
def pair(work_root, prefect_api):
    """A primary and a streaming replica (the DR region's), saved as a PostgresCluster block."""
    from blocks import PostgresCluster, PostgresInstance

    layout = pgcluster.ClusterLayout(work_root / f"region-{uuid.uuid4().hex[:6]}", free_port(), free_port(), "r3gion:pw")
    pgcluster.build(layout, with_replica=True)
    pgcluster.psql(layout, layout.primary_port, "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
    block = PostgresCluster(
        primary=PostgresInstance(port=layout.primary_port, data_directory=str(layout.primary_dir)),
        replicas=[PostgresInstance(port=layout.replica_port, data_directory=str(layout.replica_dir))],
        password=layout.password, socket_directory=str(layout.socket_dir),
        pgbackrest_config=str(layout.pgbackrest_conf), recovery_directory=str(layout.recovery_dir),
        environment="sandbox",
    )
    name = f"region-pg-{uuid.uuid4().hex[:6]}"
    block.save(name)
    yield name, block, layout
    pgcluster.stop_all(layout.root)


@dataclass
class TwoRegions:
    primary: str
    dr: str
    zone: str
    cluster: object
    layout: object
    zone_block: object
    primary_kube: object
    dr_kube: object
    health: object

    @property
    def P(self) -> int:
        return self.layout.primary_port

    @property
    def R(self) -> int:
        return self.layout.replica_port

    def params(self, **extra) -> dict:
        params = dict(primary_region=self.primary, dr_region=self.dr, dns_zone=self.zone, health_failures=2,
                      health_window_seconds=2, rollout_timeout_seconds=30, approval_policy="auto", drill=True,
                      lock_wait_seconds=5)
        params.update(extra)
        return params

    def rows(self, port: int, note: str) -> int:
        return int(pgcluster.psql(self.layout, port, f"SELECT count(*) FROM ledger WHERE note = '{note}'"))

    def dns(self) -> set[str]:
        return {v for values in self.zone_block.current_targets().values() for v in values}

    def replicas(self, kube) -> dict[str, int]:
        return {name: kube.get_replicas(name).spec for name in TIERS}

    def untouched(self) -> None:
        """Nothing changed: primary writable, replica streaming, DNS primary, DR scaled down."""
        assert self.cluster.writers() == [self.P] and self.cluster.follows(self.R, self.P)
        assert self.dns() == {self.zone_block.primary_target}
        assert self.replicas(self.dr_kube) == {name: 0 for name in TIERS}
        assert "DATABASE_URL" not in _keys(self.dr_kube)


def _keys(kube) -> list[str]:
    from blocks.errors import InvalidInput

    try:
        return kube.read_secret_keys("db")
    except InvalidInput:  # no such secret yet
        return []


def restore_topology(cluster, P: int, R: int) -> None:
    """Primary on P, R streaming from it, whatever an earlier (failed) test left."""
    if cluster.role(P) == "primary" and cluster.follows(R, P):
        return
    if cluster.role(P) == "unreachable":
        if cluster.role(R) == "primary":
            cluster.resync_as_standby(P, R)
        else:
            cluster.start_at(P)
    cluster.switchover(P)


@pytest.fixture
def regions(pair, aws, kube_server, health, prefect_api) -> TwoRegions:
    """Two regions on the shared pair, in the original topology, with fresh namespaces, zone and health."""
    from blocks.dns import DnsRecord, DnsZone
    from blocks.kubernetes import KubernetesTarget
    from blocks.region import Region

    name, cluster, layout = pair
    P, R = layout.primary_port, layout.replica_port
    restore_topology(cluster, P, R)
    suffix = uuid.uuid4().hex[:6]
    kubes = []
    for region, counts in (("primary", TIERS), ("dr", {n: 0 for n in TIERS})):
        kube = KubernetesTarget(api_server=kube_server.url, namespace=f"{region}-{suffix}", verify_tls=False,
                                environment="sandbox", region=region, deployments=dict(TIERS),
                                request_timeout_seconds=10, rollout_timeout_seconds=10, poll_interval_seconds=0.05)
        for dep, count in counts.items():
            seed_deployment(kube, dep, replicas=count, wait=count > 0)
        kube.save(f"kube-{region}-{suffix}")
        kubes.append(kube)
    r53 = aws.get_client("route53")
    zone_id = r53.create_hosted_zone(Name="example.test", CallerReference=suffix)["HostedZone"]["Id"]
    zone = DnsZone(hosted_zone_id=zone_id, records=[DnsRecord(name="api.example.test")], primary_target="lb.primary.test",
                   secondary_target="lb.dr.test", ttl=30, credentials=aws, poll_interval_seconds=0.05)
    zone.upsert(zone.primary_target)
    zone.save(f"zone-{suffix}")
    for region, port, target in (("primary", P, zone.primary_target), ("dr", R, zone.secondary_target)):
        Region(name=f"{region}-{suffix}", postgres_cluster=name, postgres_port=port, kubernetes_target=f"kube-{region}-{suffix}",
               health_endpoints={"api": health.endpoint(region, "api"), "auth": health.endpoint(region, "auth")},
               health_timeout_seconds=2, dns_target=target, tiers=[["auth", "core-api"], ["dashboard"]],
               database_secret="db").save(f"{region}-{suffix}")
    return TwoRegions(f"primary-{suffix}", f"dr-{suffix}", f"zone-{suffix}", cluster, layout, zone, kubes[0], kubes[1], health)


def run(flow_fn, **params):
    state = flow_fn(**params, return_state=True)
    return state, load_report(state.state_details.flow_run_id)


def test_failover_crash_after_cutover_rerun_and_failback(regions: TwoRegions):
    from flows.regional_failback import regional_failback
    from flows.regional_failover import regional_failover

    r = regions
    pgcluster.psql(r.layout, r.P, "INSERT INTO ledger (note) VALUES ('before')")
    r.cluster.stop_at(r.P)  # the region is lost
    r.health.set_healthy("primary", False)
    r.health.set_healthy("dr", False, service="api")  # the DR smoke test will fail once, after the cutover

    state, report = run(regional_failover, **r.params())
    assert state.name == "VerificationFailed", report.summary
    assert r.cluster.role(r.R) == "primary" and r.dns() == {"lb.dr.test"}
    assert report.facts["dns change"] != "none: already pointing at the DR region"
    assert report.promotion["already_promoted"] is False and report.promotion["old_primary"]["state"] == "unreachable"
    assert [s.step for s in report.steps if s.step.startswith("Scale")] == [
        "Scale up DR workloads: tier 1", "Scale up DR workloads: tier 2"]

    # The re-run after the crash neither promotes again nor flips DNS again.
    r.health.set_healthy("dr", True, service="api")
    state, again = run(regional_failover, **r.params())
    assert state.name == "FailedOver", again.summary
    assert again.facts["dns change"] == "none: already pointing at the DR region"
    assert not any(line.startswith("database") for line in again.plan)
    assert again.promotion["already_promoted"] is True
    assert r.replicas(r.dr_kube) == TIERS
    assert r.dr_kube.read_secret_value("db", "DATABASE_URL").get_secret_value().endswith(f":{r.R}/postgres")
    assert again.rto_seconds is not None and again.facts["declaration to DNS cutover (s)"] > 0
    assert again.rpo_objective_seconds == 300

    pgcluster.psql(r.layout, r.R, "INSERT INTO ledger (note) VALUES ('during')")  # written in the DR region

    r.health.set_healthy("primary", True)
    state, back = run(regional_failback, **r.params())
    assert state.name == "FailedBack", back.summary
    assert back.facts["resync"]["method"] == "rewind"
    assert r.cluster.writers() == [r.P] and r.cluster.follows(r.R, r.P) and pgcluster.replica_streaming(r.layout)
    assert r.rows(r.P, "during") == 1 and r.rows(r.P, "before") == 1
    assert r.dns() == {"lb.primary.test"}
    assert r.replicas(r.dr_kube) == {name: 0 for name in TIERS} and r.replicas(r.primary_kube) == TIERS
    assert r.primary_kube.read_secret_value("db", "DATABASE_URL").get_secret_value().endswith(f":{r.P}/postgres")
    pgcluster.psql(r.layout, r.P, "INSERT INTO ledger (note) VALUES ('after')")


def test_failback_with_the_dr_database_down_is_refused_before_any_change(regions: TwoRegions):
    from flows.regional_failback import regional_failback
    from runbook.failover import clear_journal, write_journal

    r = regions
    scope = f"estate-{r.zone}"
    r.cluster.stop_at(r.P)  # failed over by hand: the DR database took over, the old primary is stale
    r.cluster.promote(r.R)
    write_journal(scope, {"promoted_port": r.R, "incident_id": "test-failback-down"})
    r.cluster.stop_at(r.R)  # and now the DR database is down too
    try:
        state, report = run(regional_failback, **r.params())
        assert state.name == "DrDatabaseDown", report.summary
        assert r.cluster.role(r.P) == "unreachable" and r.cluster.role(r.R) == "unreachable"  # nothing reopened
        assert not any(s.step.startswith(("Resync", "Switch")) for s in report.steps)
    finally:
        clear_journal(scope)
        r.cluster.start_at(r.R)
    restore_topology(r.cluster, r.P, r.R)
    r.untouched()


def test_dry_run_and_rejection_change_nothing(regions: TwoRegions, prefect_api):
    from flows.regional_failover import regional_failover

    r = regions
    r.health.set_healthy("primary", False)
    state, report = run(regional_failover, **r.params(dry_run=True))
    assert state.name == "DryRun"
    assert "DNS api.example.test. CNAME: lb.primary.test -> lb.dr.test (TTL 30 s)" in report.plan
    assert any(line.startswith(f"database 127.0.0.1:{r.P}: primary -> fenced") for line in report.plan)
    assert any("core-api (tier 1): 0 -> 2 replicas" in line for line in report.plan)
    r.untouched()

    run_name = f"reject-{uuid.uuid4().hex[:6]}"

    def reject():
        paused = wait_for_run(run_name, lambda fr: fr.state is not None and fr.state.is_paused(), timeout=240)
        resume_flow_run(paused.id, run_input={"approve": False, "approver": "alice", "comment": "primary is back",
                                              "accept_data_loss": False})

    answer = threading.Thread(target=reject, daemon=True)
    answer.start()
    state = regional_failover.with_options(flow_run_name=run_name)(
        **r.params(approval_policy="required", drill=False, allowed_approvers=["alice"], approval_poll_seconds=0.3,
                   approval_timeout_seconds=300), return_state=True)
    answer.join(timeout=60)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "Rejected" and report.approvals[0].approver == "alice"
    assert report.approvals[0].details == {"accept_data_loss": False}
    r.untouched()


def test_lag_above_rpo_blocks_and_old_primary_writing_blocks(regions: TwoRegions):
    from blocks import Objective, RecoveryObjectives
    from flows.regional_failover import regional_failover

    r = regions
    r.health.set_healthy("primary", False)
    # The primary still answers and takes writes, and the operator will not fence it here.
    state, report = run(regional_failover, **r.params(fence_old_primary_first=False))
    assert state.name == "SplitBrainRisk", report.summary
    r.untouched()

    tight = f"tight-{uuid.uuid4().hex[:6]}"
    RecoveryObjectives(functions={"database": Objective(rto_seconds=900, rpo_seconds=1)}).save(tight)
    r.cluster.query_one("SELECT pg_wal_replay_pause()", port=r.R)
    try:
        pgcluster.psql(r.layout, r.P, "INSERT INTO ledger (note) VALUES ('lagging')")
        time.sleep(1.5)
        state, report = run(regional_failover, **r.params(objectives_block=tight))
    finally:
        r.cluster.query_one("SELECT pg_wal_replay_resume()", port=r.R)
    assert state.name == "LagAboveRpo", report.summary
    assert report.rpo_seconds is not None and report.rpo_seconds > 1
    time.sleep(0.3)
    r.untouched()


def test_bad_inputs_are_refused_before_any_change(regions: TwoRegions):
    from flows.regional_failover import regional_failover

    r = regions
    r.health.set_healthy("primary", False)
    cases = [
        ({"dr_region": "no-such-region"}, "no Region block named 'no-such-region'"),
        ({"dr_region": r.primary}, "the primary and the DR region are the same"),
        ({"dns_ttl_seconds": 0}, "dns_ttl_seconds=0 (out of range)"),
        ({"health_failures": 0}, "health_failures=0 (out of range)"),
        ({"rollout_timeout_seconds": 0}, "rollout_timeout_seconds=0 (out of range)"),
        ({"approval_poll_seconds": 0}, "approval_poll_seconds=0 (out of range)"),
    ]
    for change, message in cases:
        state, report = run(regional_failover, **r.params(**change))
        assert state.is_failed() and report.outcome == "Refused", change
        assert message in report.summary, report.summary

    r.dr_kube.model_copy(update={"deployments": {**TIERS, "billing": 1}}).save(
        f"kube-dr-{r.dr.split('-', 1)[1]}", overwrite=True)
    state, report = run(regional_failover, **r.params())
    assert report.outcome == "Refused" and "deployment 'billing' does not exist" in report.summary
    r.untouched()


def test_a_run_killed_after_the_dns_cutover_is_rerun_without_promoting_or_flipping_dns_again(regions: TwoRegions,
                                                                                               prefect_api):
    """SIGKILL the failover while its smoke tests run, after the promotion and the DNS cutover. A rerun is
    refused while the dead run still holds the estate's lock; once the on-call marks that run Crashed, the
    rerun reclaims the lock and finishes the failover without promoting or flipping DNS again."""
    import os
    import signal

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from flows.regional_failover import regional_failover

    r = regions
    r.cluster.stop_at(r.P)  # the region is lost
    r.health.set_healthy("primary", False)
    run_name = f"killed-{uuid.uuid4().hex[:6]}"
    # The smoke query holds the run after the cutover long enough to kill it there.
    proc = start_flow(prefect_api, run_name, r.params(smoke_queries=["SELECT pg_sleep(30)"]),
                      flow="flows.regional_failover:regional_failover")
    try:
        deadline = time.monotonic() + 180
        while r.dns() != {"lb.dr.test"}:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the failover did not reach the DNS cutover in 180 s"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = wait_for_run(run_name, lambda fr: fr.state is not None)
    try:
        assert killed.state.is_running()  # a killed process cannot report its end
        assert r.cluster.role(r.R) == "primary"
        state, refused = run(regional_failover, **r.params(lock_wait_seconds=2))
        assert state.is_failed() and str(killed.id) in state.message and "dr unlock" in state.message, state.message
    finally:
        with get_client(sync_client=True) as client:  # what the on-call does in the UI: mark the dead run Crashed
            client.set_flow_run_state(killed.id, Crashed(message="worker host lost"), force=True)
    state, again = run(regional_failover, **r.params())
    assert state.name == "FailedOver", again.summary
    assert again.promotion["already_promoted"] is True
    assert again.facts["dns change"] == "none: already pointing at the DR region"
    assert r.dns() == {"lb.dr.test"} and r.cluster.writers() == [r.R]
    assert r.replicas(r.dr_kube) == TIERS
