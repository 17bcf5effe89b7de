"""A versioned S3-compatible bucket with an optional replica, and the verbs object-storage recoveries need.

Both clients are supported against the same API: boto3 (through prefect-aws credentials) and the
MinIO SDK. ``ObjectStore.client`` selects one; the verbs and their results are the same.

Point-in-time restore semantics (``plan_restore`` / ``apply_restore``), for every key under a prefix:

- the key's state at time T is its newest version or delete marker recorded at or before T;
- a key whose current object differs from that state (by size and etag) is restored by copying the
  version of T onto itself, which makes it the newest version (``restore``, or ``undelete`` when the key
  is currently deleted);
- a key that did not exist at T, or was deleted at T, but exists now is hidden behind a new delete
  marker (``hide``).

Nothing is destroyed: no version and no delete marker is ever removed, so a restore can itself be
undone by restoring to a time before it. S3 records times in whole seconds; a version recorded in the
same second as T counts as at or before T.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Literal, Protocol
from urllib.parse import urlparse

from boto3.exceptions import Boto3Error
from prefect.blocks.abstract import CredentialsBlock
from prefect.blocks.core import Block
from prefect.utilities.pydantic import lookup_type
from prefect_aws import AwsCredentials, MinIOCredentials
from prefect_aws.s3 import S3Bucket
from pydantic import Field, PrivateAttr, field_validator

from blocks._aws import answer_is_transient, client, error_code, translate
from blocks.errors import InvalidInput, RecoveryError

ClientKind = Literal["boto3", "minio"]
CONTENT_ETAG = "dr-content-etag"  # user metadata on restored copies: the ETag of the content they copy
COPY_HEADERS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")
MIB = 1024 * 1024


class ObjectStoreError(RecoveryError):
    """The object store refused or failed an operation."""


class ObjectStoreUnavailable(ObjectStoreError):
    """The object store could not be reached or answered with a server error; may succeed on a retry."""

    transient = True


@dataclass(frozen=True)
class ObjectVersion:
    """One entry of a key's history: an object version or a delete marker."""

    key: str
    version_id: str
    last_modified: datetime
    is_latest: bool
    is_delete_marker: bool
    size: int | None = None
    etag: str | None = None

    def same_content(self, other: "ObjectVersion | None") -> bool:
        return (other is not None and not self.is_delete_marker and not other.is_delete_marker
                and self.size == other.size and self.etag == other.etag)

    def etags_comparable(self, other: "ObjectVersion") -> bool:
        """Whether equal content implies equal ETags: not when either was written in parts ("<md5>-<parts>")."""
        return not (_multipart(self.etag) or _multipart(other.etag))


@dataclass(frozen=True)
class StaleObject:
    """A key present in both buckets whose replica differs from the primary."""

    key: str
    primary_size: int
    primary_etag: str
    replica_size: int
    replica_etag: str
    primary_last_modified: datetime


@dataclass(frozen=True)
class ReplicaComparison:
    """The replica against the primary under one prefix."""

    primary_bucket: str
    replica_bucket: str
    prefix: str
    checked: int
    missing: list[str] = field(default_factory=list)
    stale: list[StaleObject] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    oldest_unreplicated: datetime | None = None

    @property
    def complete(self) -> bool:
        return not self.missing and not self.stale

    def summary(self) -> str:
        return (f"{self.checked} objects under {self.prefix!r} in {self.primary_bucket}: "
                f"{len(self.missing)} missing and {len(self.stale)} stale in {self.replica_bucket}, "
                f"{len(self.extra)} only in the replica")


@dataclass(frozen=True)
class RestoreChange:
    """One change of a point-in-time restore: a key from its current state to its state at T."""

    key: str
    action: Literal["restore", "undelete", "hide"]
    current_version_id: str
    current_is_delete_marker: bool
    target_version_id: str | None
    target_last_modified: datetime | None
    current_etag: str | None = None
    target_etag: str | None = None

    def describe(self) -> str:
        current = ("deleted (delete marker " + self.current_version_id + ")" if self.current_is_delete_marker
                   else f"version {self.current_version_id} (etag {self.current_etag})")
        if self.action == "hide":
            new = "hidden behind a new delete marker (absent at T; its versions are kept)"
        else:
            new = (f"copy of version {self.target_version_id} of "
                   f"{self.target_last_modified.isoformat() if self.target_last_modified else '?'} "
                   f"(etag {self.target_etag})")
        return f"{self.action} {self.key}: {current} -> {new}"


