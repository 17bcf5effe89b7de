"""The UI path: an on-call engineer triggers the database-corruption recovery from the Prefect UI,
sees it paused for approval, fills in the approval form, resumes it and sees it complete.

Drives Debian's headless Chromium through Playwright against a Prefect server with its UI (the test
harness serves no UI), a process work pool, the db-corruption deployment from prefect.yaml and a worker.
Screenshots of every stage are saved and their paths printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from conftest import seed_before_after, sql
from sandbox import pgcluster
from sandbox.paths import free_port

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
BIN = Path(sys.executable).parent


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def ui_server(work_root):
    """A Prefect server with its UI on a free port, its own PREFECT_HOME and its own PostgreSQL database;
    yields (ui_url, env, processes, home)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    home = Path(tempfile.mkdtemp(prefix="dr-ui-", dir="/tmp"))
    db_root = work_root / f"ui-{home.name}"
    password, db_port = uuid.uuid4().hex, free_port()
    pgcluster.build_single(db_root, db_port, password, durable=False)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_UI_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_PREFETCH_SECONDS="1", PYTHONPATH=str(REPO), PREFECT_LOGGING_LEVEL="WARNING")
    log = open(home / "server.log", "wb")
    database = pgcluster.sqlalchemy_url(db_port, password)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=dict(env, PREFECT_SERVER_DATABASE_CONNECTION_URL=database), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    procs = [server]
    try:
        yield f"http://127.0.0.1:{port}", env, procs, home
    finally:
        for proc in reversed(procs):  # the worker first: without its server it lingers
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        pgcluster.stop_all(db_root)
        shutil.rmtree(home, ignore_errors=True)


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_trigger_pause_approve_and_complete_from_the_ui(ui_server, pg, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ui, env, procs, home = ui_server
    api = env["PREFECT_API_URL"]
    started = time.monotonic()

    def phase(name: str) -> None:
        print(f"{time.monotonic() - started:6.1f} s  {name}")

    target = seed_before_after(pg)  # 300 rows before the target, 50 after
    _wait(lambda: _healthy(api), 90, "the Prefect server")
    phase("server healthy")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks import PostgresCluster, PostgresInstance

    with temporary_settings(updates={PREFECT_API_URL: api}):  # the UI server, not the test harness
        PostgresCluster(
            primary=PostgresInstance(port=pg.primary_port, data_directory=str(pg.primary_dir)), password=pg.password,
            socket_directory=str(pg.socket_dir), pgbackrest_config=str(pg.pgbackrest_conf),
            recovery_directory=str(pg.recovery_dir), environment="sandbox",
        ).save("sandbox", overwrite=True)
        with get_client(sync_client=True) as client:
            try:
                client.create_work_pool(WorkPoolCreate(name="dr-process", type="process"))
            except ObjectAlreadyExists:
                pass
    phase("block and work pool")
    worker_log = open(home / "worker.log", "wb")
    procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "dr-process", "--limit", "2"],
                                  env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True))
    params = {"recovery_target": target.isoformat(), "incident_detected_at": datetime.now(timezone.utc).isoformat(),
              "approval_timeout_seconds": 300, "approval_poll_seconds": 1, "take_backup_after": False,
              "allowed_approvers": ["oncall-dba"]}
    deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "db-corruption",
                             "--params", json.dumps(params)], env=env, timeout=120, cwd=REPO, capture_output=True, text=True)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    phase("deployed")
    deployment = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["db-corruption"]}}},
                            timeout=10).json()[0]

    shots = tmp_path / "screenshots"
    shots.mkdir()
    saved: list[str] = []

    def shot(page, name: str) -> None:
        path = shots / f"{len(saved) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        saved.append(str(path))
        print(f"screenshot: {path}")

    def run_state() -> dict | None:
        runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}},
                          timeout=10).json()
        return runs[0] if runs else None

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        refused: list[str] = []  # API calls of the UI that failed, for the failure message
        page.on("response", lambda r: r.status >= 400 and "/api/" in r.url
                and refused.append(f"{r.status} {r.request.method} {r.url}"))
        try:
            page.goto(f"{ui}/deployments/deployment/{deployment['id']}")
            run_button = page.locator("button").filter(has_text=re.compile(r"^\s*Run\s*$"))
            expect(run_button).to_be_visible()
            expect(page.get_by_text("database-corruption-recovery").first).to_be_visible()
            shot(page, "deployment")
            run_button.click()
            page.get_by_text("Quick run", exact=True).click()
            dialog = page.get_by_role("dialog")
            if dialog.count():  # the run form, filled in with the deployment's parameters
                expect(dialog.get_by_text("recovery_target").first).to_be_visible()
                shot(page, "run-form")
                dialog.get_by_role("button", name="Run", exact=True).click()
            run = _wait(run_state, 30, "the flow run triggered from the UI")
            shot(page, "triggered")
            phase("triggered from the UI")

            _wait(lambda: (run_state() or {}).get("state_type") == "PAUSED", 90, "the run to pause for approval")
            page.goto(f"{ui}/runs/flow-run/{run['id']}")
            expect(page.get_by_role("button", name="Resume")).to_be_visible()
            shot(page, "paused")
            phase("paused")
            page.get_by_role("button", name="Resume").click()
            page.get_by_role("switch").first.click()
            boxes = page.locator("textarea")
            boxes.nth(0).fill("oncall-dba")
            boxes.nth(1).fill("row counts match the ledger before the target")
            shot(page, "approval-form")
            page.get_by_role("button", name="Submit").click()

            final = _wait(lambda: (lambda r: r if r and r.get("state_type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                                   else None)(run_state()), 240, "the run to finish")
            page.reload()
            expect(page.get_by_text("Recovered").first).to_be_visible()
            shot(page, "completed")
            phase("completed")
        except Exception as exc:
            shot(page, "failure")
            raise AssertionError(f"{exc}\nAPI calls of the UI that failed: {refused or 'none'}\n"
                                 f"server log:\n{_log_tail(home / 'server.log')}\n"
                                 f"worker log:\n{_log_tail(home / 'worker.log')}") from exc
        finally:
            browser.close()
    print("screenshots:\n" + "\n".join(saved))
    assert final["state_name"] == "Recovered", (final["state_name"], final["state"].get("message"))
    assert sql(pg, "SELECT count(*) FROM ledger WHERE note = 'after'") == "0"
    assert sql(pg, "SELECT count(*) FROM ledger WHERE note = 'before'") == "300"
    assert all(Path(s).stat().st_size > 0 for s in saved)


def test_a_failover_is_approved_through_the_ui_form_with_its_data_loss_answer(ui_server, work_root, tmp_path):
    """The failover form has one more required field than the others (accept_data_loss): the UI renders
    it from the paused run's schema, and the answer given there reaches the flow."""
    from playwright.sync_api import expect, sync_playwright

    ui, env, procs, home = ui_server
    api = env["PREFECT_API_URL"]
    layout = pgcluster.ClusterLayout(work_root / f"ui-fo-{uuid.uuid4().hex[:6]}", free_port(), free_port(), "ui:f41l")
    pgcluster.build(layout, with_replica=True)
    P, R = layout.primary_port, layout.replica_port
    _wait(lambda: _healthy(api), 90, "the Prefect server")

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks import Objective, PostgresCluster, PostgresInstance, RecoveryObjectives

    cluster = PostgresCluster(
        primary=PostgresInstance(port=P, data_directory=str(layout.primary_dir)),
        replicas=[PostgresInstance(port=R, data_directory=str(layout.replica_dir))],
        password=layout.password, socket_directory=str(layout.socket_dir),
        pgbackrest_config=str(layout.pgbackrest_conf), recovery_directory=str(layout.recovery_dir), environment="sandbox")
    with temporary_settings(updates={PREFECT_API_URL: api}):  # the UI server, not the test harness
        cluster.save("ui-failover", overwrite=True)
        RecoveryObjectives(functions={"database": Objective(rto_seconds=900, rpo_seconds=1)}).save("tight", overwrite=True)
    # The replica lags beyond the 1 s RPO: only an approval that accepts the data loss promotes it.
    pgcluster.psql(layout, P, "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)")
    cluster.query_one("SELECT pg_wal_replay_pause()", port=R)
    pgcluster.psql(layout, P, "INSERT INTO ledger (note) VALUES ('lagging')")
    time.sleep(1.5)
    run_name = f"ui-failover-{uuid.uuid4().hex[:6]}"
    params = {"cluster_block": "ui-failover", "objectives_block": "tight", "allowed_approvers": ["oncall-dba"],
              "approval_timeout_seconds": 300, "approval_poll_seconds": 1, "lock_wait_seconds": 5}
    flow_log = open(home / "flow.log", "wb")
    procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "flow_runner.py"), run_name, json.dumps(params),
                                   "flows.db_failover:db_failover"], env=env, cwd=REPO, stdout=flow_log,
                                  stderr=subprocess.STDOUT))

    def run_state() -> dict | None:
        runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [run_name]}}}, timeout=10).json()
        return runs[0] if runs else None

    try:
        run = _wait(lambda: (lambda r: r if r and r.get("state_type") == "PAUSED" else None)(run_state()), 180,
                    "the failover to pause for approval")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nflow log:\n{_log_tail(home / 'flow.log')}") from exc
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            page.goto(f"{ui}/runs/flow-run/{run['id']}")
            page.get_by_role("button", name="Resume").click()
            expect(page.get_by_text("accept_data_loss").first).to_be_visible()
            switches = page.get_by_role("switch")
            expect(switches).to_have_count(2)  # approve and accept_data_loss
            switches.nth(0).click()
            switches.nth(1).click()
            boxes = page.locator("textarea")
            boxes.nth(0).fill("oncall-dba")
            boxes.nth(1).fill("replica 2 s behind; accepting the stated loss")
            page.screenshot(path=str(shots / "failover-form.png"), full_page=True)
            page.get_by_role("button", name="Submit").click()
            final = _wait(lambda: (lambda r: r if r and r.get("state_type") in ("COMPLETED", "FAILED", "CRASHED",
                                                                                 "CANCELLED") else None)(run_state()),
                          180, "the failover to finish")
        except Exception as exc:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise AssertionError(f"{exc}\nserver log:\n{_log_tail(home / 'server.log')}\n"
                                 f"flow log:\n{_log_tail(home / 'flow.log')}") from exc
        finally:
            browser.close()
    try:
        assert final["state_name"] == "FailedOver", (final["state_name"], final["state"].get("message"))
        answer = httpx.get(f"{api}/flow_runs/{run['id']}/input/paused-approval-1-response", timeout=10).json()
        assert answer == {"approve": True, "approver": "oncall-dba", "accept_data_loss": True,
                                               "comment": "replica 2 s behind; accepting the stated loss"}
        assert cluster.writers() == [R]
    finally:
        pgcluster.stop_all(layout.root)
