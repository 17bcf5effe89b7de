"""Regional drills on the sandbox: a second 'region' made of the replica, its own namespace of
deployments and its own health endpoints; a Route53 zone on moto moves between the two.

* ``regional_outage``: under a steady write load the primary PostgreSQL stops and the primary
  region's health endpoints fail; the regional failover runs, then the failback. Rows committed
  before the outage and missing afterwards are the measured RPO.
* ``db_server_failure``: under the same load the primary server is lost; the database failover
  promotes the replica and repoints the applications; the original topology is then restored.

Both leave the sandbox as they found it: the primary on its port and data directory, the replica
streaming from it, DNS on the primary region, the DR region scaled down.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx
import psycopg

from sandbox import addresses, pgcluster
from sandbox.drillkit import DrillResult, save_report
from sandbox.drillkit import check as _check

PRIMARY_REGION = "primary"
DR_REGION = "dr"
ZONE_BLOCK = "sandbox-regions"
ZONE_NAME = "sandbox.dr.test"
PRIMARY_TARGET = "lb.primary.sandbox.dr.test"
DR_TARGET = "lb.dr.sandbox.dr.test"
KUBE_BLOCKS = {PRIMARY_REGION: "sandbox-primary-apps", DR_REGION: "sandbox-dr-apps"}
NAMESPACES = {PRIMARY_REGION: "region-primary", DR_REGION: "region-dr"}
# The Service Recovery Priorities tiers: auth and core-api first, then the dashboard, then analytics.
DEPLOYMENTS = {"auth": 2, "core-api": 2, "dashboard": 1, "analytics": 1}
SECRET = "db"
SERVICES = ("api", "auth")
HEALTH_WINDOW_SECONDS = 2.0
LOAD_SECONDS_BEFORE_OUTAGE = 3.0

SEED_SQL = """
CREATE SCHEMA IF NOT EXISTS drill_region;
DROP TABLE IF EXISTS drill_region.writes;
CREATE TABLE drill_region.writes (id bigint PRIMARY KEY, note text NOT NULL,
                                  committed_at timestamptz NOT NULL DEFAULT clock_timestamp());
INSERT INTO drill_region.writes (id, note) SELECT g, 'seed' FROM generate_series(1, {rows}) g;
"""


def _zone_id(credentials) -> str:
    """The sandbox's hosted zone on moto, created when absent (moto keeps nothing across restarts)."""
    r53 = credentials.get_client("route53")
    for zone in r53.list_hosted_zones_by_name(DNSName=ZONE_NAME)["HostedZones"]:
        if zone["Name"] == f"{ZONE_NAME}.":
            return zone["Id"]
    return r53.create_hosted_zone(Name=ZONE_NAME, CallerReference=f"dr-sandbox-{time.time_ns()}")["HostedZone"]["Id"]


def save_blocks(ep) -> None:
    """Save the Regions 'primary' and 'dr', their KubernetesTargets and the DnsZone of the sandbox."""
    from blocks.dns import DnsRecord, DnsZone
    from blocks.kubernetes import KubernetesTarget
    from blocks.region import Region

    lay = addresses.layout(ep.root)
    credentials = ep.aws_credentials()
    zone = DnsZone(hosted_zone_id=_zone_id(credentials),
                   records=[DnsRecord(name=f"api.{ZONE_NAME}"), DnsRecord(name=f"app.{ZONE_NAME}")],
                   primary_target=PRIMARY_TARGET, secondary_target=DR_TARGET, ttl=30, credentials=credentials,
                   poll_interval_seconds=0.2, insync_timeout_seconds=60)
    zone.save(ZONE_BLOCK, overwrite=True)
    for region, port, target in ((PRIMARY_REGION, lay.primary_port, PRIMARY_TARGET),
                                 (DR_REGION, lay.replica_port, DR_TARGET)):
        KubernetesTarget(api_server=ep.kube_url, namespace=NAMESPACES[region], verify_tls=False, environment="sandbox",
                         region=region, deployments=dict(DEPLOYMENTS), rollout_timeout_seconds=60,
                         poll_interval_seconds=0.1).save(KUBE_BLOCKS[region], overwrite=True)
        Region(name=region, postgres_cluster=addresses.CLUSTER_BLOCK, postgres_port=port,
               kubernetes_target=KUBE_BLOCKS[region],
               health_endpoints={s: f"{ep.health_url}/{region}/{s}/health" for s in SERVICES},
               dns_target=target, database_secret=SECRET).save(region, overwrite=True)