@dataclass(frozen=True)
class RestorePlan:
    """Every change that brings a prefix back to its state at ``as_of``."""

    bucket: str
    prefix: str
    as_of: datetime
    keys_examined: int
    history_starts: datetime
    changes: list[RestoreChange] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {"restore": 0, "undelete": 0, "hide": 0}
        for change in self.changes:
            counts[change.action] += 1
        return counts


@dataclass(frozen=True)
class RestoreResult:
    """What applying a restore plan did."""

    applied: int
    failed: list[tuple[str, str]]
    peak_in_flight: int
    max_workers: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReadCheck:
    """Whether sampled keys could be read back in full with their expected etag."""

    bucket: str
    checked: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.checked > 0 and not self.unreadable


class _Backend(Protocol):
    def bucket_exists(self, bucket: str) -> bool: ...
    def versioning_status(self, bucket: str) -> str: ...
    def list_versions(self, bucket: str, prefix: str) -> list[ObjectVersion]: ...
    def list_current(self, bucket: str, prefix: str) -> dict[str, ObjectVersion]: ...
    def copy_version(self, bucket: str, key: str, version_id: str, threshold: int) -> None: ...
    def content_etag(self, bucket: str, key: str, version_id: str) -> str | None: ...
    def hide(self, bucket: str, key: str) -> None: ...
    def read(self, bucket: str, key: str) -> tuple[int, str | None, str | None]: ...


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else value


def _multipart(etag: str | None) -> bool:
    return bool(etag) and "-" in etag


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)


class _Boto3Backend:
    def __init__(self, client):
        self.s3 = client

    def _call(self, what: str, fn: Callable, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:  # Boto3Error: a managed transfer that failed part-way
            raise translate(exc, what, error=ObjectStoreError, unavailable=ObjectStoreUnavailable) from exc

    def bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=bucket)
            return True
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            return self._call(f"head bucket {bucket}", self.s3.head_bucket, Bucket=bucket) is not None

    def versioning_status(self, bucket: str) -> str:
        answer = self._call(f"versioning of {bucket}", self.s3.get_bucket_versioning, Bucket=bucket)
        return answer.get("Status") or "Disabled"

    def list_versions(self, bucket: str, prefix: str) -> list[ObjectVersion]:
        out: list[ObjectVersion] = []
        pages = self.s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
        for page in self._call(f"list versions of {bucket}/{prefix}", lambda: list(pages)):
            for v in page.get("Versions", []):
                out.append(ObjectVersion(v["Key"], v["VersionId"], _utc(v["LastModified"]), bool(v["IsLatest"]),
                                         False, int(v["Size"]), _etag(v.get("ETag"))))
            for m in page.get("DeleteMarkers", []):
                out.append(ObjectVersion(m["Key"], m["VersionId"], _utc(m["LastModified"]), bool(m["IsLatest"]), True))
        return out

    def list_current(self, bucket: str, prefix: str) -> dict[str, ObjectVersion]:
        out: dict[str, ObjectVersion] = {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in self._call(f"list {bucket}/{prefix}", lambda: list(pages)):
            for o in page.get("Contents", []):
                out[o["Key"]] = ObjectVersion(o["Key"], "", _utc(o["LastModified"]), True, False,
                                              int(o["Size"]), _etag(o.get("ETag")))
        return out

    def copy_version(self, bucket: str, key: str, version_id: str, threshold: int) -> None:
        from boto3.s3.transfer import TransferConfig

        what = f"copy {bucket}/{key} version {version_id}"
        source = {"Bucket": bucket, "Key": key, "VersionId": version_id}
        head = self._call(what, self.s3.head_object, Bucket=bucket, Key=key, VersionId=version_id)
        metadata = {**(head.get("Metadata") or {})}
        metadata[CONTENT_ETAG] = metadata.get(CONTENT_ETAG) or _etag(head.get("ETag")) or ""
        extra = {name: head[name] for name in COPY_HEADERS if head.get(name)}
        if int(head.get("ContentLength") or 0) <= threshold:
            self._call(what, self.s3.copy_object, Bucket=bucket, Key=key, CopySource=source, Metadata=metadata,
                       MetadataDirective="REPLACE", **extra)
        else:  # CopyObject stops at 5 GiB: copy in parts (UploadPartCopy), each part read from that version
            config = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold, max_concurrency=4)
            self._call(what, self.s3.copy, CopySource=source, Bucket=bucket, Key=key,
                       ExtraArgs={"Metadata": metadata, "MetadataDirective": "REPLACE", **extra}, Config=config)

    def content_etag(self, bucket: str, key: str, version_id: str) -> str | None:
        head = self._call(f"read {bucket}/{key} version {version_id}", self.s3.head_object, Bucket=bucket, Key=key,
                          VersionId=version_id)
        return (head.get("Metadata") or {}).get(CONTENT_ETAG) or _etag(head.get("ETag"))

    def hide(self, bucket: str, key: str) -> None:
        self._call(f"delete marker on {bucket}/{key}", self.s3.delete_object, Bucket=bucket, Key=key)

    def read(self, bucket: str, key: str) -> tuple[int, str | None, str | None]:
        from botocore.exceptions import BotoCoreError

        answer = self._call(f"read {bucket}/{key}", self.s3.get_object, Bucket=bucket, Key=key)
        size, body = 0, answer["Body"]
        try:
            for chunk in body.iter_chunks(8 * MIB):
                size += len(chunk)
        except BotoCoreError as exc:
            raise translate(exc, f"read {bucket}/{key}", error=ObjectStoreError, unavailable=ObjectStoreUnavailable) from exc
        finally:
            body.close()
        etag = _etag(answer.get("ETag"))
        return size, etag, (answer.get("Metadata") or {}).get(CONTENT_ETAG) or etag


