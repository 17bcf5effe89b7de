"""Backup validation: each kind of bad backup fails its own check, and only that check."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import pytest

from blocks.backup_sources import BackupSources, ObjectPrefixSource, PgBackRestSource
from blocks.pgbackrest import parse_verify_output
from blocks.errors import InvalidInput
from flows.backup_validation import backup_validation

BUCKET = "dr-backups"


def put(s3, key: str, body: bytes, sha256: str | None = None) -> None:
    extra = {"Metadata": {"sha256": sha256}} if sha256 else {}
    s3.put_object(Bucket=BUCKET, Key=key, Body=body, **extra)


def failing(data: list[dict]) -> set[tuple[str, str]]:
    return {(c["source"], c["check"]) for c in data if not c["passed"] and c["critical"]}


def run(name: str):
    state = backup_validation(sources_block=name, return_state=True)
    return state, state.result(raise_on_failure=False)


@pytest.fixture
def seeded(aws):
    """A bucket with one good prefix per kind and one bad prefix per failure mode."""
    s3 = aws.get_client("s3")
    s3.create_bucket(Bucket=BUCKET)
    good = b"snapshot of leads collection"
    put(s3, "qdrant/leads-001.snapshot", good, hashlib.sha256(good).hexdigest())
    put(s3, "kubernetes/2026-01-01/deployments.yaml", b"kind: Deployment\n")
    model = b"\x00weights" * 100
    put(s3, "models/ranker/v3/model.bin", model)
    put(s3, "models/ranker/v3/SHA256SUMS", f"{hashlib.sha256(model).hexdigest()}  model.bin\n".encode())
    # The failure modes, one prefix each.
    put(s3, "empty/db-dump.sql.gz", b"")
    put(s3, "stale/export.tar", b"old export")
    put(s3, "corrupt/model.bin", b"flipped bits")
    put(s3, "corrupt/SHA256SUMS", f"{hashlib.sha256(b'original bits').hexdigest()}  model.bin\n".encode())
    return aws, s3


def sources_for(aws, **extra) -> BackupSources:
    return BackupSources(
        aws_credentials=aws,
        object_prefixes=[
            ObjectPrefixSource(kind="qdrant", bucket=BUCKET, prefix="qdrant/"),
            # Manifest exports carry no checksums: explicitly not required, a missing one is a warning.
            ObjectPrefixSource(kind="kubernetes", bucket=BUCKET, prefix="kubernetes/", require_checksum=False),
            ObjectPrefixSource(kind="models", bucket=BUCKET, prefix="models/ranker/v3/", checksum_manifest="SHA256SUMS"),
            ObjectPrefixSource(kind="objects", bucket=BUCKET, prefix="missing/"),
            ObjectPrefixSource(kind="objects", bucket=BUCKET, prefix="empty/", require_checksum=False),
            ObjectPrefixSource(kind="kubernetes", bucket=BUCKET, prefix="stale/", rpo_seconds=1, require_checksum=False),
            ObjectPrefixSource(kind="models", bucket=BUCKET, prefix="corrupt/", checksum_manifest="SHA256SUMS"),
        ],
        **extra,
    )


def test_each_bad_backup_fails_its_own_check(seeded, cluster, prefect_api):
    aws, _ = seeded
    pg_name, block, pg = cluster
    name = f"sources-{uuid.uuid4().hex[:8]}"
    sources_for(aws, pgbackrest=[PgBackRestSource(cluster_block=pg_name)]).save(name)
    time.sleep(1.1)  # the 'stale' prefix (RPO 1 s) is now older than its RPO; the others are not

    state, data = run(name)
    assert state.is_failed() and state.name == "BackupValidationFailed"
    assert failing(data) == {
        ("objects/s3://dr-backups/missing/", "exists"),
        ("objects/s3://dr-backups/empty/", "non-empty"),
        ("kubernetes/s3://dr-backups/stale/", "fresh"),
        ("models/s3://dr-backups/corrupt/", "integrity"),
    }
    by = {(c["source"], c["check"]): c for c in data}
    assert by[("models/s3://dr-backups/corrupt/", "integrity")]["detail"] == "sha256 mismatch: corrupt/model.bin"
    assert by[("qdrant/s3://dr-backups/qdrant/", "integrity")]["passed"]  # verified from its sha256 metadata
    assert by[("models/s3://dr-backups/models/ranker/v3/", "integrity")]["passed"]
    pg_checks = {c["check"]: c["passed"] for c in data if c["source"] == f"pgbackrest/{pg_name}"}
    assert pg_checks == {"exists": True, "non-empty": True, "fresh": True, "integrity": True, "retention": True}

    # A corrupted pgBackRest repository file: verify exits 0, the parsed output fails the check.
    files = [p for p in (pg.pgbackrest_dir / "repo" / "backup").rglob("*") if p.is_file() and "pg_data/base" in str(p)]
    victim = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = os.urandom(64)
    victim.write_bytes(bytes(raw))
    only_pg = f"sources-{uuid.uuid4().hex[:8]}"
    BackupSources(pgbackrest=[PgBackRestSource(cluster_block=pg_name)]).save(only_pg)
    state, data = run(only_pg)
    assert state.is_failed()
    assert failing(data) == {(f"pgbackrest/{pg_name}", "integrity")}
    detail = next(c["detail"] for c in data if c["check"] == "integrity")
    assert victim.name in detail and "invalid" in detail


def test_valid_backups_complete_with_the_table(seeded, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    aws, _ = seeded
    name = f"sources-{uuid.uuid4().hex[:8]}"
    BackupSources(aws_credentials=aws, object_prefixes=sources_for(aws).object_prefixes[:3]).save(name)
    state, data = run(name)
    assert state.is_completed() and state.name == "Valid", state.message
    assert len(data) == 15 and all(c["passed"] for c in data if c["critical"])
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    table = next(a for a in arts if a.key == "backup-validation")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["check"] for r in rows} == {"exists", "non-empty", "fresh", "integrity", "retention"}


def test_failed_validation_alerts(seeded, notifier, webhook, prefect_api):
    aws, _ = seeded
    name = f"sources-{uuid.uuid4().hex[:8]}"
    BackupSources(aws_credentials=aws, object_prefixes=[
        ObjectPrefixSource(kind="objects", bucket=BUCKET, prefix="missing/")]).save(name)
    state = backup_validation(sources_block=name, notifier=notifier, return_state=True)
    assert state.is_failed()
    text = webhook.wait_for(lambda t: "INCIDENT ALERT" in t)[0]
    assert "Service: backups" in text and "missing/: exists" in text


def test_a_backup_without_checksum_fails_unless_not_required(seeded, prefect_api):
    aws, s3 = seeded
    put(s3, "unsummed/dump.sql.gz", b"a dump nobody hashed")
    required, optional = f"sources-{uuid.uuid4().hex[:8]}", f"sources-{uuid.uuid4().hex[:8]}"
    BackupSources(aws_credentials=aws, object_prefixes=[
        ObjectPrefixSource(kind="objects", bucket=BUCKET, prefix="unsummed/")]).save(required)
    BackupSources(aws_credentials=aws, object_prefixes=[
        ObjectPrefixSource(kind="objects", bucket=BUCKET, prefix="unsummed/", require_checksum=False)]).save(optional)
    state, data = run(required)
    assert state.is_failed() and failing(data) == {("objects/s3://dr-backups/unsummed/", "integrity")}
    state, data = run(optional)
    assert state.is_completed() and "1 non-critical warning" in state.message
    integrity = next(c for c in data if c["check"] == "integrity")
    assert not integrity["passed"] and not integrity["critical"]


def test_unreadable_manifests_fail_their_check_and_alert(seeded, notifier, webhook, prefect_api):
    aws, s3 = seeded
    model = b"archived weights"
    put(s3, "archived/model.bin", model)
    s3.put_object(Bucket=BUCKET, Key="archived/SHA256SUMS", StorageClass="GLACIER",
                  Body=f"{hashlib.sha256(model).hexdigest()}  model.bin\n".encode())
    put(s3, "binary/model.bin", model)
    put(s3, "binary/SHA256SUMS", b"\xff\xfe\x00not a text manifest")
    name = f"sources-{uuid.uuid4().hex[:8]}"
    BackupSources(aws_credentials=aws, object_prefixes=[
        ObjectPrefixSource(kind="models", bucket=BUCKET, prefix="archived/", checksum_manifest="SHA256SUMS"),
        ObjectPrefixSource(kind="models", bucket=BUCKET, prefix="binary/", checksum_manifest="SHA256SUMS"),
    ]).save(name)
    state = backup_validation(sources_block=name, notifier=notifier, return_state=True)
    data = state.result(raise_on_failure=False)
    assert state.is_failed() and state.name == "BackupValidationFailed"
    assert failing(data) == {("models/s3://dr-backups/archived/", "checked"),
                             ("models/s3://dr-backups/binary/", "integrity")}
    by = {c["source"]: c["detail"] for c in data if not c["passed"]}
    assert "InvalidObjectState" in by["models/s3://dr-backups/archived/"]
    assert "is not UTF-8 text" in by["models/s3://dr-backups/binary/"]
    text = webhook.wait_for(lambda t: "INCIDENT ALERT" in t)[0]
    assert "archived/: checked" in text and "binary/: integrity" in text


def test_a_validation_that_cannot_run_alerts(notifier, webhook, prefect_api):
    missing = f"no-such-sources-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidInput, match=missing):
        backup_validation(sources_block=missing, notifier=notifier)
    text = webhook.wait_for(lambda t: "backup validation could not run" in t)[0]
    assert "Service: backups" in text and missing in text
    empty = f"sources-{uuid.uuid4().hex[:8]}"
    BackupSources().save(empty)
    with pytest.raises(InvalidInput, match="nothing to validate"):
        backup_validation(sources_block=empty, notifier=notifier)
    webhook.wait_for(lambda t: "nothing to validate" in t)


def test_settings_refused_before_anything_runs(aws):
    with pytest.raises(InvalidInput, match="nothing to validate"):
        BackupSources().check_settings()
    with pytest.raises(InvalidInput, match="no aws_credentials"):
        BackupSources(object_prefixes=[ObjectPrefixSource(kind="qdrant", bucket=BUCKET)]).check_settings()


def test_retention_defaults_follow_the_plan():
    days = {k: ObjectPrefixSource(kind=k, bucket=BUCKET).retention_days for k in ("objects", "qdrant", "kubernetes")}
    assert days == {"objects": 90, "qdrant": 7, "kubernetes": 14}
    assert PgBackRestSource(cluster_block="x").retention_days == 35


def test_verify_output_parsing_finds_problems_despite_exit_zero():
    ok = "P00   INFO: verify command begin 2.45\nP00   INFO: verify command end: completed successfully (285ms)"
    bad = ("P01   INFO: invalid checksum '20261123-042202F/pg_data/base/1/2838.lz4'\n"
           "  status: error\n  backup: 20261123-042202F, status: invalid, total files checked: 965\n  checksum invalid: 1")
    assert parse_verify_output(ok) == []
    assert len(parse_verify_output(bad)) == 4
