"""A write-once evidence bucket: S3 object lock in compliance mode, a sha256 manifest, read-back verification."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

from botocore.exceptions import BotoCoreError, ClientError
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field

from blocks.aws_security import AwsError, aws_error
from blocks.errors import InvalidInput
from blocks.postgres import CheckResult

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MANIFEST = "manifest.json"
CHUNK = 1024 * 1024


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EvidenceObject:
    """One stored evidence object: its exact version, size and sha256."""

    key: str
    version_id: str
    sha256: str
    size: int


@dataclass
class EvidenceManifest:
    """Where the evidence of one collection lies and how to prove it is unchanged."""

    bucket: str
    prefix: str
    manifest_key: str
    manifest_version_id: str
    manifest_sha256: str
    retain_until: str
    mode: str
    objects: list[EvidenceObject] = field(default_factory=list)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def as_dict(self) -> dict:
        return {**asdict(self), "location": self.location}


class EvidenceVault(Block):
    """An S3 bucket with object lock where forensic evidence is kept unchangeable.

    Every object is written once (never over an existing key) with a compliance-mode retention,
    listed with its sha256 in a ``manifest.json`` written the same way, then read back and
    compared.

    Example:
        ```python
        from blocks.evidence_vault import EvidenceVault
        vault = EvidenceVault.load("security")
        manifest = vault.store("INC-42/run-1", ["/tmp/evidence/db.dump"])
        manifest.manifest_sha256
        ```
    """

    _block_type_name = "Evidence Vault"
    _block_type_slug = "evidence-vault"
    _description = "A write-once S3 bucket (object lock, compliance mode) for forensic evidence."

    bucket: str = Field(description="Bucket name; created with object lock when missing.")
    credentials: AwsCredentials = Field(default_factory=AwsCredentials, description="AWS credentials allowed to write and read the bucket.")
    retention_days: int = Field(default=365, ge=1, description="Default compliance-mode retention of each object, in days.")
    prefix: str = Field(default="evidence", description="Key prefix under which every collection goes.")

    def _s3(self):
        return self.credentials.get_client("s3")

    def validate_settings(self, retention_days: int | None = None) -> int:
        """Refuse a bucket name or retention that cannot work; returns the retention to use."""
        if not BUCKET_NAME.match(self.bucket):
            raise InvalidInput(f"evidence bucket name {self.bucket!r} is not a valid S3 bucket name")
        days = self.retention_days if retention_days is None else retention_days
        if days < 1:
            raise InvalidInput(f"evidence retention {days} days must be at least 1 day")
        return days

    def ensure_bucket(self) -> None:
        """Create the bucket with object lock when missing; refuse an existing bucket without it."""
        s3 = self._s3()
        try:
            s3.head_bucket(Bucket=self.bucket)
            exists = True
        except ClientError as exc:
            if _status(exc) not in (404,) and exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise aws_error(exc, f"reading bucket {self.bucket}") from exc
            exists = False
        except BotoCoreError as exc:
            raise aws_error(exc, f"reading bucket {self.bucket}") from exc
        try:
            if not exists:
                region = s3.meta.region_name
                extra = {} if region in (None, "us-east-1") else {
                    "CreateBucketConfiguration": {"LocationConstraint": region}}
                s3.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True, **extra)
            config = s3.get_object_lock_configuration(Bucket=self.bucket).get("ObjectLockConfiguration", {})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ObjectLockConfigurationNotFoundError":
                raise AwsError(f"bucket {self.bucket} exists without object lock; evidence needs a write-once bucket") from exc
            raise aws_error(exc, f"preparing evidence bucket {self.bucket}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"preparing evidence bucket {self.bucket}") from exc
        if config.get("ObjectLockEnabled") != "Enabled":
            raise AwsError(f"bucket {self.bucket} exists without object lock; evidence needs a write-once bucket")

    def _put_once(self, key: str, body: bytes | None, path: str | None, sha256: str, until: datetime) -> EvidenceObject:
        """Write ``key`` once with a compliance retention; an identical object already there is kept."""
        s3 = self._s3()
        try:
            head = s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) != 404:
                raise aws_error(exc, f"reading s3://{self.bucket}/{key}") from exc
            head = None
        if head is not None:
            if head.get("Metadata", {}).get("sha256") != sha256:
                raise AwsError(f"s3://{self.bucket}/{key} already holds different evidence; refusing to write over it")
            return EvidenceObject(key, head.get("VersionId", ""), sha256, int(head["ContentLength"]))
        try:
            if path is not None:
                with open(path, "rb") as fh:
                    put = s3.put_object(Bucket=self.bucket, Key=key, Body=fh, IfNoneMatch="*",
                                        ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=until,
                                        Metadata={"sha256": sha256})
                size = os.path.getsize(path)
            else:
                put = s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*",
                                    ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=until,
                                    Metadata={"sha256": sha256})
                size = len(body or b"")
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"writing evidence s3://{self.bucket}/{key}") from exc
        return EvidenceObject(key, put.get("VersionId", ""), sha256, size)

    def store(self, collection: str, files: list[str], retention_days: int | None = None,
              metadata: dict | None = None) -> EvidenceManifest:
        """Upload ``files`` under ``<prefix>/<collection>/`` and a manifest of their sha256, all write-once.

        Returns:
            The manifest: location, each object's version and sha256, and the manifest's own sha256.
        """
        days = self.validate_settings(retention_days)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,300}$", collection) or ".." in collection:
            raise InvalidInput(f"evidence collection name {collection!r} is not a plain path")
        names = [os.path.basename(f) for f in files]
        if len(set(names)) != len(names) or MANIFEST in names:
            raise InvalidInput(f"evidence file names must be unique and not {MANIFEST!r}: {names}")
        self.ensure_bucket()
        until = (datetime.now(timezone.utc) + timedelta(days=days)).replace(microsecond=0)
        base = f"{self.prefix.strip('/')}/{collection.strip('/')}".strip("/")
        objects = [self._put_once(f"{base}/{name}", None, path, sha256_file(path), until)
                   for name, path in zip(names, files, strict=True)]
        document = {
            "collection": collection,
            "bucket": self.bucket,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "retention": {"mode": "COMPLIANCE", "retain_until": until.isoformat()},
            "objects": [asdict(o) for o in objects],
            "metadata": metadata or {},
        }
        body = json.dumps(document, indent=2, sort_keys=True).encode()
        digest = hashlib.sha256(body).hexdigest()
        manifest_obj = self._put_once(f"{base}/{MANIFEST}", body, None, digest, until)
        return EvidenceManifest(self.bucket, base, manifest_obj.key, manifest_obj.version_id, manifest_obj.sha256,
                                until.isoformat(), "COMPLIANCE", objects)

    def read_manifest(self, manifest: EvidenceManifest) -> dict:
        """The stored manifest document (the exact version written)."""
        return json.loads(self._read(manifest.manifest_key, manifest.manifest_version_id))

    def _read(self, key: str, version_id: str) -> bytes:
        extra = {"VersionId": version_id} if version_id else {}
        try:
            return self._s3().get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"reading s3://{self.bucket}/{key}") from exc

    def verify(self, manifest: EvidenceManifest) -> list[CheckResult]:
        """Read every object back: its sha256 matches, it is locked in compliance mode until the manifest's date."""
        results = []
        wanted_until = datetime.fromisoformat(manifest.retain_until)
        entries = [(o.key, o.version_id, o.sha256) for o in manifest.objects]
        entries.append((manifest.manifest_key, manifest.manifest_version_id, manifest.manifest_sha256))
        s3 = self._s3()
        for key, version_id, expected in entries:
            actual = hashlib.sha256(self._read(key, version_id)).hexdigest()
            extra = {"VersionId": version_id} if version_id else {}
            try:
                head = s3.head_object(Bucket=self.bucket, Key=key, **extra)
            except (ClientError, BotoCoreError) as exc:
                raise aws_error(exc, f"reading s3://{self.bucket}/{key}") from exc
            mode, until = head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")
            locked = mode == "COMPLIANCE" and until is not None and until >= wanted_until - timedelta(seconds=1)
            passed = actual == expected and locked
            results.append(CheckResult(
                f"evidence intact: {key.rsplit('/', 1)[-1]}", passed,
                f"s3://{self.bucket}/{key} version {version_id}: sha256 {actual[:16]}... "
                f"{'matches' if actual == expected else 'DIFFERS from ' + expected[:16] + '...'}; "
                f"lock {mode or 'none'} until {until.isoformat() if until else '-'}",
            ))
        return results


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
