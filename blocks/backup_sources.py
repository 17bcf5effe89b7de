"""Every backup the estate depends on, and the checks that prove each one is usable.

A ``BackupSources`` block lists pgBackRest stanzas (by PostgresCluster block name) and object-store
prefixes (object backups, Qdrant exports, model artifacts, Kubernetes manifest exports), each with
the age its newest backup may reach (its RPO) and how many days of backups are kept. Its verbs
return checks as data; none of them changes anything.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from botocore.exceptions import BotoCoreError, ClientError
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import BaseModel, Field, model_validator

from blocks._aws import client, error_code, translate
from blocks.errors import InvalidInput, RecoveryError
from blocks.object_store import ObjectStoreError, ObjectStoreUnavailable

# Retention per component, from the continuity plan's backup strategy (days).
DEFAULT_RETENTION_DAYS = {"postgres": 35, "objects": 90, "qdrant": 7, "kubernetes": 14, "models": 90}
# How old the newest backup may be: the backup interval plus a margin (seconds).
DEFAULT_RPO_SECONDS = {
    "postgres": 26 * 3600,  # daily full backup (WAL is continuous and checked apart)
    "objects": 26 * 3600,
    "qdrant": 7 * 3600,  # snapshot every 6 hours
    "kubernetes": 26 * 3600,  # daily manifest export
    "models": 8 * 86400,
}
RETENTION_GRACE = timedelta(days=1)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ObjectKind = Literal["objects", "qdrant", "models", "kubernetes"]


def _s3_error(exc: Exception, what: str) -> ObjectStoreError:
    return translate(exc, what, error=ObjectStoreError, unavailable=ObjectStoreUnavailable)


@dataclass(frozen=True)
class BackupCheck:
    """One check of one backup source: critical failures fail the validation run."""

    source: str
    check: str
    passed: bool
    detail: str
    critical: bool = True

    @property
    def name(self) -> str:
        return f"{self.source}: {self.check}" if self.source else self.check

    def as_dict(self) -> dict:
        return asdict(self)


class PgBackRestSource(BaseModel):
    """The pgBackRest repository of one PostgreSQL cluster."""

    cluster_block: str = Field(description="Name of the PostgresCluster block whose pgBackRest stanza is checked.")
    rpo_seconds: int = Field(default=DEFAULT_RPO_SECONDS["postgres"], ge=1,
                             description="Oldest acceptable age of the newest backup, in seconds.")
    retention_days: int = Field(default=DEFAULT_RETENTION_DAYS["postgres"], ge=1,
                                description="Days of backups kept; an older backup means expiry is not running.")
    wal_rpo_seconds: int | None = Field(
        default=None, ge=1,
        description="When set, the newest archived WAL segment may be at most this old (read from the primary).",
    )
    critical: bool = Field(default=True, description="Whether a failure of this source fails the validation run.")

    @property
    def label(self) -> str:
        return f"pgbackrest/{self.cluster_block}"


class ObjectPrefixSource(BaseModel):
    """Backups stored as objects under one bucket prefix."""

    kind: ObjectKind = Field(description="What the prefix holds: objects, qdrant exports, models or kubernetes exports.")
    bucket: str = Field(description="Bucket name.", min_length=3)
    prefix: str = Field(default="", description="Key prefix of the backups, e.g. 'qdrant/leads/'.")
    rpo_seconds: int | None = Field(default=None, ge=1,
                                    description="Oldest acceptable age of the newest object; defaults by kind.")
    retention_days: int | None = Field(default=None, ge=1,
                                       description="Days of backups kept; defaults by kind (plan: 90/7/14 days).")
    checksum_manifest: str | None = Field(
        default=None,
        description="Key, relative to the prefix, of a sha256 manifest ('<sha256>  <name>' lines, or a JSON "
                    "object name -> sha256). Objects carrying a 'sha256' metadata value are verified too.",
    )
    verify_newest: int = Field(default=20, ge=1, le=10_000,
                               description="At most this many of the newest objects are downloaded for checksums.")
    require_checksum: bool = Field(
        default=True,
        description="Whether a backup with no sha256 to verify against (no manifest entry, no 'sha256' metadata) "
                    "fails the critical integrity check; False makes it a non-critical warning.",
    )
    critical: bool = Field(default=True, description="Whether a failure of this source fails the validation run.")

    @model_validator(mode="after")
    def _defaults(self) -> "ObjectPrefixSource":
        if self.rpo_seconds is None:
            self.rpo_seconds = DEFAULT_RPO_SECONDS[self.kind]
        if self.retention_days is None:
            self.retention_days = DEFAULT_RETENTION_DAYS[self.kind]
        return self

    @property
    def label(self) -> str:
        return f"{self.kind}/s3://{self.bucket}/{self.prefix}"


def _age(now: datetime, moment: datetime) -> float:
    return (now - moment).total_seconds()


def _fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class BackupSources(Block):
    """The backups of an estate and the verbs that check them.

    Example:
        ```python
        from blocks.backup_sources import BackupSources, ObjectPrefixSource, PgBackRestSource
        sources = BackupSources(
            pgbackrest=[PgBackRestSource(cluster_block="sandbox")],
            object_prefixes=[ObjectPrefixSource(kind="qdrant", bucket="dr-backups", prefix="qdrant/")],
            aws_credentials=AwsCredentials.load("backups"),
        )
        for check in sources.check_object_prefix(sources.object_prefixes[0]):
            print(check.name, check.passed, check.detail)
        ```
    """

    _block_type_name = "Backup Sources"
    _block_type_slug = "backup-sources"
    _description = "Backups to validate: pgBackRest stanzas and object-store prefixes, each with an RPO and retention."

    pgbackrest: list[PgBackRestSource] = Field(default_factory=list,
                                               description="pgBackRest repositories, by PostgresCluster block.")
    object_prefixes: list[ObjectPrefixSource] = Field(
        default_factory=list,
        description="Object-store prefixes: object backups, Qdrant exports, model artifacts, Kubernetes exports.",
    )
    aws_credentials: AwsCredentials | None = Field(
        default=None, description="Credentials (and endpoint) of the object store holding the prefixes."
    )
    command_timeout_seconds: int = Field(default=1800, ge=10,
                                         description="Upper bound for one pgBackRest verify.")

    def check_settings(self) -> None:
        """Refuse a configuration that cannot be checked, before anything runs."""
        if not self.pgbackrest and not self.object_prefixes:
            raise InvalidInput("backup sources list no pgBackRest stanza and no object prefix; nothing to validate")
        if self.object_prefixes and self.aws_credentials is None:
            raise InvalidInput("backup sources list object prefixes but no aws_credentials to read them with")

    # ------------------------------------------------------------------ pgBackRest

    def verify_pgbackrest(self, cluster) -> list[str]:
        """Run ``pgbackrest verify`` on the cluster's stanza and return the problems it reports."""
        return cluster.pgbackrest.verify(timeout=self.command_timeout_seconds)

    def check_pgbackrest(self, source: PgBackRestSource, cluster, now: datetime | None = None) -> list[BackupCheck]:
        """Exists, non-empty, fresh, verified and within retention, for one pgBackRest stanza."""
        now = now or datetime.now(timezone.utc)
        name, crit = source.label, source.critical
        try:
            backups = cluster.backups()
        except RecoveryError as exc:
            return [BackupCheck(name, "exists", False, f"pgBackRest info failed: {exc}", crit)]
        if not backups:
            return [BackupCheck(name, "exists", False, f"stanza {cluster.pgbackrest_stanza!r} has no backup", crit)]
        newest, oldest = backups[-1], backups[0]
        checks = [BackupCheck(name, "exists", True, f"{len(backups)} backups, newest {newest.label}", crit)]
        checks.append(BackupCheck(name, "non-empty", newest.size_bytes > 0 and not newest.error,
                                  f"{newest.label}: {newest.size_bytes} bytes"
                                  + (", pgBackRest marks it as having errors" if newest.error else ""), crit))
        age = _age(now, newest.stopped_at)
        checks.append(BackupCheck(name, "fresh", age <= source.rpo_seconds,
                                  f"newest ended {_fmt_age(age)} ago (RPO {_fmt_age(source.rpo_seconds)})", crit))
        problems = self.verify_pgbackrest(cluster)
        checks.append(BackupCheck(name, "integrity", not problems,
                                  "pgbackrest verify: " + ("; ".join(problems[:6]) if problems else "all files valid"),
                                  crit))
        limit = timedelta(days=source.retention_days) + RETENTION_GRACE
        oldest_age = now - oldest.stopped_at
        checks.append(BackupCheck(name, "retention", oldest_age <= limit,
                                  f"oldest {oldest.label} is {_fmt_age(oldest_age.total_seconds())} old "
                                  f"(retention {source.retention_days} days)", False))
        if source.wal_rpo_seconds is not None:
            try:
                last = cluster.latest_archived_time()
            except RecoveryError as exc:
                checks.append(BackupCheck(name, "WAL archive fresh", False, f"cannot read pg_stat_archiver: {exc}", crit))
            else:
                wal_age = None if last is None else _age(now, last)
                checks.append(BackupCheck(
                    name, "WAL archive fresh", wal_age is not None and wal_age <= source.wal_rpo_seconds,
                    "no WAL archived yet" if wal_age is None else
                    f"newest WAL archived {_fmt_age(wal_age)} ago (RPO {_fmt_age(source.wal_rpo_seconds)})", crit))
        return checks

    # ------------------------------------------------------------------ object store

    def _s3(self):
        if self.aws_credentials is None:
            raise InvalidInput("backup sources have no aws_credentials; object prefixes cannot be read")
        return client(self.aws_credentials, "s3")

    def _list(self, s3, source: ObjectPrefixSource) -> list[dict]:
        objects: list[dict] = []
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.prefix):
                objects.extend(page.get("Contents", []))
        except s3.exceptions.NoSuchBucket as exc:
            raise InvalidInput(f"bucket {source.bucket!r} does not exist") from exc
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, f"listing s3://{source.bucket}/{source.prefix}") from exc
        return objects

    def _sha256(self, s3, bucket: str, key: str) -> str:
        digest = hashlib.sha256()
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in iter(lambda: body.read(1 << 20), b""):
                digest.update(chunk)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, f"reading s3://{bucket}/{key}") from exc
        return digest.hexdigest()

    def _manifest(self, s3, source: ObjectPrefixSource) -> dict[str, str]:
        key = source.prefix + source.checksum_manifest
        try:
            text = s3.get_object(Bucket=source.bucket, Key=key)["Body"].read().decode()
        except s3.exceptions.NoSuchKey as exc:
            raise InvalidInput(f"checksum manifest s3://{source.bucket}/{key} does not exist") from exc
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, f"reading the checksum manifest s3://{source.bucket}/{key}") from exc
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"checksum manifest s3://{source.bucket}/{key} is not UTF-8 text "
                               f"(byte {exc.start}); expected JSON or sha256sum lines") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            entries = {str(k): str(v).lower() for k, v in data.get("files", data).items()}
        else:
            entries = {}
            for line in text.splitlines():
                parts = line.strip().split(maxsplit=1)
                if len(parts) == 2:
                    entries[parts[1].lstrip("*").strip()] = parts[0].lower()
        return {source.prefix + name: digest for name, digest in entries.items()}

    def check_object_prefix(self, source: ObjectPrefixSource, now: datetime | None = None) -> list[BackupCheck]:
        """Exists, non-empty, fresh, checksums and retention, for one prefix."""
        now = now or datetime.now(timezone.utc)
        name, crit = source.label, source.critical
        s3 = self._s3()
        manifest_key = source.prefix + source.checksum_manifest if source.checksum_manifest else None
        try:
            objects = [o for o in self._list(s3, source) if o["Key"] != manifest_key]
        except InvalidInput as exc:
            return [BackupCheck(name, "exists", False, str(exc), crit)]
        if not objects:
            return [BackupCheck(name, "exists", False, f"no object under s3://{source.bucket}/{source.prefix}", crit)]
        objects.sort(key=lambda o: o["LastModified"])
        newest, oldest = objects[-1], objects[0]
        checks = [BackupCheck(name, "exists", True, f"{len(objects)} objects, newest {newest['Key']}", crit)]
        empty = [o["Key"] for o in objects if o["Size"] == 0]
        checks.append(BackupCheck(name, "non-empty", newest["Size"] > 0 and not empty,
                                  f"empty: {', '.join(empty[:5])}" if empty else
                                  f"newest {newest['Key']}: {newest['Size']} bytes", crit))
        age = _age(now, newest["LastModified"])
        checks.append(BackupCheck(name, "fresh", age <= source.rpo_seconds,
                                  f"newest written {_fmt_age(age)} ago (RPO {_fmt_age(source.rpo_seconds)})", crit))
        checks.append(self._check_checksums(s3, source, objects))
        limit = timedelta(days=source.retention_days) + RETENTION_GRACE
        expired = [o["Key"] for o in objects if now - o["LastModified"] > limit]
        rule = self._lifecycle_days(s3, source)
        detail = (f"{len(expired)} objects older than {source.retention_days} days" if expired
                  else f"oldest {_fmt_age(_age(now, oldest['LastModified']))} old")
        detail += f"; lifecycle expiry {rule} days" if rule is not None else "; no lifecycle expiry rule"
        checks.append(BackupCheck(name, "retention", not expired and rule in (None, source.retention_days),
                                  detail + f" (retention {source.retention_days} days)", False))
        return checks

    def _check_checksums(self, s3, source: ObjectPrefixSource, objects: list[dict]) -> BackupCheck:
        name, crit = source.label, source.critical
        expected: dict[str, str] = {}
        if source.checksum_manifest:
            try:
                expected = self._manifest(s3, source)
            except InvalidInput as exc:
                return BackupCheck(name, "integrity", False, str(exc), crit)
        present = {o["Key"] for o in objects}
        missing = sorted(k for k in expected if k not in present)
        newest = [o["Key"] for o in objects[-source.verify_newest:]]
        for key in newest:
            if key in expected:
                continue
            try:
                meta = s3.head_object(Bucket=source.bucket, Key=key).get("Metadata", {})
            except (BotoCoreError, ClientError) as exc:
                raise _s3_error(exc, f"reading s3://{source.bucket}/{key}") from exc
            if _SHA256.match(meta.get("sha256", "").lower()):
                expected[key] = meta["sha256"].lower()
        to_check = [k for k in expected if k in present][: source.verify_newest if not source.checksum_manifest else None]
        if not to_check and not missing:
            return BackupCheck(name, "integrity", False, "no sha256 manifest or metadata to verify against",
                               crit and source.require_checksum)
        bad = [k for k in to_check if self._sha256(s3, source.bucket, k) != expected[k]]
        problems = [f"sha256 mismatch: {k}" for k in bad] + [f"listed but missing: {k}" for k in missing]
        return BackupCheck(name, "integrity", not problems,
                           "; ".join(problems[:6]) if problems else f"{len(to_check)} objects match their sha256", crit)

    def _lifecycle_days(self, s3, source: ObjectPrefixSource) -> int | None:
        """Expiration days of the lifecycle rule covering the prefix, if any."""
        try:
            rules = s3.get_bucket_lifecycle_configuration(Bucket=source.bucket).get("Rules", [])
        except ClientError as exc:
            if error_code(exc) == "NoSuchLifecycleConfiguration":
                return None
            raise _s3_error(exc, f"reading the lifecycle of bucket {source.bucket!r}") from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, f"reading the lifecycle of bucket {source.bucket!r}") from exc
        for rule in rules:
            if rule.get("Status") != "Enabled":
                continue
            prefix = rule.get("Filter", {}).get("Prefix", rule.get("Prefix", ""))
            if not source.prefix.startswith(prefix or ""):
                continue
            days = rule.get("Expiration", {}).get("Days") or rule.get("NoncurrentVersionExpiration", {}).get("NoncurrentDays")
            if days:
                return int(days)
        return None


