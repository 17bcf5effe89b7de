"""`dr up` twice is harmless and `dr down` leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DR = str(Path(sys.executable).parent / "dr")


def processes_under(root: Path) -> list[str]:
    """Command lines of running processes that mention ``root``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "pytest" in cmdline or proc.name == str(os.getpid()):
            continue
        # PostgreSQL names its data directory on the command line; the Prefect server and
        # worker carry the state directory in their environment.
        if str(root) in cmdline or f"DR_STATE_DIR={root}" in environ:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def scheduled_runs(api: str, deployment: str, timeout: float = 90) -> list[dict]:
    """Scheduled runs the server's scheduler created for ``deployment`` (polled up to ``timeout``)."""
    import time

    import httpx

    body = {"deployments": {"name": {"any_": [deployment]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}, "limit": 5}
    deadline = time.monotonic() + timeout
    while True:
        runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(2)


@pytest.fixture
def state_dir():
    root = Path(tempfile.mkdtemp(prefix="dr-sandbox-", dir="/tmp"))
    os.chmod(root, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["DR_STATE_DIR"] = str(root)
    yield root, env
    subprocess.run([DR, "down"], env=env, capture_output=True, timeout=180)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(1500)  # builds the whole sandbox and runs every drill
def test_up_twice_is_harmless_and_down_leaves_no_process(state_dir):
    root, env = state_dir
    first = subprocess.run([DR, "up"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Prefect UI      : http://127.0.0.1:" in first.stdout
    assert "primary DSN     : postgresql://postgres@127.0.0.1:" in first.stdout
    saved = json.loads((root / "sandbox.json").read_text())
    for password in (saved["password"], saved["prefect_db_password"]):
        assert password not in first.stdout + first.stderr
    server_pid = (root / "run" / "server.pid").read_text()
    worker_pid = (root / "run" / "worker.pid").read_text()
    primary_pid = (root / "pg" / "primary" / "postmaster.pid").read_text().splitlines()[0]

    second = subprocess.run([DR, "up"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout == first.stdout  # same ports, same estate
    assert (root / "run" / "server.pid").read_text() == server_pid
    assert (root / "run" / "worker.pid").read_text() == worker_pid
    assert (root / "pg" / "primary" / "postmaster.pid").read_text().splitlines()[0] == primary_pid
    running = processes_under(root)
    assert any(server_pid in line for line in running) and any(worker_pid in line for line in running), running

    status = subprocess.run([DR, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "Prefect UI" in status.stdout

    api = f"http://127.0.0.1:{json.loads((root / 'sandbox.json').read_text())['prefect_port']}/api"
    assert scheduled_runs(api, "backup-validation"), "the scheduler created no run of the weekly backup validation"

    # The main job: every drill, then one again on the estate the others left behind.
    drill = subprocess.run([DR, "drill", "all", "--json", "--rows", "3000"], env=env,
                           capture_output=True, text=True, timeout=1200)
    if drill.returncode != 0:
        try:
            failed = {r["scenario"]: [c for c in r["checks"] if not c["passed"]] or r["outcome"]
                      for r in json.loads(drill.stdout) if not r["passed"]}
        except ValueError:
            failed = drill.stdout[-3000:]
        pytest.fail(f"dr drill all failed: {failed}\n{drill.stderr[-3000:]}")
    results = json.loads(drill.stdout)
    from sandbox.drills import DRILLS

    assert [r["scenario"] for r in results] == list(DRILLS)
    for result in results:
        assert result["passed"], result
        for key in ("rto_objective_seconds", "rpo_objective_seconds", "flow_run_id", "outcome", "checks"):
            assert result[key] is not None, (result["scenario"], key)
        assert Path(result["report"]).read_text().startswith("# Incident Report: "), result
    # The run history, the audit trail, lies in the Prefect server's own PostgreSQL, apart from the drilled clusters.
    import psycopg

    state = json.loads((root / "sandbox.json").read_text())
    assert state["prefect_database"] == "postgresql" and state["prefect_db_password"] != state["password"]
    with psycopg.connect(host="127.0.0.1", port=state["prefect_db_port"], user="postgres",
                         password=state["prefect_db_password"], dbname="postgres", connect_timeout=10) as conn:
        flows = {row[0] for row in conn.execute("SELECT f.name FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                                                "WHERE r.state_type = 'COMPLETED'")}
    assert {"dr-drill", "database-corruption-recovery", "regional-failover", "database-server-failover"} <= flows, flows
    again = subprocess.run([DR, "drill", "db-corruption", "--json", "--rows", "3000"], env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (result,) = json.loads(again.stdout)
    assert result["passed"] and result["scenario"] == "db-corruption"
    assert {c["name"]: c["passed"] for c in result["checks"]}["rows committed after the target are absent"]
    assert result["rto_seconds"] is not None and result["rpo_seconds"] is not None

    down = subprocess.run([DR, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert processes_under(root) == []
    assert (root / "pg" / "primary" / "PG_VERSION").exists()  # data stays

    stopped = subprocess.run([DR, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 1 and "not running" in stopped.stdout
