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


@pytest.fixture
def state_dir():
    root = Path(tempfile.mkdtemp(prefix="dr-sandbox-", dir="/tmp"))
    os.chmod(root, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["DR_STATE_DIR"] = str(root)
    yield root, env
    subprocess.run([DR, "down"], env=env, capture_output=True, timeout=180)
    shutil.rmtree(root, ignore_errors=True)


def test_up_twice_is_harmless_and_down_leaves_no_process(state_dir):
    root, env = state_dir
    first = subprocess.run([DR, "up"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Prefect UI      : http://127.0.0.1:" in first.stdout
    assert "primary DSN     : postgresql://postgres@127.0.0.1:" in first.stdout
    password = json.loads((root / "sandbox.json").read_text())["password"]
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

    for _ in range(2):  # the main job, twice in a row
        drill = subprocess.run([DR, "drill", "db-corruption", "--json", "--rows", "3000"], env=env,
                               capture_output=True, text=True, timeout=900)
        assert drill.returncode == 0, drill.stdout[-3000:] + drill.stderr[-3000:]
        (result,) = json.loads(drill.stdout)
        assert result["passed"] and result["scenario"] == "db-corruption"
        assert {c["name"]: c["passed"] for c in result["checks"]}["rows committed after the target are absent"]
        for key in ("rto_seconds", "rto_objective_seconds", "rpo_seconds", "rpo_objective_seconds", "flow_run_id"):
            assert result[key] is not None
        assert Path(result["report"]).read_text().startswith("# Incident Report: db-corruption")

    down = subprocess.run([DR, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert processes_under(root) == []
    assert (root / "pg" / "primary" / "PG_VERSION").exists()  # data stays

    stopped = subprocess.run([DR, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 1 and "not running" in stopped.stdout
