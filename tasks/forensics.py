"""Forensic evidence, the known-good restore point and the isolation check of a security incident.

Evidence is collected into a private local folder, uploaded write-once to the evidence vault
with a sha256 manifest, read back and verified; the local copies are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta

from prefect import get_run_logger, task

from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.evidence_vault import EvidenceManifest, EvidenceVault
from blocks.pgbackrest import BackupSet
from blocks.postgres import PostgresCluster
from blocks.results import CheckResult
from tasks._policy import policy

# pgBackRest records a backup's stop time in whole seconds and needs a target strictly after it.
BACKUP_STOP_MARGIN = timedelta(seconds=1)
# The recovery target sits this far before the breach start: nothing the intruder committed is replayed.
BEFORE_BREACH = timedelta(milliseconds=1)


@dataclass(frozen=True)
class KnownGood:
    """The restore point chosen for a breach: the newest usable backup that ended before it, and the target time."""

    backup_label: str
    backup_stopped_at: datetime
    target: datetime
    breach_start: datetime

    def describe(self) -> str:
        return (f"backup {self.backup_label} (ended {self.backup_stopped_at.isoformat()}) replayed to "
                f"{self.target.isoformat()}, before the breach start {self.breach_start.isoformat()}")


def known_good_from(backups: list[BackupSet], breach_start: datetime) -> KnownGood:
    """The newest usable backup that ended strictly before ``breach_start``; refused when there is none."""
    target = breach_start - BEFORE_BREACH
    usable = [b for b in backups if not b.error and b.stopped_at + BACKUP_STOP_MARGIN <= target]
    if not usable:
        oldest = min((b.stopped_at for b in backups if not b.error), default=None)
        raise InvalidInput(
            f"no known-good backup before the breach start {breach_start.isoformat()}: "
            + (f"the oldest usable backup ended {oldest.isoformat()}" if oldest else "the repository holds no usable backup")
            + "; restore from an older copy by hand or set restore_database=False"
        )
    chosen = max(usable, key=lambda b: b.stopped_at)
    return KnownGood(chosen.label, chosen.stopped_at, target, breach_start)


@task(name="choose-known-good-restore-point", **policy(timeout_seconds=300))
def choose_known_good_restore_point(cluster: PostgresCluster, breach_start: datetime) -> KnownGood:
    """The newest backup before the breach, and a recovery target just before the breach started."""
    return known_good_from(cluster.backups(), breach_start)


@task(name="check-primary-reachable", **policy(timeout_seconds=60))
def check_primary_reachable(cluster: PostgresCluster) -> bool:
    """True when the cluster's primary accepts a connection."""
    return cluster.is_reachable()


def evidence_folder(incident_id: str) -> str:
    """A private local folder for one collection of evidence."""
    folder = tempfile.mkdtemp(prefix=f"dr-evidence-{incident_id[:40]}-")
    os.chmod(folder, 0o700)
    return folder


def write_json(folder: str, name: str, data) -> str:
    """Write ``data`` as JSON evidence file ``name``; returns its path."""
    path = os.path.join(folder, name)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
    return path


@task(name="collect-database-evidence", **policy(timeout_seconds=3600, retries=1))
def collect_database_evidence(cluster: PostgresCluster, folder: str, since: datetime | None) -> list[str]:
    """A logical dump of the database and the primary's server logs since ``since``."""
    dump = cluster.dump_database(os.path.join(folder, f"{cluster.database}.pgdump"))
    logs_dir = os.path.join(folder, "postgresql-logs")
    logs = cluster.collect_logs(logs_dir, since)
    files = [dump]
    if logs:
        archive = shutil.make_archive(os.path.join(folder, "postgresql-logs"), "gztar", logs_dir)
        files.append(archive)
    shutil.rmtree(logs_dir, ignore_errors=True)
    get_run_logger().info("Database evidence: dump of %s and %d log file(s)", cluster.database, len(logs))
    return files


@task(name="store-evidence", **policy(timeout_seconds=3600))
def store_evidence(vault: EvidenceVault, collection: str, files: list[str], retention_days: int | None,
                   metadata: dict, retain_until: datetime, created_at: datetime) -> EvidenceManifest:
    """Upload the files and their sha256 manifest write-once (compliance-mode object lock).

    ``retain_until`` and ``created_at`` are fixed once per collection, so a retry finishes the
    same manifest instead of writing a different one.
    """
    manifest = vault.store(collection, files, retention_days, metadata, retain_until, created_at)
    get_run_logger().info("Evidence stored at %s: %d objects, manifest sha256 %s, locked until %s",
                          manifest.location, len(manifest.objects), manifest.manifest_sha256, manifest.retain_until)
    return manifest


@task(name="verify-evidence", **policy(timeout_seconds=3600))
def verify_evidence(vault: EvidenceVault, manifest: EvidenceManifest) -> list[CheckResult]:
    """Read every evidence object back and compare its sha256 and lock with the manifest."""
    return vault.verify(manifest)


@task(name="check-workload-isolated", **policy(timeout_seconds=60))
def check_workload_isolated(kube: KubernetesTarget, policy_name: str, pod_selector: dict[str, str]) -> CheckResult:
    """The deny-all NetworkPolicy exists, selects the workload's pods and allows nothing."""
    found = kube.get_network_policy(policy_name)
    if not found:
        return CheckResult(f"workload isolated: {policy_name}", False, "NetworkPolicy missing")
    spec = found.get("spec", {}) if isinstance(found, dict) else {}
    selected = (spec.get("podSelector") or {}).get("matchLabels") or {}
    types = sorted(spec.get("policyTypes") or [])
    closed = types == ["Egress", "Ingress"] and not spec.get("ingress") and not spec.get("egress")
    ok = closed and selected == pod_selector
    return CheckResult(f"workload isolated: {policy_name}", ok,
                       f"selects {selected}; policy types {types}; {len(spec.get('ingress') or [])} ingress and "
                       f"{len(spec.get('egress') or [])} egress rules")