class _MinioBackend:
    def __init__(self, client):
        self.mc = client

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        from minio.error import MinioException, S3Error, ServerError
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as exc:  # the same rule as every AWS call: throttling and server errors are transient
            status = getattr(exc.response, "status", 0)
            error = ObjectStoreUnavailable if answer_is_transient(exc.code, status) else ObjectStoreError
            raise error(f"{what}: {exc.code} (HTTP {status}) {exc.message}") from exc
        except (ServerError, HTTPError) as exc:
            raise ObjectStoreUnavailable(f"{what}: {exc}") from exc
        except MinioException as exc:
            raise ObjectStoreError(f"{what}: {exc}") from exc

    def bucket_exists(self, bucket: str) -> bool:
        return bool(self._call(f"head bucket {bucket}", self.mc.bucket_exists, bucket))

    def versioning_status(self, bucket: str) -> str:
        return self._call(f"versioning of {bucket}", self.mc.get_bucket_versioning, bucket).status or "Disabled"

    def list_versions(self, bucket: str, prefix: str) -> list[ObjectVersion]:
        entries = self._call(f"list versions of {bucket}/{prefix}", lambda: list(
            self.mc.list_objects(bucket, prefix=prefix, recursive=True, include_version=True)))
        out = []
        for o in entries:
            latest = str(o.is_latest).lower() == "true"  # the SDK returns the XML text, e.g. "true"
            out.append(ObjectVersion(o.object_name, o.version_id or "null", _utc(o.last_modified), latest,
                                     bool(o.is_delete_marker), None if o.is_delete_marker else int(o.size or 0),
                                     None if o.is_delete_marker else _etag(o.etag)))
        return out

    def list_current(self, bucket: str, prefix: str) -> dict[str, ObjectVersion]:
        entries = self._call(f"list {bucket}/{prefix}", lambda: list(
            self.mc.list_objects(bucket, prefix=prefix, recursive=True)))
        return {o.object_name: ObjectVersion(o.object_name, "", _utc(o.last_modified), True, False,
                                             int(o.size or 0), _etag(o.etag)) for o in entries}

    def _stat(self, bucket: str, key: str, version_id: str):
        return self._call(f"read {bucket}/{key} version {version_id}", self.mc.stat_object, bucket, key,
                          version_id=version_id)

    @staticmethod
    def _user_metadata(stat) -> dict[str, str]:
        prefix = "x-amz-meta-"
        return {k.lower()[len(prefix):]: v for k, v in (stat.metadata or {}).items() if k.lower().startswith(prefix)}

    def copy_version(self, bucket: str, key: str, version_id: str, threshold: int) -> None:
        from minio.commonconfig import REPLACE, ComposeSource, CopySource

        what = f"copy {bucket}/{key} version {version_id}"
        stat = self._stat(bucket, key, version_id)
        metadata = self._user_metadata(stat)
        metadata[CONTENT_ETAG] = metadata.get(CONTENT_ETAG) or _etag(stat.etag) or ""
        if stat.content_type:
            metadata["Content-Type"] = stat.content_type
        if int(stat.size or 0) <= threshold:
            self._call(what, self.mc.copy_object, bucket, key, CopySource(bucket, key, version_id=version_id),
                       metadata=metadata, metadata_directive=REPLACE)
        else:  # CopyObject stops at 5 GiB: compose copies the version in parts (UploadPartCopy)
            self._call(what, self.mc.compose_object, bucket, key, [ComposeSource(bucket, key, version_id=version_id)],
                       metadata=metadata)

    def content_etag(self, bucket: str, key: str, version_id: str) -> str | None:
        stat = self._stat(bucket, key, version_id)
        return self._user_metadata(stat).get(CONTENT_ETAG) or _etag(stat.etag)

    def hide(self, bucket: str, key: str) -> None:
        self._call(f"delete marker on {bucket}/{key}", self.mc.remove_object, bucket, key)

    def read(self, bucket: str, key: str) -> tuple[int, str | None, str | None]:
        def fetch():
            response = self.mc.get_object(bucket, key)
            try:
                size = sum(len(chunk) for chunk in response.stream(8 * MIB))
                etag = _etag(response.headers.get("ETag"))
                return size, etag, response.headers.get(f"x-amz-meta-{CONTENT_ETAG}") or etag
            finally:
                response.close()
                response.release_conn()

        return self._call(f"read {bucket}/{key}", fetch)