# ---------------------------------------------------------------------- restore tests


def compare_with_source(cluster, port: int, tables: list[str], queries: list) -> list[BackupCheck]:
    """Row counts and sentinel query answers of the scratch instance on ``port`` against the primary's."""
    checks: list[BackupCheck] = []
    scratch = ""  # the report's stage names the scratch instance
    for table in tables:
        source_count = cluster.row_count(table)
        try:
            restored = cluster.row_count(table, port)
        except InvalidInput as exc:
            checks.append(BackupCheck(scratch, f"row count: {table}", False, str(exc)))
            continue
        checks.append(BackupCheck(scratch, f"row count: {table}", restored == source_count,
                                  f"restored {restored}, source {source_count}"))
    for query in queries:
        source_value = cluster.read_only_value(query.sql, dbname=query.database)
        result = cluster.run_sentinel(query, port)
        try:
            restored_value = cluster.read_only_value(query.sql, port=port, dbname=query.database)
        except RecoveryError as exc:
            checks.append(BackupCheck(scratch, result.name, False, str(exc)))
            continue
        same = str(restored_value) == str(source_value)
        passed = same and (result.passed or not result.critical)
        checks.append(BackupCheck(scratch, result.name, passed,
                                  f"restored {restored_value}, source {source_value}"
                                  + (f"; {result.detail}" if not result.passed else "")))
    return checks


def scratch_paths(cluster, scratch_id: str) -> list[str]:
    """Every path a restore into scratch ``scratch_id`` may have created."""
    data_dir = cluster.candidate_directory(scratch_id)
    return [os.path.dirname(data_dir), f"{data_dir}-tablespaces", *glob.glob(f"{glob.escape(data_dir)}.partial-*")]


def discard_scratch(cluster, scratch_id: str) -> list[str]:
    """Stop the scratch instance of ``scratch_id`` and delete everything its restore created; returns what was removed.

    Only paths inside the cluster's recovery directory, named after ``scratch_id``, are touched.
    """
    data_dir = cluster.candidate_directory(scratch_id)
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        cluster.stop_instance(data_dir, mode="immediate")
    removed = []
    root = os.path.realpath(cluster.recovery_directory)
    for path in scratch_paths(cluster, scratch_id):
        real = os.path.realpath(path)
        if not real.startswith(root + os.sep) or not os.path.exists(real):
            continue
        shutil.rmtree(real)
        removed.append(real)
    return removed
