"""A dry run changes nothing on any path: not where an earlier run of the same incident journalled its work.

Every test leaves an estate half or fully recovered by an earlier run (journalled), runs the flow again with
``dry_run=True`` for the same incident, and proves the run ended DryRun, said what a real run would do, and
changed nothing.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

from fixtures_kube import seed_deployment
from test_regional import pair, regions  # noqa: F401 - fixtures shared with the regional tests
from test_regional import run as run_regional
from test_vector_db import build_live, estate  # noqa: F401 - fixture shared with the vector DB tests
from test_vector_db import run as run_vector

from blocks import VerificationQuery
from conftest import seed_before_after, sql
from flows.db_corruption import db_corruption
from runbook.evidence import load_report

# Logs one line each time it runs; planning or preparing a query that calls it runs nothing.
SENTINEL_FUNCTION = ("CREATE FUNCTION dr_sentinel() RETURNS int LANGUAGE plpgsql VOLATILE AS "
                     "$$ BEGIN RAISE LOG 'dr-sentinel-%', 'ran'; RETURN 1; END $$")
SENTINEL = VerificationQuery(name="sentinel", sql="SELECT dr_sentinel()", expected="1")


def sentinel_runs(layout) -> int:
    """How often the sentinel ran on any instance of ``layout`` (every instance logs beside its data directory)."""
    return sum(path.read_text(errors="replace").count("dr-sentinel-ran") for path in layout.root.rglob("*.log"))


def _directory(block, path: str) -> tuple | None:
    """What identifies a data directory and its server: inode, postmaster.pid, auto.conf, recovery marker."""
    if not os.path.isdir(path):
        return None

    def text(name: str) -> str | None:
        try:
            with open(os.path.join(path, name)) as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    return os.stat(path).st_ino, text("postmaster.pid"), text("postgresql.auto.conf"), block.read_marker(path)


def database_state(block, layout, incident: str) -> dict:
    primary = str(layout.primary_dir)
    return {
        "primary": _directory(block, primary),
        "candidate": _directory(block, block.candidate_directory(incident)),
        "aside": _directory(block, f"{primary}.replaced-{incident}"),
        "timeline": sql(layout, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "fenced": block.is_fenced(),
        "sentinel runs": sentinel_runs(layout),
    }


def test_db_corruption_dry_rerun_of_a_journalled_promotion_changes_nothing(cluster):
    name, block, pg = cluster
    sql(pg, SENTINEL_FUNCTION)
    target = seed_before_after(pg)
    params = dict(cluster_block=name, recovery_target=target.isoformat(), incident_detected_at=datetime.now(timezone.utc),
                  verification_queries=[SENTINEL], approval_policy="auto", drill=True, take_backup_after=False,
                  lock_wait_seconds=5)
    first = db_corruption(**params, dry_run=True, return_state=True)
    incident = load_report(first.state_details.flow_run_id).incident_id
    # A run of this incident was approved, journalled its promotion and lost its worker before moving anything.
    block.archive_wal()
    block.fence()
    candidate = block.restore_beside(incident, target)
    marker = block.read_marker(candidate.data_directory)
    block._write_marker(candidate.data_directory, {**marker, "state": "promoting",
                                                   "old_primary_aside": f"{pg.primary_dir}.replaced-{incident}"})
    assert block.promotion_progress(incident) == "interrupted"

    before = database_state(block, pg, incident)
    state = db_corruption(**params, dry_run=True, return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun" and report.outcome == "DryRun", report.summary
    assert database_state(block, pg, incident) == before
    assert report.plan[0].startswith(f"the promotion of incident {incident} was journalled (interrupted); "
                                     "a real run would finish it")
    assert "finish" in report.summary and not report.checks and report.promotion is None
    assert not any(s.step.startswith(("Resume: finish", "Post-checks", "Promote")) for s in report.steps)

    # The real re-run finishes the promotion and runs the sentinel at the endpoint: the sentinel shows.
    done = db_corruption(**params, return_state=True)
    assert done.name == "Recovered", done.message
    assert sentinel_runs(pg) > before["sentinel runs"]
    assert block.promotion_progress(incident) == "promoted"

    before = database_state(block, pg, incident)
    state = db_corruption(**params, dry_run=True, return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun", report.summary
    assert database_state(block, pg, incident) == before
    assert report.plan[0].startswith(f"the promotion of incident {incident} was journalled (promoted); "
                                     "a real run would confirm it")
    assert not report.checks and report.promotion is None


def test_regional_and_db_failover_dry_runs_after_journalled_work_change_nothing(regions, pair):  # noqa: F811
    from flows.db_failover import db_failover
    from flows.regional_failback import regional_failback
    from flows.regional_failover import regional_failover
    from runbook.failover import clear_journal, write_journal

    r, cluster_block = regions, pair[0]
    scope = f"estate-{r.zone}"

    # A failback that switched the database back and was journalled, then lost its worker.
    write_journal(scope, {"failback": "switched", "failback_incident_id": "inc-back"})
    try:
        state, report = run_regional(regional_failback, **r.params(dry_run=True, incident_id="inc-back"))
        assert state.name == "DryRun", report.summary
        assert report.plan[0].startswith(f"switch journalled: 127.0.0.1:{r.P} is already the primary")
        r.untouched()
    finally:
        clear_journal(scope)

    # A regional failover (and a database failover) whose promotion of the DR database was journalled.
    r.cluster.stop_at(r.P)
    r.health.set_healthy("primary", False)
    r.cluster.promote(r.R)
    for journal in (scope, cluster_block):
        write_journal(journal, {"promoted_port": r.R, "incident_id": "inc-fo", "state": "promoted"})

    def snapshot() -> tuple:
        return (r.cluster.role(r.P), r.cluster.role(r.R), r.dns(), r.replicas(r.dr_kube), r.replicas(r.primary_kube),
                r.dr_kube.get_deployment("core-api"), os.path.exists(r.layout.primary_dir / "postmaster.pid"))

    try:
        before = snapshot()
        assert before[:2] == ("unreachable", "primary")
        state, report = run_regional(regional_failover, **r.params(dry_run=True, incident_id="inc-fo",
                                                                      require_outage=False))
        assert state.name == "DryRun", report.summary
        assert report.plan[0].startswith(f"promotion journalled: 127.0.0.1:{r.R} is already the primary")
        assert any("lb.primary.test -> lb.dr.test" in line for line in report.plan)
        assert snapshot() == before

        state = db_failover(cluster_block=cluster_block, failed_port=r.P, incident_id="inc-fo", approval_policy="auto",
                            drill=True, lock_wait_seconds=5, dry_run=True, return_state=True)
        report = load_report(state.state_details.flow_run_id)
        assert state.name == "DryRun", report.summary
        assert report.plan[0].startswith(f"the promotion of 127.0.0.1:{r.R} was journalled")
        assert snapshot() == before
    finally:
        for journal in (scope, cluster_block):
            clear_journal(journal)
        r.health.set_healthy("primary", True)


def test_vector_db_dry_rerun_after_the_alias_switch_changes_nothing(estate):  # noqa: F811
    block, alias = estate["block"], estate["alias"]
    incident = f"inc-{uuid.uuid4().hex[:6]}"
    build_live(block, alias, estate["vectors"], f"{incident}-r")  # an earlier run rebuilt and switched the alias
    before = (block.collections(), block.aliases())

    state, report = run_vector(estate, strategy="reindex", incident_id=incident, dry_run=True)
    assert state.name == "DryRun", report.summary
    assert report.plan[0].startswith(f"alias {alias} already points to {incident}-r")
    assert not report.checks and report.promotion is None
    assert (block.collections(), block.aliases()) == before


def test_object_storage_dry_run_of_a_half_done_failover_changes_nothing(moto_endpoint, kube, prefect_api):
    import boto3
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks.object_store import ObjectStore
    from flows.object_storage_recovery import FAILOVER_ANNOTATION, object_storage_recovery
    from sandbox.paths import free_port

    def credentials(endpoint: str, **config) -> AwsCredentials:
        return AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
                              aws_client_parameters=AwsClientParameters(endpoint_url=endpoint, **config))

    replica = f"dr-half-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket=replica)
    s3.put_object(Bucket=replica, Key="up/0", Body=b"object 0")
    dead = f"http://127.0.0.1:{free_port()}"
    store = ObjectStore(bucket_name="primary-leads", secondary_bucket_name=replica, environment="sandbox",
                        credentials=credentials(dead, config={"retries": {"max_attempts": 1}}),
                        secondary_credentials=credentials(moto_endpoint))
    store_name, kube_name = f"store-{uuid.uuid4().hex[:8]}", f"kube-{uuid.uuid4().hex[:8]}"
    store.save(store_name)
    # An earlier run set the endpoint and restarted the deployment, then stopped before the bucket key.
    seed_deployment(kube, "api", replicas=2)
    kube.set_secret_value("minio", "endpoint", moto_endpoint)
    kube.set_secret_value("minio", "bucket", "primary-leads")
    kube.annotate_deployment("api", {FAILOVER_ANNOTATION: moto_endpoint})
    kube.save(kube_name)

    def applications() -> tuple:
        return (kube.read_secret_value("minio", "endpoint").get_secret_value(),
                kube.read_secret_value("minio", "bucket").get_secret_value(), kube.get_deployment("api"))

    before = applications()
    state = object_storage_recovery(store_block=store_name, mode="failover", prefix="up/", kube_block=kube_name,
                                    secret_name="minio", restart_deployments=["api"], rollout_timeout_seconds=10,
                                    approval_policy="auto", drill=True, incident_detected_at=datetime.now(timezone.utc),
                                    dry_run=True, return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun", report.summary
    assert report.plan[0].startswith("failover partly done already: 1 of 2 keys of secret")
    assert "1 of 1 deployments were restarted" in report.plan[0]
    assert f"secret {kube.namespace}/minio key bucket: current bucket -> {replica}" in report.plan
    assert not any("key endpoint" in line or line.startswith("rollout restart") for line in report.plan)
    assert applications() == before


def test_app_rollback_dry_rerun_of_a_rolled_back_incident_changes_nothing(kube, prefect_api):
    from flows.app_rollback import INCIDENT_ANNOTATION, app_rollback

    seed_deployment(kube, "shop", image="registry.local/shop:1.0",
                    images=["registry.local/shop:2.0", "registry.local/shop:3.0"])
    name = f"k8s-{uuid.uuid4().hex[:8]}"
    kube.save(name)
    kube.annotate_deployment("shop", {INCIDENT_ANNOTATION: "inc-rolled"})  # rolled back by an earlier run
    before = kube.get_deployment("shop")

    state = app_rollback(kubernetes_block=name, deployment="shop", incident_id="inc-rolled", rollout_timeout_seconds=5,
                         dry_run=True, return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun", report.summary
    assert "already rolled back" in report.plan[0]
    assert kube.get_deployment("shop") == before



def test_security_breach_dry_rerun_of_a_journalled_promotion_changes_nothing(breach_cluster, breach_aws, kube_server):
    from fixtures_security import breach_window, kube_target, plant_breach
    from test_security_breach import assert_untouched

    from flows.security_breach import security_breach

    planted = plant_breach(breach_cluster, breach_aws, kube_target(kube_server))
    block, layout = planted.cluster, planted.layout
    breach, detected = breach_window(layout)
    incident = f"inc-breach-{planted.uid}"
    # A response to this incident restored the known-good backup, journalled its promotion and lost its worker.
    block.archive_wal()
    candidate = block.restore_beside(incident, breach)
    marker = block.read_marker(candidate.data_directory)
    block._write_marker(candidate.data_directory, {**marker, "state": "promoting",
                                                   "old_primary_aside": f"{layout.primary_dir}.replaced-{incident}"})
    before = database_state(block, layout, incident)

    state = security_breach(**planted.params(breach_started_at=breach, incident_detected_at=detected,
                                             incident_id=incident, dry_run=True), return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun", report.summary
    assert f"the promotion of incident {incident} was journalled (interrupted): finish it" in "\n".join(report.plan)
    assert not any(line.startswith(("fence writes", "restore ", "promote:")) for line in report.plan)
    assert database_state(block, layout, incident) == before
    assert_untouched(planted)
