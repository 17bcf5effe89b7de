"""Vector database recovery: the source a collection is rebuilt from, and the rebuilt collection's checks against it.

The source is the PostgreSQL table of stored embeddings (re-index; the source of truth), a portable
export in the backup bucket (import) or a server snapshot (snapshot). Whatever the source, the
rebuilt collection must hold as many points as it and answer sampled queries with its exact top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks import PostgresCluster
from blocks.errors import InvalidInput
from blocks.loading import load_block
from blocks.qdrant import EmbeddingTable, QdrantCluster, StoredBackup
from blocks.results import CheckResult
from runbook.run import Recovery
from tasks.qdrant import (
    check_export,
    count_source_rows,
    describe_collection,
    exact_neighbours_in_export,
    exact_neighbours_in_postgres,
    find_backup,
    sample_recall,
)


@dataclass
class Source:
    """Where the rebuilt collection comes from, and what it holds."""

    strategy: str
    points: int = 0
    vector_size: int | None = None
    distance: str | None = None
    cluster: PostgresCluster | None = None
    table: EmbeddingTable | None = None
    backup: StoredBackup | None = None

    def expected_points(self) -> tuple[int, str]:
        """The points the rebuilt collection must hold (the source table is counted now) and where that comes from."""
        if self.strategy == "reindex":
            return count_source_rows(self.cluster, self.table)[0], "source table"
        return self.backup.points, "backup"


@dataclass(frozen=True)
class Rebuild:
    """The collection built beside the live one, and how it is verified against the source."""

    collection: str
    vector_size: int
    distance: str
    batch_size: int
    sample_queries: int
    min_recall: float
    k: int


def check_source(run: Recovery, qdrant: QdrantCluster, alias: str, strategy: str, postgres_block: str | None,
                  source_table: EmbeddingTable | None, backup_key: str | None) -> Source:
    """Check the chosen source exists and is usable; what it holds."""
    report = run.report
    source = Source(strategy, table=source_table)
    if strategy in ("reindex", "snapshot"):
        if not postgres_block or source_table is None:
            raise InvalidInput(f"strategy {strategy!r} needs postgres_block and source_table "
                               "(the source of truth the result is verified against)")
        source.cluster = load_block(PostgresCluster, postgres_block)
        source.points, source.vector_size = count_source_rows(source.cluster, source_table)
        if source.points == 0:
            raise InvalidInput(f"source table {source_table.table!r} in {postgres_block!r} holds no embeddings")
        report.recovery_target = f"{postgres_block}:{source_table.table}"
    if strategy in ("import", "snapshot"):
        if strategy == "snapshot" and qdrant.embedded:
            raise InvalidInput(f"strategy 'snapshot' needs a Qdrant server; {qdrant.location} is embedded. "
                               "Use 'reindex' or 'import'")
        backup = find_backup(qdrant, alias, "export" if strategy == "import" else "snapshot", backup_key)
        if not backup.sha256:
            raise InvalidInput(f"backup {backup.key} has no recorded sha256; it cannot be verified")
        if backup.points is None:
            raise InvalidInput(f"backup {backup.key} has no recorded point count; it cannot be verified")
        source.backup = backup
        if strategy == "import":
            header = check_export(qdrant, backup)
            source.points, source.vector_size, source.distance = backup.points, header["vector_size"], header["distance"]
        report.recovery_target = f"s3://{qdrant.backup_bucket.bucket_name}/{backup.key}"
        report.facts["backup"] = {"key": backup.key, "stored_at": backup.stored_at, "sha256": backup.sha256,
                                  "points": backup.points}
    return source


def verify_against_source(run: Recovery, qdrant: QdrantCluster, source: Source, rebuild: Rebuild, distance: str) -> list[CheckResult]:
    """Point count equals the source; sampled queries find the source's exact top-k."""
    rebuilt = describe_collection(qdrant, rebuild.collection)
    expected, origin = source.expected_points()
    checks = [CheckResult("point count", rebuilt.points == expected,
                          f"{rebuilt.points} points, {origin} holds {expected}")]
    k, sample = rebuild.k, rebuild.sample_queries
    if source.strategy == "import":
        queries, truth = exact_neighbours_in_export(qdrant, source.backup, sample, k, distance)
    else:
        queries, truth = exact_neighbours_in_postgres(source.cluster, source.table, sample, k, distance)
    recall = sample_recall(qdrant, rebuild.collection, queries, truth, k)
    run.report.facts[f"recall@{k}"] = round(recall.recall, 4)
    checks.append(CheckResult(
        f"recall@{k}", recall.recall >= rebuild.min_recall,
        f"{recall.recall:.4f} over {recall.queries} sampled queries (worst {recall.worst:.2f}; minimum "
        f"{rebuild.min_recall})",
    ))
    return checks