@dataclass
class Sandbox:
    """The loaded sandbox pieces a regional drill acts on."""

    ep: object
    layout: pgcluster.ClusterLayout
    cluster: object
    zone: object
    kubes: dict
    health_url: str

    @property
    def P(self) -> int:
        return self.layout.primary_port

    @property
    def R(self) -> int:
        return self.layout.replica_port

    def set_health(self, region: str, healthy: bool) -> None:
        httpx.post(f"{self.health_url}/{region}/state", json={"healthy": healthy}, timeout=5).raise_for_status()


def prepare() -> Sandbox:
    """Blocks saved, workloads seeded, health reset, DNS on the primary, the database in its original topology."""
    from blocks import PostgresCluster
    from blocks.dns import DnsZone
    from blocks.kubernetes import KubernetesTarget
    from sandbox.services import endpoints

    ep = endpoints()
    lay = addresses.layout(ep.root)
    save_blocks(ep)
    from runbook.failover import clear_journal

    cluster = PostgresCluster.load(addresses.CLUSTER_BLOCK)
    restore_topology(cluster, lay)
    # The topology is rebuilt: promotions journalled by earlier (failed) drills no longer describe it.
    clear_journal(addresses.CLUSTER_BLOCK)
    clear_journal(f"estate-{ZONE_BLOCK}")
    zone = DnsZone.load(ZONE_BLOCK)
    zone.cutover(zone.primary_target)
    httpx.post(f"{ep.health_url}/reset", timeout=5).raise_for_status()
    kubes = {region: KubernetesTarget.load(name) for region, name in KUBE_BLOCKS.items()}
    for region, kube in kubes.items():
        for name, count in DEPLOYMENTS.items():
            wanted = count if region == PRIMARY_REGION else 0
            if not kube.deployment_exists(name):
                kube.create_object(_deployment(name, wanted))
            else:
                kube.scale(name, wanted)
        kube.set_secret_value(SECRET, "DATABASE_URL", lay.dsn(lay.primary_port))
    return Sandbox(ep, lay, cluster, zone, kubes, ep.health_url)


def _deployment(name: str, replicas: int) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": f"registry.local/{name}:1.0"}]}}}}


def restore_topology(cluster, lay: pgcluster.ClusterLayout) -> None:
    """The primary on its own port and data directory, the replica streaming from it (repairing an earlier run)."""
    P, R = lay.primary_port, lay.replica_port
    if cluster.role(P) == "unreachable":
        if cluster.role(R) == "primary":
            cluster.resync_as_standby(P, R)
        else:
            pgcluster.start(lay.primary_dir)
    if cluster.role(P) != "primary":
        cluster.switchover(P)
    # A replica left on another timeline by a point-in-time restore of the primary, or carrying that
    # restore's recovery target (it would promote itself on reaching it), is rewound or re-cloned.
    cluster.resync_as_standby(R, P)
    _prune_failed_directories(lay)


