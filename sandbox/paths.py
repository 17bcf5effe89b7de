"""Where the sandbox lives and which loopback ports it uses. Imports nothing from Prefect."""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path

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


def use_sandbox_api() -> None:
    """Point this process at the sandbox's Prefect server unless PREFECT_API_URL is already set.

    Must run before Prefect is imported: Prefect reads its settings once, at import.
    """
    root = state_dir()
    state = load_state(root)
    if "prefect_port" in state and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_API_URL"] = prefect_api_url(state)
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
