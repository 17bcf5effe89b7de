"""Tasks over a QdrantCluster: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from prefect import get_run_logger, task

from blocks.errors import InvalidInput
from blocks.postgres import PostgresCluster
from blocks.qdrant import (
    CollectionInfo,
    EmbeddingTable,
    ExactNeighbours,
    QdrantCluster,
    RecallResult,
    StoredBackup,
    iter_export,
    read_export_header,
)
from tasks._policy import policy


@task(name="describe-collection", **policy(timeout_seconds=120))
def describe_collection(qdrant: QdrantCluster, name: str) -> CollectionInfo | None:
    """Point count and vector shape of the collection ``name`` designates (None when there is none)."""
    try:
        return qdrant.collection_info(name)
    except InvalidInput:
        return None


@task(name="list-collections", **policy(timeout_seconds=120))
def list_collections(qdrant: QdrantCluster) -> list[str]:
    """Names of every collection (aliases not included)."""
    return qdrant.collections()


@task(name="count-source-rows", **policy(timeout_seconds=600))
def count_source_rows(cluster: PostgresCluster, table: EmbeddingTable) -> tuple[int, int | None]:
    """Rows in the PostgreSQL source of truth and the dimension of its embeddings."""
    return table.count(cluster), table.dimension(cluster)


@task(name="require-replaceable", **policy(timeout_seconds=120))
def require_replaceable(qdrant: QdrantCluster, name: str, incident: str) -> bool:
    """Refuse a collection ``name`` that holds points and is not a leftover rebuild of ``incident``.

    Returns:
        True when a leftover (or empty) collection of that name exists and will be replaced.
    """
    return qdrant.require_replaceable(name, incident)


@task(name="create-collection", **policy(timeout_seconds=300))
def create_collection(qdrant: QdrantCluster, name: str, vector_size: int, distance: str, incident: str) -> None:
    """Create an empty collection beside the live one, marked as the rebuild of ``incident``.

    A leftover of an earlier attempt at the same incident (or an empty collection) is replaced.
    """
    qdrant.create_collection(name, vector_size, distance, replace=True, incident=incident)


@task(name="reindex-from-postgres", **policy(timeout_seconds=6 * 3600, retries=1))
def reindex_from_postgres(qdrant: QdrantCluster, collection: str, cluster: PostgresCluster,
                          table: EmbeddingTable, batch_size: int = 2000) -> int:
    """Stream every stored embedding from PostgreSQL into ``collection``; returns the points written."""
    written = qdrant.upsert_batches(collection, table.batches(cluster, batch_size))
    get_run_logger().info("Re-indexed %d points from %s into %s", written, table.table, collection)
    return written


@task(name="find-backup", **policy(timeout_seconds=120))
def find_backup(qdrant: QdrantCluster, collection: str, kind: str, key: str | None = None) -> StoredBackup:
    """The backup at ``key``, or the newest ``kind`` backup of ``collection``; refuses when there is none."""
    if key:
        return qdrant.describe_backup(key)
    backups = qdrant.stored_backups(collection, kind)
    if not backups:
        raise InvalidInput(f"no {kind} of {collection!r} under {qdrant.backup_location(collection)}")
    return backups[-1]


@task(name="export-collection", **policy(timeout_seconds=6 * 3600, retries=1))
def export_collection(qdrant: QdrantCluster, collection: str) -> StoredBackup:
    """Export a collection to the backup bucket with its sha256 beside it."""
    backup = qdrant.export_to_bucket(collection)
    get_run_logger().info("Exported %s points of %s to %s", backup.points, collection, backup.key)
    return backup


@task(name="snapshot-collection", **policy(timeout_seconds=6 * 3600, retries=1))
def snapshot_collection(qdrant: QdrantCluster, collection: str) -> StoredBackup:
    """Take a server snapshot of a collection and copy it, with its sha256, to the backup bucket."""
    return qdrant.snapshot_to_bucket(collection)


@task(name="check-export", **policy(timeout_seconds=3600))
def check_export(qdrant: QdrantCluster, backup: StoredBackup) -> dict:
    """Download an export, check its sha256, header and trailer; returns its header."""
    with tempfile.TemporaryDirectory(prefix="dr-qdrant-") as folder:
        path = os.path.join(folder, "export.jsonl")
        qdrant.fetch_backup(backup.key, path)
        with open(path, "rb") as fh:
            header, _ = read_export_header(fh, backup.sha256)
    return header


@task(name="import-collection", **policy(timeout_seconds=6 * 3600, retries=1))
def import_collection(qdrant: QdrantCluster, collection: str, backup: StoredBackup, incident: str) -> int:
    """Download an export, check its sha256, and import it into a new collection marked with ``incident``."""
    with tempfile.TemporaryDirectory(prefix="dr-qdrant-") as folder:
        path = os.path.join(folder, "export.jsonl")
        qdrant.fetch_backup(backup.key, path)
        with open(path, "rb") as fh:
            return qdrant.import_collection(collection, fh, backup.sha256, incident)


@task(name="recover-snapshot", **policy(timeout_seconds=6 * 3600, retries=1))
def recover_snapshot(qdrant: QdrantCluster, collection: str, backup: StoredBackup, incident: str) -> None:
    """Have the Qdrant server recover ``collection`` from a snapshot in the bucket (checksum verified by it).

    The server gets a presigned URL valid for 10 minutes; errors name the object, never the URL's signature.
    """
    qdrant.recover_snapshot(collection, qdrant.backup_url(backup.key, 600), backup.sha256, incident)


@task(name="exact-neighbours-in-postgres", **policy(timeout_seconds=3600))
def exact_neighbours_in_postgres(cluster: PostgresCluster, table: EmbeddingTable, sample_size: int, k: int,
                                 distance: str) -> tuple[np.ndarray, list[list]]:
    """Sample query vectors from the source of truth and compute their exact top-k over all of it."""
    queries = table.sample(cluster, sample_size)
    exact = ExactNeighbours(queries, k, distance)
    for ids, vectors, _ in table.batches(cluster):
        exact.feed(ids, vectors)
    return queries, exact.neighbours()


@task(name="exact-neighbours-in-export", **policy(timeout_seconds=3600))
def exact_neighbours_in_export(qdrant: QdrantCluster, backup: StoredBackup, sample_size: int, k: int,
                               distance: str) -> tuple[np.ndarray, list[list]]:
    """Sample query vectors from an export and compute their exact top-k over all of it."""
    with tempfile.TemporaryDirectory(prefix="dr-qdrant-") as folder:
        path = os.path.join(folder, "export.jsonl")
        qdrant.fetch_backup(backup.key, path)
        with open(path, "rb") as fh:
            header, points = read_export_header(fh, backup.sha256)
            rng = np.random.default_rng(7)
            wanted = set(rng.choice(points, size=min(sample_size, points), replace=False).tolist()) if points else set()
            queries, seen = [], 0
            for _, vectors, _ in iter_export(fh):
                queries += [vectors[i - seen] for i in sorted(wanted) if seen <= i < seen + len(vectors)]
                seen += len(vectors)
            exact = ExactNeighbours(np.asarray(queries).reshape(-1, header["vector_size"]), k, distance)
            fh.seek(0)
            for ids, vectors, _ in iter_export(fh):
                exact.feed(ids, vectors)
    return exact.queries, exact.neighbours()


@task(name="sample-recall", **policy(timeout_seconds=1800))
def sample_recall(qdrant: QdrantCluster, collection: str, queries: np.ndarray, expected: list[list],
                  k: int) -> RecallResult:
    """Recall@k of ``collection`` against the source's exact neighbours of the sampled queries."""
    return qdrant.sample_recall(collection, queries, expected, k)


@task(name="switch-alias", **policy(timeout_seconds=120))
def switch_alias(qdrant: QdrantCluster, alias: str, collection: str) -> str | None:
    """Point ``alias`` at ``collection`` atomically; returns the collection it pointed to before."""
    previous = qdrant.switch_alias(alias, collection)
    get_run_logger().info("Alias %s: %s -> %s", alias, previous, collection)
    return previous
