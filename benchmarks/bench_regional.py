"""Regional failover: time from declaration to DNS cutover, per step, flow against plain script.

A real primary + replica, moto's Route53, the Kubernetes emulator and switchable health
endpoints on loopback. Each round stops the primary and fails its region's health endpoints, then
fails over either with the ``regional-failover`` flow or with the same block verbs called one
after the other by a plain script; the topology is restored between rounds. Prints
``NAME: ratio=X goal<=Y`` and ``NAME: value=X UNIT`` lines, and the per-step breakdown.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sandbox import pgcluster  # noqa: E402
from sandbox.paths import free_port  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
HEALTH_WINDOW = float(os.environ.get("BENCH_HEALTH_WINDOW", "2"))
DEPLOYMENTS = {"auth": 2, "core-api": 2, "dashboard": 1, "analytics": 1}
TIERS = [["auth", "core-api"], ["dashboard"], ["analytics"]]


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


class Estate:
    """Everything both methods act on, built once."""

    def __init__(self, base: Path, moto_url: str, kube_url: str, health) -> None:
        from prefect_aws import AwsCredentials
        from prefect_aws.client_parameters import AwsClientParameters

        from blocks import PostgresCluster, PostgresInstance
        from blocks.dns import DnsRecord, DnsZone
        from blocks.kubernetes import KubernetesTarget
        from blocks.region import Region

        self.layout = pgcluster.ClusterLayout(base / "cluster", free_port(), free_port(), "bench-password")
        pgcluster.build(self.layout, with_replica=True)
        pgcluster.psql(self.layout, self.P, "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
        self.cluster = PostgresCluster(
            primary=PostgresInstance(port=self.P, data_directory=str(self.layout.primary_dir)),
            replicas=[PostgresInstance(port=self.R, data_directory=str(self.layout.replica_dir))],
            password=self.layout.password, socket_directory=str(self.layout.socket_dir),
            pgbackrest_config=str(self.layout.pgbackrest_conf), recovery_directory=str(self.layout.recovery_dir),
            environment="sandbox")
        self.cluster.save("bench-regional", overwrite=True)
        creds = AwsCredentials(aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1",
                               aws_client_parameters=AwsClientParameters(endpoint_url=moto_url))
        zone_id = creds.get_client("route53").create_hosted_zone(
            Name="bench.test", CallerReference=uuid.uuid4().hex)["HostedZone"]["Id"]
        self.zone = DnsZone(hosted_zone_id=zone_id, records=[DnsRecord(name="api.bench.test")],
                            primary_target="lb.primary.bench.test", secondary_target="lb.dr.bench.test", ttl=30,
                            credentials=creds, poll_interval_seconds=0.1)
        self.zone.save("bench-regional", overwrite=True)
        self.health = health
        self.kubes = {}
        for region, port, target in (("primary", self.P, self.zone.primary_target), ("dr", self.R, self.zone.secondary_target)):
            kube = KubernetesTarget(api_server=kube_url, namespace=f"bench-{region}", verify_tls=False,
                                    environment="sandbox", deployments=dict(DEPLOYMENTS), poll_interval_seconds=0.05)
            for name in DEPLOYMENTS:
                labels = {"app": name}
                kube.create_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
                                    "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                                             "template": {"metadata": {"labels": labels},
                                                          "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}})
            kube.save(f"bench-{region}", overwrite=True)
            self.kubes[region] = kube
            Region(name=f"bench-{region}", postgres_cluster="bench-regional", postgres_port=port,
                   kubernetes_target=f"bench-{region}", dns_target=target, tiers=TIERS, database_secret="db",
                   health_endpoints={"api": health.endpoint(region, "api"), "auth": health.endpoint(region, "auth")},
                   ).save(f"bench-{region}", overwrite=True)

    @property
    def P(self) -> int:
        return self.layout.primary_port

    @property
    def R(self) -> int:
        return self.layout.replica_port

    def reset(self) -> None:
        """Original topology, DNS on the primary, DR scaled down, every endpoint healthy."""
        from runbook.failover import clear_journal

        c = self.cluster
        if c.role(self.P) == "unreachable" and c.role(self.R) == "primary":
            c.resync_as_standby(self.P, self.R)
        c.switchover(self.P)
        clear_journal("estate-bench-regional")
        self.zone.cutover(self.zone.primary_target)
        for name in DEPLOYMENTS:
            self.kubes["dr"].scale(name, 0)
        self.health.board.reset()

    def outage(self) -> None:
        pgcluster.psql(self.layout, self.P, "INSERT INTO ledger (note) VALUES ('before')")
        time.sleep(0.2)
        pgcluster.stop(self.layout.primary_dir)
        self.health.set_healthy("primary", False)


def run_script(estate: Estate) -> tuple[float, dict[str, float]]:
    """The failover as a plain script: the same block verbs, one after the other, no Prefect."""
    from blocks.region import Region

    steps: dict[str, float] = {}
    started = time.perf_counter()

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        steps[name] = round(now - since, 3)
        return now

    t = started
    primary, dr = Region.load("bench-primary"), Region.load("bench-dr")
    primary.check_pair(dr)
    estate.cluster.instance_at(primary.postgres_port)
    for name in DEPLOYMENTS:
        estate.kubes["dr"].get_deployment(name)
    estate.zone.check_zone()
    t = mark("Declare: validate the estate", t)
    evidence = primary.health().probe(2, HEALTH_WINDOW)
    assert evidence.outage_confirmed
    t = mark("Health evidence: primary region", t)
    assert estate.cluster.role(estate.R) == "standby"
    lag = estate.cluster.replica_lag(estate.R, estate.P)
    assert lag.within(300)
    t = mark("Database evidence", t)
    estate.cluster.fence_old_primary(estate.P)
    estate.cluster.promote(estate.R)
    t = mark("Database failover", t)
    kube = estate.kubes["dr"]
    kube.set_secret_value("db", "DATABASE_URL", f"postgresql://postgres@127.0.0.1:{estate.R}/postgres")
    t = mark("Repoint the DR applications", t)
    for number, tier in enumerate(TIERS, 1):
        for name in tier:
            kube.scale(name, DEPLOYMENTS[name])
        for name in tier:
            kube.wait_ready(name, timeout=60)
        t = mark(f"Scale up DR workloads: tier {number}", t)
    estate.zone.cutover(estate.zone.secondary_target)
    t = mark("DNS cutover", t)
    return t - started, steps


def main() -> None:
    from moto.server import ThreadedMotoServer
    from prefect.testing.utilities import prefect_test_harness

    from sandbox.health import HealthServer
    from sandbox.kube import serve_in_thread

    base = Path(tempfile.mkdtemp(prefix="dr-bench-regional-", dir="/tmp"))
    os.chmod(base, 0o755)
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    kube = serve_in_thread()
    health = HealthServer().start()
    try:
        with prefect_test_harness(server_startup_timeout=90):
            estate = Estate(base, f"http://127.0.0.1:{moto_port}", kube.url, health)
            script_times, flow_times, script_steps, flow_steps = [], [], [], []
            for round_no in range(ROUNDS):
                # Alternate which method goes first, so neither always pays for a cold start.
                methods = [("script", run_script, script_times, script_steps), ("flow", run_flow, flow_times, flow_steps)]
                for label, method, times, breakdown in (methods if round_no % 2 == 0 else methods[::-1]):
                    estate.reset()
                    estate.outage()
                    elapsed, steps = method(estate)
                    times.append(elapsed)
                    breakdown.append(steps)
                    log(f"round {round_no + 1}: {label} {elapsed:.2f} s")
            estate.reset()
        script, flow = statistics.median(script_times), statistics.median(flow_times)
        print(f"regional_failover_declaration_to_dns_cutover_flow_vs_plain_script: ratio={flow / script:.2f} goal<=1.5 "
              f"(flow {flow:.2f} s, script {script:.2f} s, health window {HEALTH_WINDOW:g} s, median of {ROUNDS})")
        print(f"regional_failover_declaration_to_dns_cutover: value={flow:.2f} s (flow, median of {ROUNDS})")
        names = list(dict.fromkeys([*flow_steps[0], *script_steps[0]]))
        print("# step | flow s (median) | script s (median)")
        for name in names:
            f = statistics.median(s.get(name, 0.0) for s in flow_steps)
            s_ = statistics.median(s.get(name, 0.0) for s in script_steps)
            print(f"#   {name} | {f:.3f} | {s_:.3f}")
    finally:
        health.stop()
        kube.stop()
        moto.stop()
        pgcluster.stop_all(base / "cluster")
        shutil.rmtree(base, ignore_errors=True)


def run_flow(estate: Estate) -> tuple[float, dict[str, float]]:
    """The flow's declaration-to-cutover time: from the call to the end of its DNS cutover step."""
    from flows.regional_failover import regional_failover
    from runbook.evidence import load_report

    called_at = time.time()
    state = regional_failover(primary_region="bench-primary", dr_region="bench-dr", dns_zone="bench-regional",
                              health_window_seconds=HEALTH_WINDOW, rollout_timeout_seconds=60,
                              approval_policy="auto", drill=True, return_state=True)
    if state.name != "FailedOver":
        raise RuntimeError(f"flow ended {state.name}: {state.message}")
    report = load_report(state.state_details.flow_run_id)
    cutover = next(s for s in report.steps if s.step == "DNS cutover")
    steps = {s.step: round((s.end - s.start).total_seconds(), 3) for s in report.steps if s.end}
    return cutover.end.timestamp() - called_at, steps


if __name__ == "__main__":
    main()
