"""The running sandbox's names and addresses: its block names, its cluster layout, its URLs.

What the drills read about the estate that :mod:`sandbox.estate` starts. Imports nothing from Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sandbox import pgcluster
from sandbox.paths import ensure_state, load_state, prefect_api_url, state_dir

CLUSTER_BLOCK = "sandbox"
OBJECTIVES_BLOCK = "default"


@dataclass(frozen=True)
class SandboxInfo:
    root: Path
    ui_url: str
    api_url: str
    primary_dsn: str
    replica_dsn: str
    cluster_block: str
    warnings: tuple[str, ...] = ()


def layout(root: Path | None = None) -> pgcluster.ClusterLayout:
    root = root or state_dir()
    state = ensure_state(root)
    return pgcluster.ClusterLayout(root, state["primary_port"], state["replica_port"], state["password"])


def info(root: Path | None = None) -> SandboxInfo:
    root = root or state_dir()
    state = load_state(root)
    lay = layout(root)
    api = prefect_api_url(state)
    return SandboxInfo(root, api[: -len("/api")], api, lay.dsn(lay.primary_port), lay.dsn(lay.replica_port), CLUSTER_BLOCK)
