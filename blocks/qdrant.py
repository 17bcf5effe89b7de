"""A Qdrant vector database, server or embedded, and the verbs its recoveries need.

Applications query a collection through an alias; a recovery builds a new collection beside
the broken one (from a server snapshot, from a portable export, or by re-indexing the
PostgreSQL source of truth), verifies it against its source and then moves the alias in one
atomic alias operation. The old collection is kept until someone deletes it.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Iterable, Iterator, Literal

import numpy as np
from prefect.blocks.core import Block
from prefect_aws.s3 import S3Bucket
from pydantic import BaseModel, Field, SecretStr, model_validator

from blocks._aws import client, error_code, translate
from blocks.errors import InvalidInput, RecoveryError

EXPORT_FORMAT = "dr-qdrant-export/1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
DISTANCES = ("Cosine", "Dot", "Euclid")
INCIDENT_MARK = "dr.recovery.incident"  # collection metadata: the incident whose recovery built the collection


class QdrantError(RecoveryError):
    """Qdrant refused or failed an operation."""


class QdrantUnavailable(QdrantError):
    """Qdrant could not be reached (server down, embedded storage held by another process)."""

    transient = True


def _without_query(text: str) -> str:
    """``text`` with the query string of every URL in it removed (presigned signatures, tokens)."""
    return re.sub(r"(https?://[^\s?'\"]*)\?[^\s'\"]*", r"\1?<redacted>", text or "")


def check_name(kind: str, value: str) -> str:
    """Refuse a collection or alias name Qdrant or a URL path would not accept."""
    if not isinstance(value, str) or not NAME.match(value):
        raise InvalidInput(f"{kind} name {value!r} is not a plain name (letters, digits, '.', '_', '-')")
    return value


@dataclass(frozen=True)
class CollectionInfo:
    """What a collection holds: its exact point count and vector configuration."""

    name: str
    points: int
    vector_size: int
    distance: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """A server snapshot of one collection."""

    collection: str
    name: str
    size: int | None
    created_at: str | None
    checksum: str | None


@dataclass(frozen=True)
class ExportSummary:
    """A portable export: how many points, of what shape, and the sha256 of the exported bytes."""

    collection: str
    points: int
    vector_size: int
    distance: str
    sha256: str
    bytes: int
    exported_at: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StoredBackup:
    """An export or snapshot in the backup bucket, with the facts recorded beside it."""

    key: str
    kind: str
    collection: str
    size: int
    stored_at: str
    sha256: str | None
    points: int | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RecallResult:
    """How many of the source's exact top-k neighbours a collection returned, over sampled queries."""

    collection: str
    k: int
    queries: int
    recall: float
    worst: float
    misses: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class ExactNeighbours:
    """Exact top-k neighbours of a few query vectors over a stream of (ids, vectors) batches.

    Memory stays at ``queries x k`` whatever the size of the source, so a source of millions of
    vectors can be scanned once, batch by batch (a PostgreSQL cursor, an export, a scroll).
    """

    def __init__(self, queries: np.ndarray, k: int, distance: str):
        if distance not in DISTANCES:
            raise InvalidInput(f"distance {distance!r} is not one of {', '.join(DISTANCES)}")
        self.k = k
        self.distance = distance
        self.queries = self._prepare(np.asarray(queries, dtype=np.float32))
        self._heaps: list[list[tuple[float, Any]]] = [[] for _ in range(len(self.queries))]

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        if self.distance == "Cosine":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            return vectors / np.where(norms == 0, 1, norms)
        return vectors

    def feed(self, ids: list, vectors: np.ndarray) -> None:
        """Account for one batch of source points."""
        if not len(ids):
            return
        batch = self._prepare(np.asarray(vectors, dtype=np.float32))
        if self.distance == "Euclid":
            scores = -(
                (self.queries ** 2).sum(1)[:, None] - 2 * self.queries @ batch.T + (batch ** 2).sum(1)[None, :]
            )
        else:
            scores = self.queries @ batch.T
        take = min(self.k, len(ids))
        best = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        for q, heap in enumerate(self._heaps):
            for j in best[q]:
                item = (float(scores[q, j]), ids[j])
                if len(heap) < self.k:
                    heapq.heappush(heap, item)
                elif item[0] > heap[0][0]:
                    heapq.heapreplace(heap, item)

    def neighbours(self) -> list[list]:
        """For each query, the ids of its exact top-k, best first."""
        return [[i for _, i in sorted(heap, key=lambda t: -t[0])] for heap in self._heaps]