def _endpoint(bucket: S3Bucket) -> str | None:
    return bucket.credentials.aws_client_parameters.endpoint_url


def _keys(credentials: AwsCredentials | MinIOCredentials) -> tuple[str | None, str | None]:
    if isinstance(credentials, MinIOCredentials):
        return credentials.minio_root_user, credentials.minio_root_password.get_secret_value()
    secret = credentials.aws_secret_access_key
    return credentials.aws_access_key_id, secret.get_secret_value() if secret else None


def state_at(history: list[ObjectVersion], as_of: datetime) -> ObjectVersion | None:
    """The newest entry of one key's history recorded at or before ``as_of`` (None: the key did not exist)."""
    cutoff = as_of.astimezone(timezone.utc).replace(microsecond=0)
    for entry in history:
        if entry.last_modified <= cutoff:
            return entry
    return None


def _histories(versions: Iterable[ObjectVersion]) -> dict[str, list[ObjectVersion]]:
    """Per key, newest first; within one second the latest entry comes first, then the listing's order."""
    per_key: dict[str, list[tuple[int, ObjectVersion]]] = defaultdict(list)
    for index, v in enumerate(versions):
        per_key[v.key].append((index, v))
    return {key: [v for _, v in sorted(entries, key=lambda e: (-e[1].last_modified.timestamp(),
                                                                   not e[1].is_latest, e[0]))]
            for key, entries in per_key.items()}


