"""The `dr` command as a user runs it: which Prefect server it talks to, `dr approve` answering every
approval form a flow pauses with, and `dr unfence` respecting the recovery lock.

Every `dr` here runs in a process of its own, as an operator's terminal would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import test_app_rollback
import test_db_failover
import test_model_corruption
import test_regional
import test_vector_db
from prefect.flow_runs import resume_flow_run

from conftest import TESTS, dr, seed_before_after, start_flow, wait_for_run
from fixtures_security import breach_window, kube_target, plant_breach
from sandbox import pgcluster
from runbook.evidence import load_report
from test_object_storage import PREFIX, _store

DR = str(Path(sys.executable).parent / "dr")
APPROVER, COMMENT = "alice", "checked from a terminal"
TIERS = test_regional.TIERS

# The estates of the flows' own tests, shared here (pytest finds fixtures by their module attribute).
broken_app = test_app_rollback.broken_app
db = test_db_failover.db
registry, registry_session = test_model_corruption.registry, test_model_corruption.registry_session
pair, regions = test_regional.pair, test_regional.regions
estate = test_vector_db.estate


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """A user's environment without any Prefect setting: a fresh home and a fresh sandbox state directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    return dict(env, HOME=str(home), DR_STATE_DIR=str(state), PYTHONPATH=str(TESTS.parent), **extra)


def paused(run) -> bool:
    return run.state is not None and run.state.is_paused()


def finished(run) -> bool:
    return run.state is not None and run.state.is_final()


# --- which Prefect server `dr` talks to -----------------------------------------------------------

def test_a_fresh_state_directory_gets_the_sandbox_api_before_prefect_is_imported(tmp_path):
    """`dr drill` on a fresh clone: the sandbox does not exist yet, but Prefect must not start a temporary server."""
    probe = (
        "import sys, deployments.cli as cli\n"
        "assert 'prefect' not in sys.modules, 'importing the CLI imported prefect'\n"
        "api = cli._use_sandbox(start=True)\n"
        "from prefect.settings import get_current_settings\n"
        "print(api, get_current_settings().api.url, get_current_settings().home)\n"
    )
    env = clean_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    state = json.loads((tmp_path / "state" / "sandbox.json").read_text())
    expected = f"http://127.0.0.1:{state['prefect_port']}/api"
    assert out.stdout.split() == [expected, expected, str(tmp_path / "state" / "prefect")]


