"""The embedded sandbox estate: PostgreSQL primary + replica with pgBackRest, the other systems of
:mod:`sandbox.services` (AWS APIs, Redis, Kubernetes API, health endpoints, embedded Qdrant), a
Prefect server with UI, the project's blocks registered and saved, deployments and a process worker.

Point the process at the sandbox's server (:func:`sandbox.paths.reserve_sandbox_api`) before importing
this module: Prefect reads its settings once, at import.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from sandbox import pgcluster, services
from sandbox.addresses import CLUSTER_BLOCK, OBJECTIVES_BLOCK, SandboxInfo, info, layout
from sandbox.paths import (
    REPO_ROOT,
    ensure_state,
    free_port,
    load_state,
    port_is_free,
    prefect_api_url,
    save_state,
    state_dir,
)

WORK_POOL = "dr-process"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prefect_db_root(root: Path) -> Path:
    """Where the PostgreSQL server that holds the Prefect run history keeps its data."""
    return root / "prefect-db"


def _server_env(state: dict) -> dict:
    """The Prefect server's database: its own PostgreSQL, apart from the clusters the drills break."""
    if state.get("prefect_database") != "postgresql":
        return {}
    url = pgcluster.sqlalchemy_url(state["prefect_db_port"], state["prefect_db_password"])
    return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": url}


def _env(root: Path, state: dict) -> dict:
    return dict(
        os.environ,
        PREFECT_API_URL=prefect_api_url(state),
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=prefect_api_url(state),
        DR_STATE_DIR=str(root),
        DR_REPO=str(REPO_ROOT),
    )


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def _spawn(root: Path, state: dict, name: str, cmd: list[str], extra_env: dict | None = None) -> None:
    pid_file = root / "run" / f"{name}.pid"
    if _alive(pid_file):
        return
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(root / "run" / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(_env(root, state), **(extra_env or {})), cwd=str(REPO_ROOT),
                            start_new_session=True)
    pid_file.write_text(str(proc.pid))


def _stop(root: Path, name: str, timeout: float = 20) -> bool:
    pid_file = root / "run" / f"{name}.pid"
    pid = _alive(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    pid_file.unlink(missing_ok=True)
    return True


def _wait_healthy(api_url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise pgcluster.SandboxError(f"Prefect server at {api_url} not healthy after {timeout:.0f}s")


def _prefect(root: Path, state: dict, *args: str, timeout: float = 300) -> None:
    proc = subprocess.run([_bin("prefect"), *args], env=_env(root, state), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise pgcluster.SandboxError(f"prefect {' '.join(args)} failed: {(proc.stdout + proc.stderr).strip()[-800:]}")


def save_blocks(lay: pgcluster.ClusterLayout) -> None:
    """Save the sandbox's PostgresCluster and RecoveryObjectives blocks (overwriting earlier ones)."""
    from blocks import PostgresCluster, PostgresInstance, RecoveryObjectives

    PostgresCluster(
        primary=PostgresInstance(port=lay.primary_port, data_directory=str(lay.primary_dir)),
        replicas=[PostgresInstance(port=lay.replica_port, data_directory=str(lay.replica_dir))] if lay.replica_port else [],
        password=lay.password,
        socket_directory=str(lay.socket_dir),
        pgbackrest_stanza=pgcluster.STANZA,
        pgbackrest_config=str(lay.pgbackrest_conf),
        recovery_directory=str(lay.recovery_dir),
        environment="sandbox",
    ).save(CLUSTER_BLOCK, overwrite=True)
    RecoveryObjectives().save(OBJECTIVES_BLOCK, overwrite=True)


def up(root: Path | None = None, deploy: bool = True) -> SandboxInfo:
    """Start (or create) everything; running it again only starts what is not running."""
    root = root or state_dir()
    state = ensure_state(root)
    if _alive(root / "run" / "server.pid") is None and not port_is_free(state["prefect_port"]):
        state["prefect_port"] = free_port()  # taken by something else since the last run
        save_state(root, state)
    prefect_db = prefect_db_root(root)
    if (state["prefect_database"] == "postgresql" and not pgcluster.is_running(prefect_db / "pg" / "data")
            and not port_is_free(state["prefect_db_port"])):
        state["prefect_db_port"] = free_port()
        save_state(root, state)
    lay = layout(root)
    pgcluster.build(lay, with_replica=False)
    warnings = []
    try:
        pgcluster.ensure_replica(lay)
    except pgcluster.SandboxError as exc:  # e.g. a page damaged by a drill: the next drill replaces it
        warnings.append(f"replica not running: {exc}")
    api = prefect_api_url(state)
    if state["prefect_database"] == "postgresql":
        if not pgcluster.is_running(prefect_db / "pg" / "data"):
            _stop(root, "server")  # a server left running without its database reconnects to nothing
        pgcluster.build_single(prefect_db, state["prefect_db_port"], state["prefect_db_password"])
    _spawn(root, state, "server", [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(state["prefect_port"])], _server_env(state))
    ep = services.start(root)
    _wait_healthy(api)
    _prefect(root, state, "block", "register", "-m", "blocks")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sandbox.drills import BLOCK_SAVERS

    with temporary_settings(updates={PREFECT_API_URL: api}):
        save_blocks(lay)
        for save_scenario_blocks in BLOCK_SAVERS:
            save_scenario_blocks(ep)
    if deploy:
        _prefect(root, state, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
        _prefect(root, state, "--no-prompt", "deploy", "--all")
        _spawn(root, state, "worker", [_bin("prefect"), "worker", "start", "--pool", WORK_POOL])
    return replace(info(root), warnings=tuple(warnings))


def is_up(root: Path | None = None) -> bool:
    root = root or state_dir()
    state = load_state(root)
    if not state:
        return False
    if state.get("prefect_database") == "postgresql" and not pgcluster.is_running(prefect_db_root(root) / "pg" / "data"):
        return False
    return (pgcluster.is_running(root / "pg" / "primary") and _alive(root / "run" / "server.pid") is not None
            and all(services.running_pid(root, name) is not None for name in services.SERVICES))


def down(root: Path | None = None) -> list[str]:
    """Stop the worker, the Prefect server, the other services and every PostgreSQL instance. Data stays."""
    root = root or state_dir()
    stopped = []
    for name in ("worker", "server"):  # the worker first: without its server it lingers
        if _stop(root, name):
            stopped.append(name)
    stopped += services.stop(root)
    stopped += pgcluster.stop_all(root)
    stopped += pgcluster.stop_all(prefect_db_root(root))
    return stopped