def _prune_failed_directories(lay: pgcluster.ClusterLayout, keep: int = 1) -> None:
    """Sandbox housekeeping: keep only the newest data directory a resync moved aside."""
    kept = sorted((p for p in (lay.root / "pg").glob("*.failed-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class WriteLoad:
    """A steady stream of single-row commits to the primary, recording what the client saw committed."""

    dsn: dict
    first_id: int
    committed: list[tuple[int, datetime]] = field(default_factory=list)
    error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> WriteLoad:
        self._thread = threading.Thread(target=self._run, name="drill-write-load", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_id = self.first_id
        try:
            with psycopg.connect(**self.dsn, autocommit=True, connect_timeout=5) as conn:
                while not self._stop.is_set():
                    row = conn.execute("INSERT INTO drill_region.writes (id, note) VALUES (%s, 'load') "
                                       "RETURNING committed_at", (next_id,)).fetchone()
                    self.committed.append((next_id, row[0]))
                    next_id += 1
                    time.sleep(0.005)
        except psycopg.Error as exc:
            self.error = type(exc).__name__

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)


def _start_load(sb: Sandbox, rows: int) -> WriteLoad:
    pgcluster.psql(sb.layout, sb.P, SEED_SQL.format(rows=rows))
    deadline = time.monotonic() + 60
    while sb.cluster.replica_lag(sb.R).bytes:
        if time.monotonic() > deadline:
            raise pgcluster.SandboxError(f"replica on port {sb.R} did not catch up with the seeded rows in 60 s")
        time.sleep(0.2)
    load = WriteLoad({"host": "127.0.0.1", "port": sb.P, "user": "postgres", "password": sb.layout.password,
                      "dbname": "postgres"}, rows + 1).start()
    time.sleep(LOAD_SECONDS_BEFORE_OUTAGE)
    return load


def _measure_loss(sb: Sandbox, load: WriteLoad, port: int) -> tuple[int, float]:
    """Rows the client saw committed that the serving database lacks, and the seconds of commits they span."""
    acked = list(load.committed)
    if not acked:
        return 0, 0.0
    present = {int(v) for v in pgcluster.psql(
        sb.layout, port, f"SELECT id FROM drill_region.writes WHERE id >= {acked[0][0]}").split()}
    missing = [(i, at) for i, at in acked if i not in present]
    if not missing:
        return 0, 0.0
    kept = [at for i, at in acked if i in present]
    last_kept = max(kept) if kept else missing[0][1]
    return len(missing), max(0.0, (max(at for _, at in missing) - last_kept).total_seconds())


def _result(scenario: str, report, flow_run_id: str, report_path, checks: list[dict], extra: dict) -> DrillResult:
    info = addresses.info()
    return DrillResult(
        scenario=scenario, passed=all(c["passed"] for c in checks), rto_seconds=report.rto_seconds,
        rto_objective_seconds=report.rto_objective_seconds, rpo_seconds=report.rpo_seconds,
        rpo_objective_seconds=report.rpo_objective_seconds, flow_run_id=flow_run_id, outcome=report.outcome,
        report=str(report_path), ui_url=f"{info.ui_url}/runs/flow-run/{flow_run_id}", checks=checks, extra=extra,
    )


def regional_outage(rows: int = 100_000) -> DrillResult:
    """Lose the primary region under a write load; fail over to the DR region, then fail back."""
    from flows.regional_failback import regional_failback
    from flows.regional_failover import regional_failover
    from runbook.evidence import load_report
    from runbook.failover import clear_journal

    sb = prepare()
    load = _start_load(sb, rows)
    # The outage: the primary database dies without a clean shutdown and the region's endpoints fail.
    outage_at = datetime.now(timezone.utc)
    pgcluster.stop(sb.layout.primary_dir, "immediate")
    sb.set_health(PRIMARY_REGION, False)
    load.stop()
    common = dict(primary_region=PRIMARY_REGION, dr_region=DR_REGION, dns_zone=ZONE_BLOCK,
                  health_window_seconds=HEALTH_WINDOW_SECONDS, rollout_timeout_seconds=60,
                  smoke_queries=["SELECT count(*) FROM drill_region.writes"], approval_policy="auto", drill=True)
    state = regional_failover(incident_detected_at=outage_at, **common, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    report = load_report(flow_run_id)
    report_path = save_report(sb.ep.root, flow_run_id)
    checks = [_check("failover outcome", report.outcome == "FailedOver", f"{state.name}: {report.summary}")]
    lost_rows, lost_seconds = 0, 0.0
    if report.outcome == "FailedOver":
        lost_rows, lost_seconds = _measure_loss(sb, load, sb.R)
        checks += [
            _check("DNS points at the DR region", sb.zone.points_at(DR_TARGET), str(sb.zone.current_targets())),
            _check("DR workloads scaled up", all(sb.kubes[DR_REGION].get_replicas(n).spec == c for n, c in DEPLOYMENTS.items()),
                   ", ".join(f"{n}={sb.kubes[DR_REGION].get_replicas(n).spec}" for n in DEPLOYMENTS)),
            _check("measured RPO within objective", lost_seconds <= report.rpo_objective_seconds,
                   f"{lost_rows} acknowledged rows missing, {lost_seconds:.3f} s of commits"),
        ]
        pgcluster.psql(sb.layout, sb.R, f"INSERT INTO drill_region.writes (id, note) VALUES ({10**12}, 'during')")

    sb.set_health(PRIMARY_REGION, True)  # the region is back
    back_state = regional_failback(**common, return_state=True)
    back_id = str(back_state.state_details.flow_run_id)
    back = load_report(back_id)
    back_path = save_report(sb.ep.root, back_id)
    checks.append(_check("failback outcome", back.outcome == "FailedBack", f"{back_state.name}: {back.summary}"))
    restore_topology(sb.cluster, sb.layout)
    clear_journal(f"estate-{ZONE_BLOCK}")
    topology = sb.cluster.writers() == [sb.P] and pgcluster.replica_streaming(sb.layout)
    checks.append(_check("original topology restored", topology, f"writers {sb.cluster.writers()}"))
    if report.outcome == "FailedOver":
        during = pgcluster.psql(sb.layout, sb.P, f"SELECT count(*) FROM drill_region.writes WHERE id = {10**12}")
        checks.append(_check("row written during the failover survives the failback", during == "1", f"{during} of 1"))
    checks.append(_check("DNS back on the primary region", sb.zone.points_at(PRIMARY_TARGET), str(sb.zone.current_targets())))
    checks.append(_check("RTO within objective", bool(report.rto_met),
                         f"{report.rto_seconds} s of {report.rto_objective_seconds} s"))
    steps = report.facts.get("step seconds", {})
    return _result("regional-outage", report, flow_run_id, report_path, checks, {
        "measured_rpo_rows": lost_rows, "measured_rpo_seconds": round(lost_seconds, 3),
        "rows_committed_under_load": len(load.committed), "load_error": load.error,
        "declaration_to_dns_cutover_seconds": report.facts.get("declaration to DNS cutover (s)"),
        "failover_step_seconds": steps, "failback_flow_run_id": back_id, "failback_report": str(back_path),
        "failback_step_seconds": back.facts.get("step seconds", {}),
    })


def db_server_failure(rows: int = 100_000) -> DrillResult:
    """Lose the primary server under a write load; fail over to the replica, then restore the topology."""
    from flows.db_failover import db_failover
    from runbook.evidence import load_report
    from runbook.failover import clear_journal

    sb = prepare()
    load = _start_load(sb, rows)
    outage_at = datetime.now(timezone.utc)
    pgcluster.stop(sb.layout.primary_dir, "immediate")
    load.stop()
    kube = sb.kubes[PRIMARY_REGION]
    state = db_failover(cluster_block=addresses.CLUSTER_BLOCK, incident_detected_at=outage_at,
                        kubernetes_target=KUBE_BLOCKS[PRIMARY_REGION], database_secret=SECRET,
                        restart_deployments=["auth", "core-api"], smoke_queries=["SELECT count(*) FROM drill_region.writes"],
                        approval_policy="auto", drill=True, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    report = load_report(flow_run_id)
    report_path = save_report(sb.ep.root, flow_run_id)
    checks = [_check("failover outcome", report.outcome == "FailedOver", f"{state.name}: {report.summary}")]
    lost_rows, lost_seconds = 0, 0.0
    if report.outcome == "FailedOver":
        lost_rows, lost_seconds = _measure_loss(sb, load, sb.R)
        dsn = kube.read_secret_value(SECRET, "DATABASE_URL").get_secret_value()
        checks += [
            _check("applications repointed", dsn.endswith(f":{sb.R}/postgres"), dsn.rsplit("@", 1)[-1]),
            _check("one writer", sb.cluster.writers() == [sb.R], f"writers {sb.cluster.writers()}"),
            _check("measured RPO within objective", lost_seconds <= report.rpo_objective_seconds,
                   f"{lost_rows} acknowledged rows missing, {lost_seconds:.3f} s of commits"),
        ]
    restore_topology(sb.cluster, sb.layout)
    clear_journal(addresses.CLUSTER_BLOCK)  # the failover is undone: a later one starts afresh
    kube.set_secret_value(SECRET, "DATABASE_URL", sb.layout.dsn(sb.P))
    topology = sb.cluster.writers() == [sb.P] and pgcluster.replica_streaming(sb.layout)
    checks.append(_check("original topology restored", topology, f"writers {sb.cluster.writers()}"))
    checks.append(_check("RTO within objective", bool(report.rto_met),
                         f"{report.rto_seconds} s of {report.rto_objective_seconds} s"))
    return _result("db-server-failure", report, flow_run_id, report_path, checks, {
        "measured_rpo_rows": lost_rows, "measured_rpo_seconds": round(lost_seconds, 3),
        "rows_committed_under_load": len(load.committed), "load_error": load.error,
        "step_seconds": report.facts.get("step seconds", {}),
    })
