"""The sandbox's other systems on loopback: AWS APIs (moto server), Redis, a Kubernetes API (the
kmock emulator with its controller loop) and controllable health endpoints; embedded Qdrant
lives in a directory.

Each runs as its own process, started by ``dr up`` and stopped by ``dr down``. Their ports are
chosen once and kept in ``sandbox.json``. Nothing here imports Prefect except
:meth:`Endpoints.aws_credentials`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.paths import REPO_ROOT, free_port, load_state, port_is_free, save_state, state_dir

# name -> state key of its port
SERVICES = {"aws": "aws_port", "redis": "redis_port", "kube": "kube_port", "health": "health_port"}
START_TIMEOUT_SECONDS = 30


class ServiceError(RuntimeError):
    """A sandbox service could not be started."""


@dataclass(frozen=True)
class Endpoints:
    """Where the sandbox's services listen."""

    root: Path
    aws_endpoint: str
    redis_url: str
    kube_url: str
    health_url: str
    qdrant_path: str

    def aws_credentials(self):
        """prefect-aws ``AwsCredentials`` for the sandbox's moto server (its fixed test keys, not secrets)."""
        from prefect_aws import AwsCredentials
        from prefect_aws.client_parameters import AwsClientParameters

        return AwsCredentials(
            aws_access_key_id="sandbox",
            aws_secret_access_key="sandbox",
            region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(endpoint_url=self.aws_endpoint),
        )


def _ports(root: Path) -> dict:
    state = load_state(root)
    changed = False
    for key in SERVICES.values():
        if key not in state:
            state[key] = free_port()
            changed = True
    if changed:
        save_state(root, state)
    return state


def endpoints(root: Path | None = None) -> Endpoints:
    root = root or state_dir()
    state = _ports(root)
    return Endpoints(
        root=root,
        aws_endpoint=f"http://127.0.0.1:{state['aws_port']}",
        redis_url=f"redis://127.0.0.1:{state['redis_port']}/0",
        kube_url=f"http://127.0.0.1:{state['kube_port']}",
        health_url=f"http://127.0.0.1:{state['health_port']}",
        qdrant_path=str(root / "qdrant"),
    )


def _command(name: str, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if name == "aws":
        return [str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    if name == "redis":
        return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no"]
    if name == "kube":
        return [sys.executable, "-m", "sandbox.kube", "--port", str(port)]
    if name == "health":
        return [sys.executable, "-m", "sandbox.health", "--port", str(port)]
    raise ServiceError(f"unknown sandbox service {name!r}; known: {', '.join(SERVICES)}")


def _pid_file(root: Path, name: str) -> Path:
    return root / "run" / f"{name}.pid"


def running_pid(root: Path, name: str) -> int | None:
    try:
        pid = int(_pid_file(root, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, exited: reaped now
            return None
    except ChildProcessError:  # not our child: started by an earlier `dr up`
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start(root: Path | None = None) -> Endpoints:
    """Start every service that is not running; safe to call again."""
    root = root or state_dir()
    state = _ports(root)
    (root / "run").mkdir(parents=True, exist_ok=True)
    (root / "qdrant").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for name, key in SERVICES.items():
        if running_pid(root, name) is not None:
            continue
        if not port_is_free(state[key]):
            state[key] = free_port()  # taken by something else since the last run
            save_state(root, state)
        log = open(root / "run" / f"{name}.log", "ab")
        proc = subprocess.Popen(_command(name, state[key]), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=str(REPO_ROOT), start_new_session=True)
        _pid_file(root, name).write_text(str(proc.pid))
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _listening(state[key]):
            if proc.poll() is not None:
                raise ServiceError(f"sandbox service {name} exited {proc.returncode}; see {root / 'run' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise ServiceError(f"sandbox service {name} not listening on port {state[key]} "
                                   f"after {START_TIMEOUT_SECONDS} s; see {root / 'run' / (name + '.log')}")
            time.sleep(0.1)
    return endpoints(root)


def stop(root: Path | None = None, timeout: float = 10) -> list[str]:
    """Stop every running service; returns the names stopped."""
    root = root or state_dir()
    stopped = []
    for name in SERVICES:
        pid = running_pid(root, name)
        if pid is None:
            _pid_file(root, name).unlink(missing_ok=True)
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and running_pid(root, name) == pid:
                time.sleep(0.1)
            if running_pid(root, name) != pid:
                break
        _pid_file(root, name).unlink(missing_ok=True)
        stopped.append(name)
    return stopped