def test_a_port_taken_since_the_last_run_is_replaced_before_prefect_is_imported(tmp_path):
    import socket

    env = clean_env(tmp_path)
    state_file = tmp_path / "state" / "sandbox.json"
    subprocess.run([sys.executable, "-c", "import deployments.cli as c; c._use_sandbox(start=True)"],
                   env=env, check=True, timeout=60)
    taken = json.loads(state_file.read_text())["prefect_port"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", taken))
        sock.listen()
        out = subprocess.run([sys.executable, "-c", "import deployments.cli as c; print(c._use_sandbox(start=True))"],
                             env=env, capture_output=True, text=True, timeout=60)
    port = json.loads(state_file.read_text())["prefect_port"]
    assert out.returncode == 0, out.stderr
    assert port != taken and out.stdout.strip() == f"http://127.0.0.1:{port}/api"


def test_a_command_whose_server_moved_runs_again_once_in_a_fresh_process(tmp_path):
    """The fallback when the sandbox's server ends up elsewhere than this process's Prefect was set up for."""
    script = tmp_path / "moved.py"
    script.write_text(
        "import os, sys\n"
        "import deployments.cli as cli\n"
        "print('run', os.getpid(), sys.argv[1:], os.environ.get(cli.REEXEC_MARK), flush=True)\n"
        "try:\n"
        "    cli._reexec_for('http://127.0.0.1:9/api')\n"
        "except cli.typer.Exit as exc:\n"
        "    sys.exit(exc.exit_code)\n")
    out = subprocess.run([sys.executable, str(script), "drill", "cache"], env=clean_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    runs = [line.split() for line in out.stdout.splitlines() if line.startswith("run ")]
    assert out.returncode == 2, out.stdout + out.stderr
    assert [(r[2:4], r[4:]) for r in runs] == [(["['drill',", "'cache']"], ["None"]), (["['drill',", "'cache']"], ["1"])]
    assert runs[0][1] == runs[1][1]  # exec: the same process id, a fresh interpreter
    assert "starting again" in out.stderr and "moved to http://127.0.0.1:9/api twice" in out.stderr


def _scheduled_run(api: str) -> str:
    """A flow run that exists only on the server at ``api`` (never executed): its id."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="dr-cli-probe")
    def probe() -> None:
        return None

    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == api.rstrip("/")
        return str(client.create_flow_run(probe, name=f"probe-{uuid.uuid4().hex[:6]}").id)


def _found_on_that_server(out: subprocess.CompletedProcess, run_id: str) -> None:
    """`dr approve` of a run never started: refused because it is not paused, which proves it found the run."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"flow run {run_id} is not paused (state: Pending)" in out.stderr, out.stderr
    assert "temporary server" not in out.stdout + out.stderr


def test_operator_commands_use_the_users_active_profile(prefect_api, tmp_path):
    run_id = _scheduled_run(prefect_api)
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "mine"\n\n[profiles.mine]\n'
        f'PREFECT_API_URL = "{prefect_api}"\n\n[profiles.other]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    env = clean_env(tmp_path, PREFECT_HOME=str(home))
    out = subprocess.run([DR, "approve", run_id, "--approver", "a", "--comment", "c"], env=env,
                         capture_output=True, text=True, timeout=120)
    _found_on_that_server(out, run_id)
    # PREFECT_PROFILE picks another profile, as it does for Prefect itself.
    out = subprocess.run([DR, "approve", run_id, "--approver", "a", "--comment", "c"],
                         env=dict(env, PREFECT_PROFILE="other"), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not paused" not in out.stderr


def test_operator_commands_use_prefect_api_url_before_a_running_sandbox(prefect_api, tmp_path):
    run_id = _scheduled_run(prefect_api)
    port = int(prefect_api.split(":")[-1].split("/")[0])
    env = clean_env(tmp_path)
    # A sandbox state directory whose server is not running, and PREFECT_API_URL: the user's server is used.
    (tmp_path / "state" / "sandbox.json").write_text(json.dumps({"prefect_port": 9}))
    out = subprocess.run([DR, "approve", run_id, "--approver", "a", "--comment", "c"],
                         env=dict(env, PREFECT_API_URL=prefect_api), capture_output=True, text=True, timeout=120)
    _found_on_that_server(out, run_id)
    # Nothing configured, and the sandbox's server answers: the sandbox is used.
    (tmp_path / "state" / "sandbox.json").write_text(json.dumps({"prefect_port": port}))
    out = subprocess.run([DR, "approve", run_id, "--approver", "a", "--comment", "c"], env=env,
                         capture_output=True, text=True, timeout=120)
    _found_on_that_server(out, run_id)


def test_operator_commands_without_any_prefect_server_are_refused(tmp_path):
    env = clean_env(tmp_path)
    for args in (["report", str(uuid.uuid4())], ["approve", str(uuid.uuid4()), "--approver", "a", "--comment", "c"],
                 ["kpis"], ["unlock", "sandbox"], ["unfence", "sandbox"]):
        started = time.monotonic()
        out = subprocess.run([DR, *args], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "no Prefect server to talk to" in out.stderr and "PREFECT_API_URL" in out.stderr, out.stderr
        assert "temporary server" not in out.stdout + out.stderr
        assert time.monotonic() - started < 30
    assert not (tmp_path / "home" / ".prefect").exists()


# --- `dr approve` answers every approval form --------------------------------------------------------

def approved_by_dr(prefect_api, flow_fn, params: dict, *answers: tuple[str, ...], approver: str = APPROVER):
    """Run ``flow_fn`` here with approval required; when it pauses, answer it with `dr approve` from another
    process, once per tuple of extra arguments in ``answers``. Returns (state, report, dr outputs)."""
    run_name = f"cli-{uuid.uuid4().hex[:8]}"
    outputs: list[subprocess.CompletedProcess] = []
    failures: list[BaseException] = []

    def answer() -> None:
        try:
            run = wait_for_run(run_name, paused, timeout=240)
            for extra in answers:
                outputs.append(dr(prefect_api, "approve", str(run.id), "--approver", approver, "--comment", COMMENT,
                                  *extra))
            if outputs[-1].returncode != 0:  # the run must not wait for its whole window
                resume_flow_run(run.id, run_input={"approve": False, "approver": approver, "comment": "test failed",
                                                   "accept_data_loss": False})
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    settings = dict(approval_policy="required", drill=False, allowed_approvers=[approver], approval_poll_seconds=0.3,
                    approval_timeout_seconds=240)
    state = flow_fn.with_options(flow_run_name=run_name)(**{**params, **settings}, return_state=True)
    thread.join(timeout=60)
    report = load_report(state.state_details.flow_run_id)
    assert not failures and outputs, (state.name, report.summary, failures)
    return state, report, outputs


def accepted_by_dr(report, details: dict | None = None) -> None:
    """The run's one recorded answer is the terminal's approval."""
    assert [(a.approver, a.approved, a.accepted, a.comment, a.policy) for a in report.approvals] == [
        (APPROVER, True, True, COMMENT, "required")]
    if details is not None:
        assert report.approvals[0].details == details


def test_a_failover_form_needs_its_data_loss_answer_and_gets_it_from_an_option(db, prefect_api):
    from blocks import Objective, RecoveryObjectives
    from flows.db_failover import db_failover

    name, block, layout, kube = db
    P, R = layout.primary_port, layout.replica_port
    tight = f"tight-{uuid.uuid4().hex[:6]}"
    RecoveryObjectives(functions={"database": Objective(rto_seconds=900, rpo_seconds=1)}).save(tight)
    block.query_one("SELECT pg_wal_replay_pause()", port=R)  # the replica lags: the loss must be accepted
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('lagging')")
    time.sleep(1.5)
    params = dict(cluster_block=name, kubernetes_target=kube._block_document_name, database_secret="db",
                  restart_deployments=["core-api"], smoke_queries=["SELECT count(*) FROM ledger"],
                  objectives_block=tight, lock_wait_seconds=5)
    state, report, (missing, wrong_type, unknown, twice, answered) = approved_by_dr(
        prefect_api, db_failover, params, (), ("--field", "accept_data_loss=maybe"), ("--field", "colour=blue"),
        ("--accept-data-loss", "--field", "accept_data_loss=false"), ("--field", "accept_data_loss=yes"))

    assert missing.returncode == 2 and "requires accept_data_loss" in missing.stderr, missing.stderr
    assert "--accept-data-loss" in missing.stderr and "nothing was sent" in missing.stderr
    assert wrong_type.returncode == 2 and "accept_data_loss is a yes/no field" in wrong_type.stderr, wrong_type.stderr
    assert unknown.returncode == 2 and "no field 'colour'" in unknown.stderr and "accept_data_loss" in unknown.stderr
    assert twice.returncode == 2 and "give one" in twice.stderr, twice.stderr
    assert answered.returncode == 0, answered.stderr
    assert "accept_data_loss=True" in answered.stdout
    assert state.name == "FailedOver", report.summary
    accepted_by_dr(report, {"accept_data_loss": True})  # the refused attempts never reached the run
    assert block.writers() == [R]


def test_a_form_without_a_field_refuses_the_option_for_it(cluster, prefect_api):
    name, block, pg = cluster
    target = seed_before_after(pg)
    run_name = f"cli-{uuid.uuid4().hex[:8]}"
    proc = start_flow(prefect_api, run_name, dict(
        cluster_block=name, recovery_target=target.isoformat(), incident_detected_at=datetime.now(timezone.utc).isoformat(),
        approval_policy="required", allowed_approvers=[APPROVER], approval_timeout_seconds=120, approval_poll_seconds=0.5,
        take_backup_after=False))
    try:
        run = wait_for_run(run_name, paused, timeout=240)
        out = dr(prefect_api, "approve", str(run.id), "--approver", APPROVER, "--comment", COMMENT, "--accept-data-loss")
        assert out.returncode == 2 and "has no field 'accept_data_loss'" in out.stderr, out.stderr
        assert "approve, approver, comment" in out.stderr
        out = dr(prefect_api, "approve", str(run.id), "--approver", APPROVER, "--comment", COMMENT, "--reject")
        assert out.returncode == 0, out.stderr
        run = wait_for_run(run_name, finished)
        assert run.state.name == "Rejected"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_regional_failover_and_failback_are_approved_from_a_terminal(regions, prefect_api):
    from flows.regional_failback import regional_failback
    from flows.regional_failover import regional_failover

    r = regions  # a probe window a loaded machine keeps: two failed probes end it early
    r.cluster.stop_at(r.P)  # the primary region is lost
    r.health.set_healthy("primary", False)
    state, report, outputs = approved_by_dr(prefect_api, regional_failover, r.params(health_window_seconds=10),
                                             ("--no-accept-data-loss",))
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert state.name == "FailedOver", report.summary
    accepted_by_dr(report, {"accept_data_loss": False})
    assert r.cluster.role(r.R) == "primary" and r.dns() == {"lb.dr.test"}

    r.health.set_healthy("primary", True)
    state, report, outputs = approved_by_dr(prefect_api, regional_failback, r.params(health_window_seconds=10),
                                             ("--accept-data-loss",))
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert state.name == "FailedBack", report.summary
    accepted_by_dr(report, {"accept_data_loss": True})
    assert r.cluster.writers() == [r.P] and r.dns() == {"lb.primary.test"}
    assert r.replicas(r.primary_kube) == TIERS


def test_model_corruption_is_approved_from_a_terminal(registry, prefect_api):
    from flows.model_corruption import model_corruption

    reg = registry
    params = dict(registry_block=reg["registry"], model=reg["model"], objectives_block=reg["objectives"], version="v1")
    state, report, outputs = approved_by_dr(prefect_api, model_corruption, params, ())
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert state.name == "Recovered", report.summary
    accepted_by_dr(report, {})
    assert reg["block"].production_version(reg["model"])[0] == "v1"


def test_vector_db_recovery_is_approved_from_a_terminal(estate, prefect_api):
    from flows.vector_db_recovery import vector_db_recovery

    params = dict(qdrant_block=estate["qdrant"], alias=estate["alias"], postgres_block=estate["postgres"],
                  source_table=estate["table"], sample_queries=40, strategy="reindex", batch_size=400)
    state, report, outputs = approved_by_dr(prefect_api, vector_db_recovery, params, ())
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert state.name == "Recovered", report.summary
    accepted_by_dr(report, {})
    assert estate["block"].resolve(estate["alias"]) != estate["live"]


def test_object_storage_restore_is_approved_from_a_terminal(moto_endpoint, prefect_api):
    import boto3

    from flows.object_storage_recovery import object_storage_recovery

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    bucket = f"dr-cli-{uuid.uuid4().hex[:6]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}a", Body=b"a as of T")
    time.sleep(1.1)  # S3 records whole seconds: T sits in a second of its own
    as_of = datetime.now(timezone.utc)
    time.sleep(1.1)
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}a", Body=b"a overwritten")
    name = f"store-{uuid.uuid4().hex[:8]}"
    _store(moto_endpoint, bucket).save(name)
    params = dict(store_block=name, mode="restore-prefix", prefix=PREFIX, restore_as_of=as_of,
                  incident_detected_at=datetime.now(timezone.utc))
    state, report, outputs = approved_by_dr(prefect_api, object_storage_recovery, params, ())
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert state.name == "Recovered", report.summary
    accepted_by_dr(report, {})
    assert s3.get_object(Bucket=bucket, Key=f"{PREFIX}a")["Body"].read() == b"a as of T"


def test_cache_flush_is_approved_from_a_terminal(redis_cache, redis_server, prefect_api):
    import redis

    from flows.cache_recovery import cache_recovery

    name, _ = redis_cache
    redis.Redis.from_url(f"{redis_server}/3").mset({f"k{i}": "v" for i in range(50)})
    params = dict(cache_block=name, incident_detected_at=datetime.now(timezone.utc), warmup_window_seconds=1,
                  sample_interval_seconds=0.5, min_keys=0)
    state, report, outputs = approved_by_dr(prefect_api, cache_recovery, params, ())
    assert outputs[0].returncode == 0, outputs[0].stderr
    accepted_by_dr(report, {})
    assert any(s.step == "Flush the affected database" for s in report.steps), report.summary
    assert redis.Redis.from_url(f"{redis_server}/3").get("k1") is None


def test_app_rollback_is_approved_from_a_terminal(broken_app, prefect_api):
    from flows.app_rollback import app_rollback

    block, kube, health = broken_app
    params = dict(kubernetes_block=block, deployment="shop", health_urls=[health.url], health_window_seconds=3,
                  health_interval_seconds=0.1, rollout_timeout_seconds=5)
    state, report, outputs = approved_by_dr(prefect_api, app_rollback, params, ())
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert state.name == "RolledBack", state.message
    accepted_by_dr(report, {})
    assert ":broken" not in kube.rollout_status("shop").images[0]


def test_security_breach_response_is_approved_from_a_terminal(breach_cluster, breach_aws, kube_server, prefect_api):
    from flows.security_breach import security_breach

    breached = plant_breach(breach_cluster, breach_aws, kube_target(kube_server))
    breach, detected = breach_window(breached.layout)
    breached.cluster.backup("full")
    params = breached.params(breach_started_at=breach, incident_detected_at=detected, row_count_tables=["ledger"])
    state, report, outputs = approved_by_dr(prefect_api, security_breach, params, ())
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert state.name == "Recovered", report.summary
    accepted_by_dr(report, {})


# --- `dr unfence` and the recovery lock -------------------------------------------------------------

def unfenced_events(api: str, cluster_block: str, timeout: float = 30) -> list[dict]:
    """The dr.cluster.unfenced events of ``cluster_block`` the server has stored (polled up to ``timeout``)."""
    body = {"filter": {"event": {"name": ["dr.cluster.unfenced"]}, "resource": {"id": [f"dr.cluster.{cluster_block}"]},
                       "occurred": {"since": (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()}},
            "limit": 10}
    deadline = time.monotonic() + timeout
    while True:
        events = httpx.post(f"{api}/events/filter", json=body, timeout=10).json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_unfence_is_refused_while_a_recovery_holds_the_cluster_unless_forced(cluster, prefect_api):
    name, block, pg = cluster
    target = seed_before_after(pg)
    run_name = f"cli-{uuid.uuid4().hex[:8]}"
    proc = start_flow(prefect_api, run_name, dict(
        cluster_block=name, recovery_target=target.isoformat(), incident_detected_at=datetime.now(timezone.utc).isoformat(),
        approval_policy="required", allowed_approvers=[APPROVER], approval_timeout_seconds=120, approval_poll_seconds=0.5,
        take_backup_after=False))
    try:
        run = wait_for_run(run_name, paused, timeout=240)
        assert block.is_fenced()

        refused = dr(prefect_api, "unfence", name)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert str(run.id) in refused.stderr and "PAUSED" in refused.stderr and "--force" in refused.stderr
        assert block.is_fenced()
        assert unfenced_events(prefect_api, name, timeout=2) == []

        forced = dr(prefect_api, "unfence", name, "--force")
        assert forced.returncode == 0, forced.stderr
        assert "warning" in forced.stderr and str(run.id) in forced.stderr
        assert not block.is_fenced()
        (event,) = unfenced_events(prefect_api, name)
        assert event["payload"]["forced"] is True and event["payload"]["cluster"] == name
        assert event["payload"]["holder"]["flow_run_id"] == str(run.id)
        assert event["payload"]["holder"]["state"] == "PAUSED"
        assert event["resource"]["prefect.resource.name"] == name

        resume_flow_run(run.id, run_input={"approve": False, "approver": APPROVER, "comment": "test done"})
        assert wait_for_run(run_name, finished).state.name == "Rejected"
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    # Once the recovery has ended, unfencing needs no --force, and is recorded as not forced.
    after = dr(prefect_api, "unfence", name)
    assert after.returncode == 0, after.stderr
    assert "warning" not in after.stderr and not block.is_fenced()
    events = unfenced_events(prefect_api, name)
    deadline = time.monotonic() + 30
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        events = unfenced_events(prefect_api, name)
    assert sorted(e["payload"]["forced"] for e in events) == [False, True]

