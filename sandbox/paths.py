"""Where the sandbox lives and which loopback ports it uses. Imports nothing from Prefect."""

from __future__ import annotations

import json
import os
import secrets
import socket
import tomllib
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    """The sandbox's one state directory (``DR_STATE_DIR``, default ``.sandbox`` in the checkout)."""
    return Path(os.environ.get("DR_STATE_DIR", REPO_ROOT / ".sandbox")).resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def load_state(root: Path) -> dict:
    try:
        return json.loads((root / "sandbox.json").read_text())
    except FileNotFoundError:
        return {}


def save_state(root: Path, state: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "sandbox.json"
    tmp = root / "sandbox.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, path)


def ensure_state(root: Path) -> dict:
    """Ports and the superuser password of the sandbox, chosen once and kept."""
    state = load_state(root)
    changed = False
    if "prefect_database" not in state:
        # Prefect's run history lives in PostgreSQL; a sandbox created with SQLite keeps its history there.
        state["prefect_database"] = "sqlite" if (root / "prefect" / "prefect.db").exists() else "postgresql"
        changed = True
    for key in ("primary_port", "replica_port", "prefect_port", "prefect_db_port"):
        if key not in state:
            state[key] = free_port()
            changed = True
    for key in ("password", "prefect_db_password"):
        if key not in state:
            state[key] = secrets.token_urlsafe(18)
            changed = True
    if changed:
        save_state(root, state)
    return state


def prefect_api_url(state: dict) -> str:
    return f"http://127.0.0.1:{state['prefect_port']}/api"


def pid_alive(pid_file: Path) -> bool:
    """Whether the process whose id ``pid_file`` holds is running."""
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True


def point_at_sandbox(root: Path, state: dict) -> str:
    """Point this process, and every process it starts, at the sandbox's Prefect server; return its API URL.

    Must run before Prefect is imported: Prefect reads its settings once, at import, and a process
    without an API URL silently starts a temporary server of its own.
    """
    api = prefect_api_url(state)
    os.environ["PREFECT_API_URL"] = api
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    for name in ("PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "PREFECT_API_KEY"):  # the user's, not the sandbox's
        os.environ.pop(name, None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return api


def reserve_sandbox_api(root: Path) -> str:
    """Choose the sandbox's ports (once, kept in the state file) and point this process at its Prefect server.

    For the commands that start the sandbox (``dr up``, ``dr drill``): on a fresh state directory
    the server does not exist yet, but its address is fixed here, before anything imports Prefect.
    A port taken by another program since the last run is replaced now, as ``estate.up`` would.
    """
    state = ensure_state(root)
    if not pid_alive(root / "run" / "server.pid") and not port_is_free(state["prefect_port"]):
        state["prefect_port"] = free_port()
        save_state(root, state)
    return point_at_sandbox(root, state)


def _profiles_path() -> Path:
    if os.environ.get("PREFECT_PROFILES_PATH"):
        return Path(os.environ["PREFECT_PROFILES_PATH"])
    home = os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")
    return Path(home) / "profiles.toml"


def configured_prefect_api() -> tuple[str, str] | None:
    """The Prefect API the user configured, and where it was found; None when nothing is configured.

    ``PREFECT_API_URL`` in the environment first, then ``PREFECT_API_URL`` of the active profile
    (``PREFECT_PROFILE``, else the ``active`` profile of ``$PREFECT_HOME/profiles.toml``), as Prefect
    itself resolves them; a Prefect Cloud login is such a profile. Reads files only: Prefect is not imported.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "PREFECT_API_URL"
    path = _profiles_path()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    profile = profiles.get("profiles", {}).get(name) if isinstance(name, str) else None
    url = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return (url, f"profile {name!r} of {path}") if isinstance(url, str) and url else None


def sandbox_server_answers(state: dict, timeout: float = 3) -> bool:
    """Whether the sandbox's Prefect server answers its health check."""
    if "prefect_port" not in state:
        return False
    try:
        return httpx.get(f"{prefect_api_url(state)}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def use_operator_api(root: Path) -> tuple[str, str] | None:
    """Choose the Prefect server of an operator command (report, approve, kpis, unlock, unfence).

    The user's configured Prefect (:func:`configured_prefect_api`) when there is one, untouched;
    else the sandbox's server when it answers; else None (the caller refuses: never a temporary server).
    Must run before Prefect is imported.
    """
    configured = configured_prefect_api()
    if configured:
        return configured
    state = load_state(root)
    if sandbox_server_answers(state):
        return point_at_sandbox(root, state), f"the sandbox in {root}"
    return None
