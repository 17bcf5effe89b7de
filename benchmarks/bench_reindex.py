"""Vector re-index: points per second from the PostgreSQL source of truth into a new Qdrant collection.

Seeds ``BENCH_VECTORS`` (default 100 000) embeddings of ``BENCH_DIMS`` (default 384) dimensions
as ``float4[]`` in a fresh PostgreSQL 15, then measures what the ``vector-db-recovery`` flow does
with them: streaming the table (server-side cursor), re-indexing it into an embedded Qdrant
collection in batches, and verifying recall@10 of 50 sampled queries against the exact neighbours.
Embedded Qdrant commits every point to SQLite, so its directory (``BENCH_QDRANT_DIR``) defaults
to tmpfs when there is one: on a disk the figure measures fsync, not the pipeline.
Prints ``NAME: value=X UNIT``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sandbox import pgcluster  # noqa: E402
from sandbox.paths import free_port  # noqa: E402

VECTORS = int(os.environ.get("BENCH_VECTORS", "100000"))
DIMS = int(os.environ.get("BENCH_DIMS", "384"))
BATCH = int(os.environ.get("BENCH_BATCH", "2000"))
QDRANT_DIR = os.environ.get("BENCH_QDRANT_DIR") or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def main() -> None:

    from blocks.postgres import PostgresCluster, PostgresInstance
    from blocks.qdrant import EmbeddingTable, ExactNeighbours, QdrantCluster

    base = Path(tempfile.mkdtemp(prefix="dr-bench-reindex-", dir="/tmp"))
    os.chmod(base, 0o755)
    storage = tempfile.mkdtemp(prefix="dr-bench-qdrant-", dir=QDRANT_DIR)
    layout = pgcluster.ClusterLayout(base / "cluster", free_port(), None, "bench-password")
    try:
        pgcluster.build(layout, with_replica=False)
        cluster = PostgresCluster(primary=PostgresInstance(port=layout.primary_port, data_directory=str(layout.primary_dir)),
                                  password=layout.password, recovery_directory=str(layout.recovery_dir),
                                  statement_timeout_seconds=3600)
        log(f"seeding {VECTORS} x {DIMS} float4[] embeddings")
        with cluster.connect() as conn:
            conn.execute("CREATE TABLE embeddings (id bigint PRIMARY KEY, embedding float4[] NOT NULL, payload jsonb)")
            conn.execute(
                "INSERT INTO embeddings SELECT g, ARRAY(SELECT (random() - 0.5)::float4 FROM generate_series(1, %s) "
                "WHERE g > 0), jsonb_build_object('lead_id', g) FROM generate_series(1, %s) g", (DIMS, VECTORS))
            conn.execute("ANALYZE embeddings")
        table = EmbeddingTable(table="embeddings", payload_column="payload")

        started = time.perf_counter()
        read = sum(len(ids) for ids, _, _ in table.batches(cluster, BATCH))
        read_seconds = time.perf_counter() - started
        log(f"read {read} rows in {read_seconds:.1f} s")

        qdrant = QdrantCluster(path=storage)
        started = time.perf_counter()
        qdrant.create_collection("bench-r", DIMS, "Cosine")
        written = qdrant.upsert_batches("bench-r", table.batches(cluster, BATCH))
        reindex_seconds = time.perf_counter() - started
        log(f"re-indexed {written} points in {reindex_seconds:.1f} s into {storage}")

        started = time.perf_counter()
        queries = table.sample(cluster, 50)
        exact = ExactNeighbours(queries, 10, "Cosine")
        for ids, vectors, _ in table.batches(cluster, BATCH):
            exact.feed(ids, vectors)
        recall = qdrant.sample_recall("bench-r", queries, exact.neighbours(), 10)
        verify_seconds = time.perf_counter() - started
        count = qdrant.count("bench-r")

        where = "tmpfs" if storage.startswith("/dev/shm") else "disk"
        print(f"vector_reindex_throughput: value={written / reindex_seconds:.0f} points/s "
              f"({written} x {DIMS}, PostgreSQL -> embedded Qdrant on {where}, batches of {BATCH})")
        print(f"vector_source_read_throughput: value={read / read_seconds:.0f} points/s")
        print(f"vector_verify_seconds: value={verify_seconds:.1f} s (count {count}, recall@10 {recall.recall:.3f} "
              f"over {recall.queries} queries)")
        if count != VECTORS or recall.recall < 0.99:
            sys.exit(1)
    finally:
        pgcluster.stop_all(base)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