class ObjectStore(Block):
    """A versioned bucket, its replica, and the verbs to check, fail over to and restore them.

    Example:
        ```python
        from datetime import datetime, timezone
        from blocks.object_store import ObjectStore

        store = ObjectStore.load("leads")
        store.compare_replica("uploads/").missing            # keys the replica lacks
        plan = store.plan_restore("uploads/", datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc))
        print([c.describe() for c in plan.changes])
        store.apply_restore(plan)
        ```
    """

    _block_type_name = "Object Store"
    _block_type_slug = "object-store"
    _description = "A versioned S3-compatible bucket (AWS S3 or MinIO), its replica, and recovery verbs."

    bucket_name: str = Field(description="Name of the primary bucket.")
    credentials: AwsCredentials | MinIOCredentials = Field(
        default_factory=AwsCredentials,
        description="Credentials and endpoint of the primary bucket (prefect-aws AwsCredentials or MinIOCredentials).",
    )
    secondary_bucket_name: str | None = Field(
        default=None, description="Name of the replica bucket applications fail over to."
    )
    secondary_credentials: AwsCredentials | MinIOCredentials | None = Field(
        default=None, description="Credentials and endpoint of the replica; the primary's when empty."
    )
    secondary_endpoint: str | None = Field(
        default=None,
        description="Endpoint applications use to reach the replica; defaults to the replica's API endpoint.",
    )
    client: ClientKind = Field(default="boto3", description="Client library: 'boto3' or 'minio' (the MinIO SDK).")
    max_workers: int = Field(default=16, ge=1, le=256, description="Most object operations in flight at once.")
    timeout_seconds: float = Field(default=30, gt=0, le=600, description="Connect and read timeout of each request.")
    environment: Literal["production", "staging", "sandbox"] = Field(
        default="production", description="What this store holds; drills with auto approval refuse production."
    )
    multipart_copy_threshold_bytes: int = Field(
        default=256 * MIB, ge=5 * MIB, le=5 * 1024 * MIB,
        description="Objects larger than this are restored by a multipart copy (also the part size); "
                    "a single CopyObject is limited to 5 GiB.",
    )

    _clients: dict = PrivateAttr(default_factory=dict)

    @field_validator("credentials", "secondary_credentials", mode="before")
    @classmethod
    def _credentials_type(cls, value):
        # A union of block types saved as a nested document comes back as a dict: pick its type by slug.
        if isinstance(value, dict):
            data = dict(value)
            slug = data.pop("block_type_slug", None)
            kinds = (lookup_type(CredentialsBlock, dispatch_key=slug),) if slug else (AwsCredentials, MinIOCredentials)
            for kind in kinds:
                try:
                    return kind(**data)
                except ValueError:
                    continue
            raise ValueError("credentials match neither AwsCredentials nor MinIOCredentials")
        return value

    @property
    def bucket(self) -> S3Bucket:
        """The primary bucket as a prefect-aws S3Bucket (its file verbs: download, upload, list)."""
        return S3Bucket(bucket_name=self.bucket_name, credentials=self.credentials)

    @property
    def secondary(self) -> S3Bucket | None:
        """The replica bucket as a prefect-aws S3Bucket, when one is configured."""
        if not self.secondary_bucket_name:
            return None
        return S3Bucket(bucket_name=self.secondary_bucket_name, credentials=self.secondary_credentials or self.credentials)

    def _backend(self, bucket: S3Bucket) -> _Backend:
        key = (bucket.bucket_name, _endpoint(bucket), self.client)
        if key not in self._clients:
            self._clients[key] = self._build_minio(bucket) if self.client == "minio" else self._build_boto3(bucket)
        return self._clients[key]

    def _build_boto3(self, bucket: S3Bucket) -> _Boto3Backend:
        return _Boto3Backend(client(bucket.credentials, "s3", max_pool_connections=self.max_workers + 2,
                                    connect_timeout=self.timeout_seconds, read_timeout=self.timeout_seconds))

    def _build_minio(self, bucket: S3Bucket) -> _MinioBackend:
        import urllib3
        from minio import Minio

        endpoint = _endpoint(bucket)
        if not endpoint:
            raise InvalidInput(f"bucket {bucket.bucket_name!r}: the minio client needs an endpoint_url in the "
                               "credentials' aws_client_parameters")
        url = urlparse(endpoint)
        access, secret = _keys(bucket.credentials)
        pool = urllib3.PoolManager(
            maxsize=self.max_workers + 2, timeout=urllib3.Timeout(connect=self.timeout_seconds, read=self.timeout_seconds),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        return _MinioBackend(Minio(url.netloc, access_key=access, secret_key=secret, secure=url.scheme == "https",
                                   region=bucket.credentials.region_name or "us-east-1", http_client=pool))

    def _replica(self) -> S3Bucket:
        secondary = self.secondary
        if secondary is None:
            raise InvalidInput(f"object store of bucket {self.bucket_name!r} has no secondary bucket configured")
        return secondary

    def bucket_for(self, which: Literal["primary", "secondary"]) -> S3Bucket:
        """The S3Bucket block of ``which`` side."""
        return self.bucket if which == "primary" else self._replica()

    @property
    def replica_endpoint(self) -> str | None:
        """The endpoint applications use to reach the replica."""
        return self.secondary_endpoint or (_endpoint(self.secondary) if self.secondary else None)

    def require_bucket(self, which: Literal["primary", "secondary"] = "primary", versioned: bool = False) -> None:
        """Refuse a bucket that does not exist (or, with ``versioned``, whose versioning is not enabled)."""
        bucket = self.bucket_for(which)
        backend = self._backend(bucket)
        if not backend.bucket_exists(bucket.bucket_name):
            raise InvalidInput(f"{which} bucket {bucket.bucket_name!r} does not exist at "
                               f"{_endpoint(bucket) or 'the default AWS endpoint'}")
        if versioned:
            status = backend.versioning_status(bucket.bucket_name)
            if status != "Enabled":
                raise InvalidInput(f"{which} bucket {bucket.bucket_name!r} has versioning {status!r}, expected "
                                   "'Enabled': without versions there is nothing to restore from")

    def list_versions(self, prefix: str, which: Literal["primary", "secondary"] = "primary") -> list[ObjectVersion]:
        """Every object version and delete marker under ``prefix``."""
        bucket = self.bucket_for(which)
        return self._backend(bucket).list_versions(bucket.bucket_name, prefix)

    def list_objects(self, prefix: str, which: Literal["primary", "secondary"] = "primary") -> dict[str, ObjectVersion]:
        """The current objects under ``prefix`` (key -> size, etag, last modified)."""
        bucket = self.bucket_for(which)
        return self._backend(bucket).list_current(bucket.bucket_name, prefix)

    def compare_replica(self, prefix: str = "") -> ReplicaComparison:
        """Compare the replica with the primary under ``prefix``: keys missing, stale (size or etag differ), extra."""
        replica = self._replica()
        with ThreadPoolExecutor(max_workers=2) as pool:
            primary_future = pool.submit(self.list_objects, prefix, "primary")
            replica_future = pool.submit(self.list_objects, prefix, "secondary")
            primary, secondary = primary_future.result(), replica_future.result()
        missing = sorted(k for k in primary if k not in secondary)
        stale = [StaleObject(k, p.size, p.etag, secondary[k].size, secondary[k].etag, p.last_modified)
                 for k, p in sorted(primary.items())
                 if k in secondary and (p.size != secondary[k].size or p.etag != secondary[k].etag)]
        behind = [primary[k].last_modified for k in missing] + [s.primary_last_modified for s in stale]
        return ReplicaComparison(
            primary_bucket=self.bucket_name, replica_bucket=replica.bucket_name, prefix=prefix,
            checked=len(primary), missing=missing, stale=stale,
            extra=sorted(k for k in secondary if k not in primary),
            oldest_unreplicated=min(behind) if behind else None,
        )

    def plan_restore(self, prefix: str, as_of: datetime) -> RestorePlan:
        """Every change that returns ``prefix`` to its state at ``as_of``; refuses what cannot be restored.

        Refused before anything changes: an empty prefix, a naive time, a time in the future, a prefix
        without versions, a time before the prefix's oldest recorded version.
        """
        if not prefix or not prefix.strip():
            raise InvalidInput("restore prefix is empty; name the prefix to restore (e.g. 'uploads/'), "
                               "a whole-bucket restore is not offered")
        if as_of.tzinfo is None or as_of.utcoffset() is None:
            raise InvalidInput(f"restore time {as_of.isoformat()} has no time zone; give it with a UTC offset")
        now = datetime.now(timezone.utc)
        if as_of > now:
            raise InvalidInput(f"restore time {as_of.isoformat()} is in the future (now {now.isoformat()})")
        versions = self.list_versions(prefix)
        if not versions:
            raise InvalidInput(f"prefix {prefix!r} of bucket {self.bucket_name!r} has no objects and no "
                               "versions: nothing to restore")
        history_starts = min(v.last_modified for v in versions)
        if as_of.astimezone(timezone.utc).replace(microsecond=0) < history_starts:
            raise InvalidInput(f"restore time {as_of.isoformat()} is before the versioning history of {prefix!r} "
                               f"begins ({history_starts.isoformat()}); nothing is recorded that early")
        changes: list[RestoreChange] = []
        histories = _histories(versions)
        for key in sorted(histories):
            history = histories[key]
            current = next((v for v in history if v.is_latest), history[0])
            target = state_at(history, as_of)
            gone_at_t = target is None or target.is_delete_marker
            if gone_at_t:
                if not current.is_delete_marker:
                    changes.append(RestoreChange(key, "hide", current.version_id, False, None, None, current.etag))
                continue
            if target.same_content(current):
                continue
            if (not current.is_delete_marker and target.size == current.size
                    and not target.etags_comparable(current)
                    and self._backend(self.bucket).content_etag(self.bucket_name, key, target.version_id)
                    == self._backend(self.bucket).content_etag(self.bucket_name, key, current.version_id)):
                continue  # a copy of the version of T, written in a different number of parts
            changes.append(RestoreChange(
                key, "undelete" if current.is_delete_marker else "restore", current.version_id,
                current.is_delete_marker, target.version_id, target.last_modified, current.etag, target.etag,
            ))
        return RestorePlan(bucket=self.bucket_name, prefix=prefix, as_of=as_of,
                           keys_examined=len(histories), history_starts=history_starts, changes=changes)

    def apply_restore(self, plan: RestorePlan, max_workers: int | None = None) -> RestoreResult:
        """Apply ``plan`` with at most ``max_workers`` (default: the block's) operations in flight.

        Each change creates a new version or delete marker; nothing is deleted. Re-planning after a
        complete apply yields no change, so a repeated restore does nothing twice.
        """
        if plan.bucket != self.bucket_name:
            raise InvalidInput(f"plan is for bucket {plan.bucket!r}, this store's bucket is {self.bucket_name!r}")
        workers = max_workers or self.max_workers
        if workers < 1:
            raise InvalidInput(f"max_workers {workers} must be at least 1")
        backend = self._backend(self.bucket)
        lock = threading.Lock()
        in_flight = peak = 0

        def one(change: RestoreChange) -> None:
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            try:
                if change.action == "hide":
                    backend.hide(plan.bucket, change.key)
                else:
                    backend.copy_version(plan.bucket, change.key, change.target_version_id,
                                         self.multipart_copy_threshold_bytes)
            finally:
                with lock:
                    in_flight -= 1

        started = time.monotonic()
        failed: list[tuple[str, str]] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore") as pool:
            futures = {pool.submit(one, change): change.key for change in plan.changes}
            for future in as_completed(futures):
                exc = future.exception()
                if exc is not None:
                    failed.append((futures[future], str(exc)))
        return RestoreResult(applied=len(plan.changes) - len(failed), failed=sorted(failed), peak_in_flight=peak,
                             max_workers=workers, seconds=round(time.monotonic() - started, 3))

    def verify_readable(self, keys: list[str], which: Literal["primary", "secondary"] = "primary",
                        expected: dict[str, tuple[int | None, str | None]] | None = None) -> ReadCheck:
        """Read ``keys`` in full from ``which`` bucket; with ``expected`` (key -> size, etag) compare them too.

        An expected etag matches the object's own ETag or, for a restored copy, the ETag of the content
        it copies (recorded in its metadata): a multipart ETag changes when the content is copied.
        """
        bucket = self.bucket_for(which)
        backend = self._backend(bucket)
        expected = expected or {}

        def one(key: str) -> str | None:
            try:
                size, etag, content = backend.read(bucket.bucket_name, key)
            except ObjectStoreError as exc:
                return str(exc)
            want_size, want_etag = expected.get(key, (None, None))
            if want_size is not None and size != want_size:
                return f"{size} bytes, expected {want_size}"
            if want_etag is not None and want_etag not in (etag, content):
                return f"etag {etag}, expected {want_etag}"
            return None

        with ThreadPoolExecutor(max_workers=min(self.max_workers, max(len(keys), 1))) as pool:
            results = list(pool.map(one, keys))
        unreadable = [(k, r) for k, r in zip(keys, results, strict=True) if r is not None]
        return ReadCheck(bucket=bucket.bucket_name, checked=len(keys), unreadable=unreadable)
