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

from blocks._aws import client, error_code, http_status
from blocks.aws_security import AwsError, aws_error
from blocks.errors import InvalidInput
from blocks.results import CheckResult

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MANIFEST = "manifest.json"
CHUNK = 1024 * 1024
MAX_PARTS = 10000


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
    retain_until: str = ""


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
    multipart_threshold_bytes: int = Field(
        default=64 * 1024 * 1024, ge=5 * 1024 * 1024,
        description="Files at least this large are uploaded in parts of this size (S3 takes at most 5 GB in one request).")

    def _s3(self):
        return client(self.credentials, "s3")

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
            if http_status(exc) != 404 and error_code(exc) not in ("404", "NoSuchBucket"):
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
            if error_code(exc) == "ObjectLockConfigurationNotFoundError":
                raise AwsError(f"bucket {self.bucket} exists without object lock; evidence needs a write-once bucket") from exc
            raise aws_error(exc, f"preparing evidence bucket {self.bucket}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"preparing evidence bucket {self.bucket}") from exc
        if config.get("ObjectLockEnabled") != "Enabled":
            raise AwsError(f"bucket {self.bucket} exists without object lock; evidence needs a write-once bucket")

    def _head(self, key: str, version_id: str | None = None) -> dict | None:
        extra = {"VersionId": version_id} if version_id else {}
        try:
            return self._s3().head_object(Bucket=self.bucket, Key=key, **extra)
        except ClientError as exc:
            if http_status(exc) == 404 and not version_id:
                return None
            raise aws_error(exc, f"reading s3://{self.bucket}/{key}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"reading s3://{self.bucket}/{key}") from exc

    def _put_once(self, key: str, body: bytes | None, path: str | None, sha256: str, until: datetime) -> EvidenceObject:
        """Write ``key`` once with a compliance retention; an identical object already there is kept.

        A kept object carries the retention it was written with, which is what its entry records.
        """
        head = self._head(key)
        if head is not None:
            if head.get("Metadata", {}).get("sha256") != sha256:
                raise AwsError(f"s3://{self.bucket}/{key} already holds different evidence; refusing to write over it")
            kept_until = head.get("ObjectLockRetainUntilDate")
            if head.get("ObjectLockMode") != "COMPLIANCE" or kept_until is None:
                # Written by an attempt that stopped before locking it: lock it now.
                try:
                    self._s3().put_object_retention(Bucket=self.bucket, Key=key, VersionId=head.get("VersionId", ""),
                                                    Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until})
                except (ClientError, BotoCoreError) as exc:
                    raise aws_error(exc, f"locking evidence s3://{self.bucket}/{key}") from exc
                kept_until = until
            return EvidenceObject(key, head.get("VersionId", ""), sha256, int(head["ContentLength"]),
                                  kept_until.isoformat() if kept_until else "")
        lock = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until, "Metadata": {"sha256": sha256}}
        s3 = self._s3()
        try:
            if path is not None and os.path.getsize(path) >= self.multipart_threshold_bytes:
                version_id = self._upload_parts(s3, key, path, lock)
                size = os.path.getsize(path)
            elif path is not None:
                with open(path, "rb") as fh:
                    version_id = s3.put_object(Bucket=self.bucket, Key=key, Body=fh, IfNoneMatch="*", **lock).get("VersionId", "")
                size = os.path.getsize(path)
            else:
                version_id = s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **lock).get("VersionId", "")
                size = len(body or b"")
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"writing evidence s3://{self.bucket}/{key}") from exc
        return EvidenceObject(key, version_id, sha256, size, until.isoformat())

    def _upload_parts(self, s3, key: str, path: str, lock: dict) -> str:
        """A multipart upload of ``path`` with the object lock set at its creation; aborted on failure."""
        size = os.path.getsize(path)
        part_size = max(self.multipart_threshold_bytes, -(-size // MAX_PARTS))
        upload_id = s3.create_multipart_upload(Bucket=self.bucket, Key=key, **lock)["UploadId"]
        try:
            parts = []
            with open(path, "rb") as fh:
                for number in range(1, MAX_PARTS + 1):
                    data = fh.read(part_size)
                    if not data:
                        break
                    etag = s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                          Body=data)["ETag"]
                    parts.append({"PartNumber": number, "ETag": etag})
            done = s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except BaseException:
            try:
                s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (ClientError, BotoCoreError):
                pass  # an upload left behind is removed by the bucket's lifecycle; the original error matters
            raise
        version_id = done.get("VersionId", "")
        head = self._head(key, version_id) or {}
        if head.get("ObjectLockMode") != "COMPLIANCE" or head.get("ObjectLockRetainUntilDate") is None:
            # Some S3 implementations drop the lock given at creation of a multipart upload: set it on the version.
            s3.put_object_retention(Bucket=self.bucket, Key=key, VersionId=version_id,
                                    Retention={"Mode": "COMPLIANCE", "RetainUntilDate": lock["ObjectLockRetainUntilDate"]})
        return version_id

    def store(self, collection: str, files: list[str], retention_days: int | None = None,
              metadata: dict | None = None, retain_until: datetime | None = None,
              created_at: datetime | None = None) -> EvidenceManifest:
        """Upload ``files`` under ``<prefix>/<collection>/`` and a manifest of their sha256, all write-once.

        Storing the same collection again (a retry) with the same ``retain_until`` and ``created_at``
        finds what the earlier attempt wrote and finishes it: the same manifest results.

        Args:
            collection: folder of this collection under the vault's prefix.
            files: local files to upload; their base names must be unique.
            retention_days: compliance retention; the vault's default when empty.
            metadata: recorded in the manifest.
            retain_until: the lock date of every object (tz-aware); now plus the retention when empty.
            created_at: the manifest's creation time (tz-aware); now when empty.

        Returns:
            The manifest: location, each object's version, sha256 and lock date, and the manifest's own sha256.
        """
        days = self.validate_settings(retention_days)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,300}$", collection) or ".." in collection:
            raise InvalidInput(f"evidence collection name {collection!r} is not a plain path")
        names = [os.path.basename(f) for f in files]
        if len(set(names)) != len(names) or MANIFEST in names:
            raise InvalidInput(f"evidence file names must be unique and not {MANIFEST!r}: {names}")
        for name, moment in (("retain_until", retain_until), ("created_at", created_at)):
            if moment is not None and moment.tzinfo is None:
                raise InvalidInput(f"{name} {moment.isoformat()} has no time zone")
        now = datetime.now(timezone.utc)
        until = (retain_until or now + timedelta(days=days)).astimezone(timezone.utc).replace(microsecond=0)
        if until <= now:
            raise InvalidInput(f"evidence retain_until {until.isoformat()} is not in the future")
        self.ensure_bucket()
        base = f"{self.prefix.strip('/')}/{collection.strip('/')}".strip("/")
        objects = [self._put_once(f"{base}/{name}", None, path, sha256_file(path), until)
                   for name, path in zip(names, files, strict=True)]
        document = {
            "collection": collection,
            "bucket": self.bucket,
            "created_at": (created_at or now).astimezone(timezone.utc).isoformat(),
            "retention": {"mode": "COMPLIANCE", "retain_until": until.isoformat()},
            "objects": [asdict(o) for o in objects],
            "metadata": metadata or {},
        }
        body = json.dumps(document, indent=2, sort_keys=True, default=str).encode()
        digest = hashlib.sha256(body).hexdigest()
        manifest_obj = self._put_once(f"{base}/{MANIFEST}", body, None, digest, until)
        return EvidenceManifest(self.bucket, base, manifest_obj.key, manifest_obj.version_id, manifest_obj.sha256,
                                manifest_obj.retain_until or until.isoformat(), "COMPLIANCE", objects)

    def read_manifest(self, manifest: EvidenceManifest) -> dict:
        """The stored manifest document (the exact version written)."""
        return json.loads(self._read(manifest.manifest_key, manifest.manifest_version_id))

    def _sha256_of(self, key: str, version_id: str) -> str:
        """The sha256 of one stored object version, read in chunks (never whole into memory)."""
        extra = {"VersionId": version_id} if version_id else {}
        digest = hashlib.sha256()
        try:
            body = self._s3().get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
            for chunk in body.iter_chunks(CHUNK):
                digest.update(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"reading s3://{self.bucket}/{key}") from exc
        return digest.hexdigest()

    def _read(self, key: str, version_id: str) -> bytes:
        extra = {"VersionId": version_id} if version_id else {}
        try:
            return self._s3().get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"reading s3://{self.bucket}/{key}") from exc

    def verify(self, manifest: EvidenceManifest) -> list[CheckResult]:
        """Read every object back: its sha256 matches, it is locked in compliance mode until its recorded date."""
        results = []
        now = datetime.now(timezone.utc)
        entries = [(o.key, o.version_id, o.sha256, o.retain_until or manifest.retain_until) for o in manifest.objects]
        entries.append((manifest.manifest_key, manifest.manifest_version_id, manifest.manifest_sha256,
                        manifest.retain_until))
        for key, version_id, expected, recorded in entries:
            actual = self._sha256_of(key, version_id)
            head = self._head(key, version_id) or {}
            wanted_until = datetime.fromisoformat(recorded)
            mode, until = head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")
            locked = (mode == "COMPLIANCE" and until is not None and until > now
                      and until >= wanted_until - timedelta(seconds=1))
            passed = actual == expected and locked
            results.append(CheckResult(
                f"evidence intact: {key.rsplit('/', 1)[-1]}", passed,
                f"s3://{self.bucket}/{key} version {version_id}: sha256 {actual[:16]}... "
                f"{'matches' if actual == expected else 'DIFFERS from ' + expected[:16] + '...'}; "
                f"lock {mode or 'none'} until {until.isoformat() if until else '-'} (recorded {recorded})",
            ))
        return results