def _normal_id(value: Any) -> Any:
    """Qdrant ids are unsigned integers or UUIDs; compare them in one form."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    return str(value)


class QdrantCluster(Block):
    """A Qdrant server (``url`` + ``api_key``) or an embedded Qdrant storage directory (``path``).

    Embedded storage admits one client per directory: every verb opens a client and closes it
    before returning, so no client stays open between the steps of a flow.

    Example:
        ```python
        from blocks.qdrant import QdrantCluster
        qdrant = QdrantCluster.load("sandbox")
        qdrant.collection_info("leads").points
        qdrant.switch_alias("leads", "leads-20240101T000000Z")
        ```
    """

    _block_type_name = "Qdrant Cluster"
    _block_type_slug = "qdrant-cluster"
    _logo_url = "https://qdrant.tech/img/qdrant-logo.svg"
    _description = "A Qdrant vector database: a server (URL and API key) or an embedded storage directory."

    url: str | None = Field(default=None, description="Server URL, e.g. https://qdrant.example.com:6333.")
    api_key: SecretStr | None = Field(default=None, description="API key of the server, if it requires one.")
    path: str | None = Field(default=None, description="Storage directory of an embedded Qdrant (instead of url).")
    timeout_seconds: int = Field(default=30, ge=1, description="Timeout of every request to the server.")
    snapshot_timeout_seconds: int = Field(
        default=1800, ge=1, description="Upper bound for creating or recovering one snapshot."
    )
    environment: Literal["production", "staging", "sandbox"] = Field(
        default="production", description="Drills may approve themselves ('auto' policy) only outside production."
    )
    backup_bucket: S3Bucket | None = Field(
        default=None, description="Bucket holding exports and snapshots of this Qdrant, with its credentials."
    )
    backup_prefix: str = Field(default="qdrant", description="Key prefix of the backups in that bucket.")

    @model_validator(mode="after")
    def _one_location(self) -> "QdrantCluster":
        if bool(self.url) == bool(self.path):
            raise ValueError("set exactly one of url (a Qdrant server) or path (embedded Qdrant)")
        return self

    # ------------------------------------------------------------------ plumbing

    @property
    def embedded(self) -> bool:
        return bool(self.path)

    @property
    def location(self) -> str:
        """Where this Qdrant is, for messages and evidence (never the API key)."""
        return self.url if self.url else f"embedded:{self.path}"

    @contextmanager
    def client(self, timeout_seconds: int | None = None) -> Iterator[Any]:
        """A client for the duration of the block; closed on exit so embedded storage is free again."""
        from qdrant_client import QdrantClient

        try:
            if self.embedded:
                client = QdrantClient(path=self.path)
            else:
                key = self.api_key.get_secret_value() if self.api_key else None
                client = QdrantClient(url=self.url, api_key=key, timeout=timeout_seconds or self.timeout_seconds,
                                      check_compatibility=False)
        except RuntimeError as exc:  # embedded storage locked by another client
            raise QdrantUnavailable(f"cannot open Qdrant at {self.location}: {exc}") from exc
        try:
            yield client
        finally:
            client.close()

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one client call, turning client errors into project errors that name ``what``."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            return fn(*args, **kwargs)
        except (ResponseHandlingException, ConnectionError, TimeoutError) as exc:
            raise QdrantUnavailable(f"{what} at {self.location}: Qdrant unreachable ({exc})") from exc
        except UnexpectedResponse as exc:
            error = QdrantUnavailable if exc.status_code in (502, 503, 504) else QdrantError
            raise error(f"{what} at {self.location}: HTTP {exc.status_code}: {exc.content[:300]!r}") from exc
        except (ValueError, KeyError) as exc:
            raise QdrantError(f"{what} at {self.location}: {exc}") from exc

    # ------------------------------------------------------------------ collections and aliases

    def aliases(self) -> dict[str, str]:
        """Every alias and the collection it points to."""
        with self.client() as client:
            found = self._call("list aliases", client.get_aliases)
        return {a.alias_name: a.collection_name for a in found.aliases}

    def collections(self) -> list[str]:
        """Names of every collection (aliases not included)."""
        with self.client() as client:
            found = self._call("list collections", client.get_collections)
        return sorted(c.name for c in found.collections)

    def resolve(self, name: str) -> str | None:
        """The collection ``name`` designates: itself when it is a collection, its target when an alias."""
        with self.client() as client:
            return self._resolve(client, name)

    def _resolve(self, client, name: str) -> str | None:
        aliases = {a.alias_name: a.collection_name for a in self._call("list aliases", client.get_aliases).aliases}
        if name in aliases:
            return aliases[name]
        names = {c.name for c in self._call("list collections", client.get_collections).collections}
        return name if name in names else None

    def collection_info(self, name: str) -> CollectionInfo:
        """Exact point count and vector configuration of a collection (or of the one an alias points to,
        whose name is returned).

        Raises:
            InvalidInput: no collection or alias is called ``name``.
        """
        check_name("collection", name)
        with self.client() as client:
            target = self._resolve(client, name)
            if target is None:
                raise InvalidInput(f"collection {name!r} not found in Qdrant at {self.location}")
            info = self._call(f"read collection {target}", client.get_collection, target)
            points = self._call(f"count {target}", client.count, target, exact=True).count
        vectors = info.config.params.vectors
        if not hasattr(vectors, "size"):
            raise QdrantError(f"collection {target!r} uses named vectors; only a single unnamed vector is supported")
        distance = vectors.distance.value if hasattr(vectors.distance, "value") else str(vectors.distance)
        return CollectionInfo(name=target, points=int(points), vector_size=int(vectors.size), distance=distance)

    def count(self, name: str) -> int:
        """Exact number of points in a collection or behind an alias."""
        return self.collection_info(name).points

    def _incident_of(self, client, name: str) -> str | None:
        info = self._call(f"read collection {name}", client.get_collection, name)
        return (getattr(info.config, "metadata", None) or {}).get(INCIDENT_MARK)

    def _check_replaceable(self, client, name: str, incident: str | None) -> bool:
        """Whether collection ``name`` exists; refuse one that may not be replaced by ``incident``."""
        if not self._call("look up collection", client.collection_exists, name):
            return False
        if name in {a.collection_name for a in self._call("list aliases", client.get_aliases).aliases}:
            raise InvalidInput(f"collection {name!r} is behind an alias at {self.location}; it is not replaced")
        marked = self._incident_of(client, name)
        if incident is not None and marked == incident:
            return True
        points = self._call(f"count {name}", client.count, name, exact=True).count
        if points == 0:
            return True
        raise InvalidInput(
            f"collection {name!r} already exists at {self.location} with {points} points and is "
            + (f"marked as rebuilt for incident {marked!r}" if marked else "not marked as a rebuild of any incident")
            + f", not {incident!r}; it is kept. Choose another incident id or remove it deliberately"
        )

    def require_replaceable(self, name: str, incident: str) -> bool:
        """Refuse when collection ``name`` exists and is neither empty nor a leftover rebuild of ``incident``.

        Returns:
            True when such a leftover (or an empty collection) exists and would be replaced, False when absent.

        Raises:
            InvalidInput: the collection holds points another run or a person put there, or an alias uses it.
        """
        check_name("collection", name)
        with self.client() as client:
            return self._check_replaceable(client, name, incident)

    def create_collection(self, name: str, vector_size: int, distance: str, replace: bool = False,
                          incident: str | None = None) -> None:
        """Create an empty collection, marked as the rebuild of ``incident`` when one is given.

        With ``replace``, an existing collection of that name is dropped first, but only when it is
        empty or marked as a rebuild of the same ``incident``; a collection behind an alias is never replaced.
        """
        check_name("collection", name)
        if distance not in DISTANCES:
            raise InvalidInput(f"distance {distance!r} is not one of {', '.join(DISTANCES)}")
        if vector_size < 1:
            raise InvalidInput(f"vector size {vector_size} must be at least 1")
        from qdrant_client import models

        with self.client() as client:
            if self._call("look up collection", client.collection_exists, name):
                if not replace:
                    raise QdrantError(f"collection {name!r} already exists at {self.location}")
                self._check_replaceable(client, name, incident)
                self._call(f"delete collection {name}", client.delete_collection, name)
            self._call(
                f"create collection {name}", client.create_collection, name,
                vectors_config=models.VectorParams(size=vector_size, distance=models.Distance(distance)),
                metadata={INCIDENT_MARK: incident} if incident else None,
            )

    def delete_collection(self, name: str) -> bool:
        """Delete a collection that no alias points to; True if it existed."""
        check_name("collection", name)
        if name in self.aliases().values():
            raise QdrantError(f"collection {name!r} is behind an alias; move the alias first")
        with self.client() as client:
            if not self._call("look up collection", client.collection_exists, name):
                return False
            self._call(f"delete collection {name}", client.delete_collection, name)
        return True

    def upsert_batches(self, name: str, batches: Iterable[tuple[list, np.ndarray, list[dict]]]) -> int:
        """Upsert (ids, vectors, payloads) batches into a collection; returns the points written."""
        from qdrant_client import models

        written = 0
        with self.client() as client:
            for ids, vectors, payloads in batches:
                if not len(ids):
                    continue
                batch = models.Batch(ids=list(ids), vectors=np.asarray(vectors, dtype=np.float32).tolist(),
                                     payloads=[p or {} for p in payloads])
                self._call(f"upsert into {name}", client.upsert, name, points=batch, wait=True)
                written += len(ids)
        return written

    def scroll_batches(self, name: str, batch_size: int = 1000) -> Iterator[tuple[list, np.ndarray, list[dict]]]:
        """Every point of a collection as (ids, vectors, payloads) batches, in id order."""
        with self.client() as client:
            offset = None
            while True:
                points, offset = self._call(
                    f"scroll {name}", client.scroll, name, limit=batch_size, offset=offset,
                    with_payload=True, with_vectors=True,
                )
                if points:
                    yield ([p.id for p in points], np.asarray([p.vector for p in points], dtype=np.float32),
                           [p.payload or {} for p in points])
                if offset is None:
                    return

    def switch_alias(self, alias: str, collection: str) -> str | None:
        """Point ``alias`` at ``collection`` in one atomic alias operation; returns the previous target.

        Idempotent: when the alias already points there nothing changes and ``collection`` is returned.
        """
        check_name("alias", alias)
        check_name("collection", collection)
        from qdrant_client import models

        previous = self.aliases().get(alias)
        if previous == collection:
            return previous
        with self.client() as client:
            if not self._call("look up collection", client.collection_exists, collection):
                raise InvalidInput(f"collection {collection!r} not found in Qdrant at {self.location}")
            if alias in {c.name for c in self._call("list collections", client.get_collections).collections}:
                raise InvalidInput(
                    f"{alias!r} is a collection, not an alias; applications must read through an alias "
                    "for a recovery to replace what they read"
                )
            operations = []
            if previous is not None:
                operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
            operations.append(models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
            self._call(f"move alias {alias} to {collection}", client.update_collection_aliases,
                       change_aliases_operations=operations)
        return previous

    # ------------------------------------------------------------------ verification

    def sample_recall(self, collection: str, queries: np.ndarray, expected: list[list], k: int = 10) -> RecallResult:
        """Query ``collection`` with sampled vectors and compare with the source's exact top-``k``.

        Args:
            collection: collection or alias to query.
            queries: the sampled query vectors, one per row.
            expected: for each query, the source's exact top-``k`` ids (see :class:`ExactNeighbours`).
            k: neighbours per query.
        """
        recalls, misses = [], []
        with self.client() as client:
            for vector, truth in zip(np.asarray(queries, dtype=np.float32), expected, strict=True):
                found = self._call(f"query {collection}", client.query_points, collection,
                                   query=vector.tolist(), limit=k, with_payload=False).points
                want = {_normal_id(i) for i in truth}
                got = {_normal_id(p.id) for p in found}
                share = len(want & got) / len(want) if want else 1.0
                recalls.append(share)
                if share < 1.0 and len(misses) < 5:
                    misses.append({"expected": sorted(want - got, key=str)[:5], "returned": sorted(got - want, key=str)[:5]})
        recall = float(np.mean(recalls)) if recalls else 0.0
        return RecallResult(collection=collection, k=k, queries=len(recalls), recall=recall,
                            worst=float(min(recalls)) if recalls else 0.0, misses=misses)

    # ------------------------------------------------------------------ portable export

    def export_collection(self, name: str, stream: IO[bytes], batch_size: int = 1000) -> ExportSummary:
        """Write every point (id, vector, payload) of a collection to ``stream``; returns its sha256.

        The format is JSON lines: a header, one line per batch (vectors as little-endian float32,
        base64) and a trailer with the point count, so an import can tell a truncated file.
        """
        info = self.collection_info(name)
        digest, size, points = hashlib.sha256(), 0, 0

        def write(obj: dict) -> None:
            nonlocal size
            line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
            digest.update(line)
            size += len(line)
            stream.write(line)

        write({"format": EXPORT_FORMAT, "collection": info.name, "vector_size": info.vector_size,
               "distance": info.distance})
        for ids, vectors, payloads in self.scroll_batches(name, batch_size):
            data = np.ascontiguousarray(vectors, dtype="<f4")
            write({"ids": [_normal_id(i) for i in ids], "payloads": payloads,
                   "vectors": base64.b64encode(data.tobytes()).decode()})
            points += len(ids)
        write({"end": True, "points": points})
        return ExportSummary(collection=info.name, points=points, vector_size=info.vector_size,
                             distance=info.distance, sha256=digest.hexdigest(), bytes=size,
                             exported_at=datetime.now(timezone.utc).isoformat())

    def import_collection(self, name: str, stream: IO[bytes], expected_sha256: str | None = None,
                          incident: str | None = None) -> int:
        """Create collection ``name`` from an export and fill it; returns the points imported.

        The stream is read twice: first to check the header, trailer and ``expected_sha256``
        (nothing is created when they do not match), then to import. ``stream`` must be seekable.
        An existing ``name`` is replaced only when it is empty or a leftover rebuild of ``incident``.
        """
        header, points = read_export_header(stream, expected_sha256)
        self.create_collection(name, header["vector_size"], header["distance"], replace=True, incident=incident)
        stream.seek(0)
        written = self.upsert_batches(name, iter_export(stream))
        if written != points:
            raise QdrantError(f"import into {name!r} wrote {written} points; the export holds {points}")
        return written

    # ------------------------------------------------------------------ backups in the bucket

    def _bucket(self) -> S3Bucket:
        if self.backup_bucket is None:
            raise InvalidInput(f"Qdrant at {self.location} has no backup_bucket configured")
        return self.backup_bucket

    def _backup_base(self, collection: str) -> str:
        parts = (self._bucket().bucket_folder, self.backup_prefix, check_name("collection", collection))
        return "/".join(p.strip("/") for p in parts if p and p.strip("/"))

    def _s3(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self._bucket().bucket_name, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, what, error=QdrantError, unavailable=QdrantUnavailable) from exc

    def backup_location(self, collection: str) -> str:
        """The s3:// prefix under which backups of ``collection`` are kept."""
        return f"s3://{self._bucket().bucket_name}/{self._backup_base(collection)}/"

    def stored_backups(self, collection: str, kind: Literal["export", "snapshot"]) -> list[StoredBackup]:
        """Exports or snapshots of ``collection`` in the backup bucket, oldest first."""
        s3 = client(self._bucket().credentials, "s3")
        suffix = ".jsonl" if kind == "export" else ".snapshot"
        prefix = self._backup_base(collection) + "/"
        found, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._s3(f"list backups under {prefix}", s3.list_objects_v2, Prefix=prefix, **extra)
            found += [o for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        backups = [self.describe_backup(o["Key"]) for o in sorted(found, key=lambda o: (o["LastModified"], o["Key"]))]
        return backups

    def describe_backup(self, key: str) -> StoredBackup:
        """The backup at ``key`` and the facts recorded beside it (``<key>.json``).

        Raises:
            InvalidInput: no object at ``key``.
        """
        from botocore.exceptions import BotoCoreError

        s3 = client(self._bucket().credentials, "s3")
        bucket = self._bucket().bucket_name
        try:
            head = self._s3(f"read s3://{bucket}/{key}", s3.head_object, Key=key)
        except QdrantError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise InvalidInput(f"no backup at s3://{bucket}/{key}") from exc
            raise
        try:
            obj = self._s3(f"read s3://{bucket}/{key}.json", s3.get_object, Key=key + ".json")
            facts = json.loads(obj["Body"].read())
        except QdrantError as exc:
            if error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                raise
            facts = {}
        except BotoCoreError as exc:
            raise translate(exc, f"read s3://{bucket}/{key}.json", error=QdrantError, unavailable=QdrantUnavailable) from exc
        except ValueError as exc:
            raise QdrantError(f"s3://{bucket}/{key}.json is not JSON: {exc}") from exc
        kind = "export" if key.endswith(".jsonl") else "snapshot"
        return StoredBackup(key=key, kind=kind, collection=facts.get("collection", ""), size=head["ContentLength"],
                            stored_at=head["LastModified"].astimezone(timezone.utc).isoformat(),
                            sha256=facts.get("sha256"), points=facts.get("points"))

    def _store(self, path: str, key: str, facts: dict) -> StoredBackup:
        s3 = client(self._bucket().credentials, "s3")
        with open(path, "rb") as fh:
            self._s3(f"upload {key}", s3.put_object, Key=key, Body=fh)
        self._s3(f"upload {key}.json", s3.put_object, Key=key + ".json",
                 Body=json.dumps(facts, indent=2).encode(), ContentType="application/json")
        return self.describe_backup(key)

    def export_to_bucket(self, collection: str, batch_size: int = 1000) -> StoredBackup:
        """Export a collection (or the one behind an alias) to the backup bucket, checksum beside it."""
        info = self.collection_info(collection)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        key = f"{self._backup_base(collection)}/{stamp}.jsonl"
        with tempfile.TemporaryDirectory(prefix="dr-qdrant-") as folder:
            path = os.path.join(folder, "export.jsonl")
            with open(path, "wb") as fh:
                summary = self.export_collection(info.name, fh, batch_size)
            return self._store(path, key, {**summary.as_dict(), "collection": collection, "format": EXPORT_FORMAT})

    def fetch_backup(self, key: str, path: str) -> StoredBackup:
        """Download a backup to ``path`` and check its sha256 against the one recorded beside it.

        Raises:
            InvalidInput: missing backup, no recorded checksum, or a checksum mismatch.
        """
        from botocore.exceptions import BotoCoreError

        backup = self.describe_backup(key)
        if not backup.sha256:
            raise InvalidInput(f"backup {key} has no recorded sha256 ({key}.json); it cannot be verified")
        s3 = client(self._bucket().credentials, "s3")
        obj = self._s3(f"download {key}", s3.get_object, Key=key)
        digest = hashlib.sha256()
        try:
            with open(path, "wb") as fh:
                for chunk in obj["Body"].iter_chunks(1024 * 1024):
                    digest.update(chunk)
                    fh.write(chunk)
        except BotoCoreError as exc:
            raise translate(exc, f"download {key}", error=QdrantError, unavailable=QdrantUnavailable) from exc
        if digest.hexdigest() != backup.sha256:
            raise InvalidInput(f"backup {key}: sha256 {digest.hexdigest()} does not match the recorded {backup.sha256}")
        return backup

    def backup_url(self, key: str, expires_seconds: int = 600) -> str:
        """A time-limited GET URL of a backup, for a Qdrant server to download it.

        The URL is a credential while it lasts: pass it only to the server, never to logs or evidence.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        if not 1 <= expires_seconds <= 3600:
            raise InvalidInput(f"expires_seconds {expires_seconds} must be between 1 and 3600")
        try:
            s3 = client(self._bucket().credentials, "s3")
            return s3.generate_presigned_url("get_object", Params={"Bucket": self._bucket().bucket_name, "Key": key},
                                             ExpiresIn=expires_seconds)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"presign s3://{self._bucket().bucket_name}/{key}", error=QdrantError,
                            unavailable=QdrantUnavailable) from exc

    def snapshot_to_bucket(self, collection: str) -> StoredBackup:
        """Take a server snapshot of ``collection`` and copy it, with its checksum, to the backup bucket."""
        import httpx

        snap = self.create_snapshot(self.resolve(collection) or collection)
        url = f"{self.url.rstrip('/')}/collections/{snap.collection}/snapshots/{snap.name}"
        headers = {"api-key": self.api_key.get_secret_value()} if self.api_key else {}
        key = f"{self._backup_base(collection)}/{snap.name}"
        key = key if key.endswith(".snapshot") else key + ".snapshot"
        digest = hashlib.sha256()
        with tempfile.TemporaryDirectory(prefix="dr-qdrant-") as folder:
            path = os.path.join(folder, "collection.snapshot")
            try:
                with httpx.stream("GET", url, headers=headers, timeout=self.snapshot_timeout_seconds) as response:
                    response.raise_for_status()
                    with open(path, "wb") as fh:
                        for chunk in response.iter_bytes():
                            digest.update(chunk)
                            fh.write(chunk)
            except httpx.HTTPError as exc:
                raise QdrantUnavailable(f"download snapshot {snap.name} from {self.location}: {exc}") from exc
            if snap.checksum and snap.checksum != digest.hexdigest():
                raise QdrantError(f"snapshot {snap.name}: downloaded sha256 differs from the server's {snap.checksum}")
            points = self.count(snap.collection)
            return self._store(path, key, {"collection": collection, "sha256": digest.hexdigest(), "points": points,
                                           "snapshot": snap.name, "created_at": snap.created_at})

    # ------------------------------------------------------------------ server snapshots

    def _server_only(self, verb: str) -> None:
        if self.embedded:
            raise QdrantError(
                f"{verb} needs a Qdrant server; {self.location} is embedded Qdrant, which has no snapshots. "
                "Use a portable export (export_collection/import_collection) or re-index from the source"
            )

    def create_snapshot(self, collection: str) -> Snapshot:
        """Take a server snapshot of ``collection``."""
        self._server_only("create_snapshot")
        check_name("collection", collection)
        with self.client(self.snapshot_timeout_seconds) as client:
            snap = self._call(f"snapshot {collection}", client.create_snapshot, collection, wait=True)
        return Snapshot(collection, snap.name, snap.size, snap.creation_time, snap.checksum)

    def list_snapshots(self, collection: str) -> list[Snapshot]:
        """Snapshots of ``collection`` held by the server, oldest first."""
        self._server_only("list_snapshots")
        check_name("collection", collection)
        with self.client() as client:
            snaps = self._call(f"list snapshots of {collection}", client.list_snapshots, collection)
        found = [Snapshot(collection, s.name, s.size, s.creation_time, s.checksum) for s in snaps]
        return sorted(found, key=lambda s: s.created_at or "")

    def recover_snapshot(self, collection: str, location: str, checksum: str | None = None,
                         incident: str | None = None) -> None:
        """Recover ``collection`` on the server from a snapshot at ``location`` (http(s):// or file:// URL).

        The server downloads the snapshot itself and, given ``checksum`` (sha256), refuses one
        that does not match. Recovering into a new collection name leaves the live one untouched;
        an existing ``collection`` is overwritten only when it is empty or a leftover rebuild of
        ``incident``. The recovered collection is then marked as the rebuild of ``incident``.
        """
        self._server_only("recover_snapshot")
        check_name("collection", collection)
        if not re.match(r"^(https?|file)://", location or ""):
            raise InvalidInput(f"snapshot location {_without_query(location)!r} is not an http(s):// or file:// URL")
        with self.client(self.snapshot_timeout_seconds) as client:
            self._check_replaceable(client, collection, incident)
            try:
                self._call(f"recover {collection} from snapshot", client.recover_snapshot, collection,
                           location=location, checksum=checksum, wait=True)
            except QdrantError as exc:
                # Raised again without its cause: the client's error carries the presigned URL.
                raise type(exc)(_without_query(str(exc))) from None
            if incident:
                self._call(f"mark {collection}", client.update_collection, collection,
                           metadata={INCIDENT_MARK: incident})


def read_export_header(stream: IO[bytes], expected_sha256: str | None = None) -> tuple[dict, int]:
    """Check an export end to end: header, trailer, and sha256; return the header and point count.

    Raises:
        InvalidInput: not an export, truncated, or its checksum differs from ``expected_sha256``.
    """
    stream.seek(0)
    digest = hashlib.sha256()
    header, trailer, points = None, None, 0
    for raw in stream:
        digest.update(raw)
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise InvalidInput(f"export is not JSON lines ({exc})") from exc
        if header is None:
            if line.get("format") != EXPORT_FORMAT:
                raise InvalidInput(f"export format {line.get('format')!r} is not {EXPORT_FORMAT!r}")
            header = line
        elif line.get("end"):
            trailer = line
        else:
            points += len(line["ids"])
    if header is None or trailer is None:
        raise InvalidInput("export is truncated: its header or trailer is missing")
    if trailer["points"] != points:
        raise InvalidInput(f"export holds {points} points but its trailer says {trailer['points']}")
    actual = digest.hexdigest()
    if expected_sha256 and actual != expected_sha256:
        raise InvalidInput(f"export checksum {actual} does not match the recorded sha256 {expected_sha256}")
    stream.seek(0)
    return header, points


def iter_export(stream: IO[bytes]) -> Iterator[tuple[list, np.ndarray, list[dict]]]:
    """The (ids, vectors, payloads) batches of an export."""
    header = None
    for raw in stream:
        line = json.loads(raw)
        if header is None:
            header = line
            continue
        if line.get("end"):
            return
        vectors = np.frombuffer(base64.b64decode(line["vectors"]), dtype="<f4").reshape(-1, header["vector_size"])
        yield line["ids"], vectors, line["payloads"]


class EmbeddingTable(BaseModel):
    """Where the source of truth keeps embeddings: a PostgreSQL table with an id, a vector and a payload.

    The vector column may be ``float4[]``/``float8[]`` or ``bytea`` (little-endian float32).
    """

    table: str = Field(description="Table, optionally schema-qualified, e.g. 'public.lead_embeddings'.")
    id_column: str = Field(default="id", description="Column holding the point id (bigint or uuid).")
    vector_column: str = Field(default="embedding", description="Column holding the embedding.")
    payload_column: str | None = Field(default=None, description="jsonb column copied as the point payload.")

    def _identifiers(self):
        from psycopg import sql

        ident = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
        parts = self.table.split(".")
        names = [*parts, self.id_column, self.vector_column] + ([self.payload_column] if self.payload_column else [])
        if len(parts) > 2 or not all(ident.match(n or "") for n in names):
            raise InvalidInput(f"embedding table {self.table!r} or its columns are not plain SQL identifiers")
        return (sql.Identifier(*parts), sql.Identifier(self.id_column), sql.Identifier(self.vector_column),
                sql.Identifier(self.payload_column) if self.payload_column else sql.SQL("NULL::jsonb"))

    def count(self, cluster) -> int:
        """Rows in the table (the ``PostgresCluster`` holding it)."""
        from psycopg import sql

        table, _, _, _ = self._identifiers()
        return int(self._query_one(cluster, sql.SQL("SELECT count(*) FROM {}").format(table)))

    def dimension(self, cluster) -> int | None:
        """Dimension of the first stored embedding (None for an empty table)."""
        from psycopg import sql

        table, key, vector, _ = self._identifiers()
        value = self._query_one(cluster, sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(vector, table, key))
        return None if value is None else len(_as_vector(value))

    def sample(self, cluster, size: int, seed: int = 7) -> np.ndarray:
        """Up to ``size`` embeddings chosen at random (repeatably for a given ``seed``)."""
        from psycopg import sql

        table, key, vector, _ = self._identifiers()
        statement = sql.SQL("SELECT {} FROM {} ORDER BY md5({}::text || %s) LIMIT %s").format(vector, table, key)
        with self._session(cluster) as conn:
            rows = self._run(conn, statement, (str(seed), size)).fetchall()
        return np.asarray([_as_vector(r[0]) for r in rows], dtype=np.float32)

    def batches(self, cluster, batch_size: int = 2000) -> Iterator[tuple[list, np.ndarray, list[dict]]]:
        """Every row as (ids, vectors, payloads) batches, in id order, through a server-side cursor."""
        from psycopg import sql

        table, key, vector, payload = self._identifiers()
        statement = sql.SQL("SELECT {}, {}, {} FROM {} ORDER BY {}").format(key, vector, payload, table, key)
        with self._session(cluster) as conn:
            with conn.transaction():
                cur = conn.cursor(name="dr_embeddings", binary=True)
                cur.itersize = batch_size
                self._run(cur, statement)
                while True:
                    rows = cur.fetchmany(batch_size)
                    if not rows:
                        return
                    ids = [_normal_id(r[0]) for r in rows]
                    vectors = np.asarray([_as_vector(r[1]) for r in rows], dtype=np.float32)
                    yield ids, vectors, [r[2] or {} for r in rows]

    @contextmanager
    def _session(self, cluster):
        with cluster.connect() as conn:
            yield conn

    def _run(self, target, statement, params=()):
        import psycopg

        try:
            return target.execute(statement, params)
        except psycopg.errors.UndefinedTable as exc:
            raise InvalidInput(f"embedding table {self.table!r} does not exist") from exc
        except psycopg.errors.UndefinedColumn as exc:
            raise InvalidInput(f"embedding table {self.table!r}: {str(exc).strip().splitlines()[0]}") from exc
        except psycopg.Error as exc:
            from blocks.postgres import classify

            raise classify(exc, f"reading embeddings from {self.table}") from exc

    def _query_one(self, cluster, statement):
        with self._session(cluster) as conn:
            row = self._run(conn, statement).fetchone()
        return None if row is None else row[0]


def _as_vector(value) -> np.ndarray:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)
