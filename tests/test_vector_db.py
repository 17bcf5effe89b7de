"""Vector database recovery against embedded Qdrant, a real PostgreSQL source of truth and moto's S3."""

from __future__ import annotations

import json
import uuid

import httpx
import numpy as np
import pytest

from blocks.errors import InvalidInput
from blocks.qdrant import EmbeddingTable, ExactNeighbours, QdrantCluster, QdrantError, QdrantUnavailable
from sandbox.paths import free_port
from runbook.evidence import load_report
from tests.fixtures_qdrant import seed_embeddings

ROWS, DIMS = 300, 16


def build_live(block: QdrantCluster, alias: str, vectors: np.ndarray, name: str) -> None:
    """The collection applications read, behind ``alias``, as it was before the incident."""
    block.create_collection(name, vectors.shape[1], "Cosine")
    ids = list(range(1, len(vectors) + 1))
    block.upsert_batches(name, [(ids, vectors, [{"lead": i} for i in ids])])
    block.switch_alias(alias, name)


@pytest.fixture
def estate(qdrant, vector_source):
    """Embeddings in PostgreSQL and the live collection built from them: a dict of names and blocks."""
    qd_name, block = qdrant
    pg_name, cluster, _ = vector_source
    table = f"emb_{uuid.uuid4().hex[:8]}"
    vectors = seed_embeddings(cluster, table, ROWS, DIMS)
    alias = f"leads-{uuid.uuid4().hex[:6]}"
    build_live(block, alias, vectors, f"{alias}-v1")
    return {"live": f"{alias}-v1", "qdrant": qd_name, "block": block, "postgres": pg_name, "cluster": cluster,
            "table": EmbeddingTable(table=table, payload_column="payload"), "alias": alias, "vectors": vectors}


def run(estate, **params):
    from flows.vector_db_recovery import vector_db_recovery

    base = dict(qdrant_block=estate["qdrant"], alias=estate["alias"], postgres_block=estate["postgres"],
                source_table=estate["table"], approval_policy="auto", drill=True, sample_queries=40)
    base.update(params)
    state = vector_db_recovery(**base, return_state=True)
    return state, load_report(state.state_details.flow_run_id)


def test_reindex_from_postgres_after_the_collection_is_deleted(estate):
    block = estate["block"]
    with block.client() as client:
        client.delete_collection(estate["live"])  # the incident: the live collection is gone
    assert block.resolve(estate["alias"]) is None

    state, report = run(estate, strategy="reindex", batch_size=400)

    assert state.name == "Recovered", report.summary
    rebuilt = block.resolve(estate["alias"])
    assert rebuilt == f"{report.incident_id}-r"
    assert block.count(estate["alias"]) == ROWS
    assert report.facts["recall@10"] >= 0.99
    assert {c.name: c.passed for c in report.checks} == {
        "point count": True, "recall@10": True, "alias serves the rebuilt collection": True, "populated": True}
    assert report.promotion["previous"] is None and report.rpo_seconds == 0.0
    # payloads come from the source of truth
    with block.client() as client:
        point = client.retrieve(rebuilt, ids=[7], with_payload=True, with_vectors=True)[0]
    assert point.payload == {"lead": 7}
    assert np.allclose(point.vector, estate["vectors"][6], atol=1e-5)


def test_reindex_replaces_a_damaged_collection_and_keeps_the_old_one(estate):
    block = estate["block"]
    with block.client() as client:
        from qdrant_client import models

        client.delete(estate["live"], points_selector=models.PointIdsList(points=list(range(1, 120))))
    assert block.count(estate["alias"]) == ROWS - 119

    state, report = run(estate, strategy="reindex")

    assert state.name == "Recovered", report.summary
    assert report.promotion == {"alias": estate["alias"], "previous": estate["live"],
                                "current": f"{report.incident_id}-r", "already": False}
    assert estate["live"] in block.collections()  # kept, not deleted
    assert block.count(estate["alias"]) == ROWS
    assert any(f"delete the replaced collection {estate['live']}" in item for item in report.action_items)


def test_export_then_import_restores_the_collection(estate):
    from flows.vector_db_recovery import vector_db_backup

    block = estate["block"]
    stored = vector_db_backup(qdrant_block=estate["qdrant"], collection=estate["alias"])
    assert stored["points"] == ROWS and len(stored["sha256"]) == 64
    s3 = block.backup_bucket.credentials.get_s3_client()
    facts = json.loads(s3.get_object(Bucket=block.backup_bucket.bucket_name, Key=stored["key"] + ".json")["Body"].read())
    assert facts["sha256"] == stored["sha256"]
    with block.client() as client:
        client.delete_collection(estate["live"])

    state, report = run(estate, strategy="import", postgres_block=None, source_table=None)

    assert state.name == "Recovered", report.summary
    assert block.count(estate["alias"]) == ROWS
    assert report.facts["recall@10"] >= 0.99
    assert report.facts["backup"]["key"] == stored["key"]
    assert report.rpo_seconds is not None and report.rpo_seconds >= 0


def test_tampered_export_is_refused_before_anything_changes(estate):
    block = estate["block"]
    stored = block.export_to_bucket(estate["alias"]).as_dict()
    s3 = block.backup_bucket.credentials.get_s3_client()
    bucket = block.backup_bucket.bucket_name
    body = bytearray(s3.get_object(Bucket=bucket, Key=stored["key"])["Body"].read())
    body[len(body) // 2] ^= 0x01  # one flipped bit in the middle of the vectors
    s3.put_object(Bucket=bucket, Key=stored["key"], Body=bytes(body))
    before = block.collections()

    state, report = run(estate, strategy="import", backup_key=stored["key"], postgres_block=None, source_table=None)

    assert state.is_failed() and report.outcome == "Refused"
    assert "does not match the recorded" in report.summary
    assert block.collections() == before and block.resolve(estate["alias"]) == estate["live"]


REFUSALS = {
    "empty backup prefix": (dict(strategy="import", postgres_block=None, source_table=None), "no export of"),
    "snapshot on embedded": (dict(strategy="snapshot"), "needs a Qdrant server"),
    "missing table": (dict(strategy="reindex", source_table=EmbeddingTable(table="no_such_table")), "does not exist"),
    "alias is a collection": (dict(strategy="reindex", alias="{live}"), "not an alias"),
    "no source for reindex": (dict(strategy="reindex", postgres_block=None), "needs postgres_block"),
}


def test_dry_run_and_bad_inputs_change_nothing(estate):
    block = estate["block"]
    before = (block.collections(), block.aliases())

    state, report = run(estate, strategy="reindex", dry_run=True)
    assert state.name == "DryRun"
    assert any(f"alias {estate['alias']}: {estate['live']} -> {report.incident_id}-r" in p for p in report.plan)
    assert (block.collections(), block.aliases()) == before

    for case, (params, expected) in REFUSALS.items():
        params = {k: v.format(live=estate["live"]) if k == "alias" else v for k, v in params.items()}
        state, report = run(estate, **params)
        assert state.is_failed() and report.outcome == "Refused", (case, report.summary)
        assert expected in report.summary, (case, report.summary)
        assert (block.collections(), block.aliases()) == before, case


def test_backup_of_an_unknown_collection_is_refused(qdrant):
    from flows.vector_db_recovery import vector_db_backup

    with pytest.raises(InvalidInput, match="not found"):
        vector_db_backup(qdrant_block=qdrant[0], collection="no-such-collection")


def test_exact_neighbours_and_recall_detect_a_wrong_collection(qdrant_dir):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(600, 16)).astype(np.float32)
    ids = list(range(1, 601))
    block = QdrantCluster(path=qdrant_dir)
    block.create_collection("good", 16, "Cosine")
    block.upsert_batches("good", [(ids[:300], vectors[:300], [{}] * 300), (ids[300:], vectors[300:], [{}] * 300)])
    block.create_collection("shuffled", 16, "Cosine")
    block.upsert_batches("shuffled", [(ids, vectors[rng.permutation(600)], [{}] * 600)])
    queries = vectors[:20]
    exact = ExactNeighbours(queries, 10, "Cosine")
    for start in range(0, 600, 128):  # batches of uneven size
        exact.feed(ids[start:start + 128], vectors[start:start + 128])
    normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    brute = [[ids[j] for j in np.argsort(-(normed @ (q / np.linalg.norm(q))))[:10]] for q in queries]
    assert exact.neighbours() == brute
    assert block.sample_recall("good", queries, exact.neighbours()).recall == 1.0
    assert block.sample_recall("shuffled", queries, exact.neighbours()).recall < 0.5


def test_snapshot_verbs_need_a_server_and_the_bucket_url_serves_the_snapshot(qdrant):
    _, block = qdrant
    with pytest.raises(QdrantError, match="needs a Qdrant server"):
        block.create_snapshot("leads")
    with pytest.raises(QdrantError, match="needs a Qdrant server"):
        block.recover_snapshot("leads", "https://example.invalid/x.snapshot")
    # What a server would download: a presigned URL of the snapshot object in the bucket.
    s3 = block.backup_bucket.credentials.get_s3_client()
    key = "qdrant/leads/leads-2024.snapshot"
    s3.put_object(Bucket=block.backup_bucket.bucket_name, Key=key, Body=b"snapshot bytes")
    assert httpx.get(block.backup_url(key, 60), timeout=10).content == b"snapshot bytes"
    assert block.describe_backup(key).kind == "snapshot"

    server = QdrantCluster(url=f"http://127.0.0.1:{free_port()}", api_key="k3y", timeout_seconds=2)
    with pytest.raises(InvalidInput, match="not an http"):
        server.recover_snapshot("leads", "s3://backups/x.snapshot")
    with pytest.raises(QdrantUnavailable) as caught:
        server.list_snapshots("leads")
    assert caught.value.transient and "k3y" not in str(caught.value)


def test_block_needs_exactly_one_location():
    with pytest.raises(ValueError, match="exactly one"):
        QdrantCluster()
    with pytest.raises(ValueError, match="exactly one"):
        QdrantCluster(url="http://q:6333", path="/tmp/q")


def test_rebuild_replaces_only_a_leftover_of_the_same_incident(estate):
    block = estate["block"]
    incident = f"inc-{uuid.uuid4().hex[:6]}"
    kept = f"{incident}-r"
    # A collection with points under the rebuild's name that no recovery of this incident made: kept.
    block.create_collection(kept, DIMS, "Cosine")
    block.upsert_batches(kept, [([1, 2, 3], estate["vectors"][:3], [{}] * 3)])
    before = (block.collections(), block.aliases())

    state, report = run(estate, strategy="reindex", incident_id=incident)

    assert state.is_failed() and report.outcome == "Refused", report.summary
    assert "it is kept" in report.summary and "not marked" in report.summary
    assert (block.collections(), block.aliases()) == before and block.count(kept) == 3

    # A rebuild another incident left behind is refused as well.
    block.delete_collection(kept)
    block.create_collection(kept, DIMS, "Cosine", incident="another-incident")
    block.upsert_batches(kept, [([1], estate["vectors"][:1], [{}])])
    with pytest.raises(InvalidInput, match="marked as rebuilt for incident 'another-incident'"):
        block.create_collection(kept, DIMS, "Cosine", replace=True, incident=incident)
    assert block.count(kept) == 1

    # A half-built collection of this same incident is replaced and the run completes.
    block.delete_collection(kept)
    block.create_collection(kept, DIMS, "Cosine", incident=incident)
    block.upsert_batches(kept, [([1, 2], estate["vectors"][:2], [{}] * 2)])
    state, report = run(estate, strategy="reindex", incident_id=incident)
    assert state.name == "Recovered", report.summary
    assert report.facts["leftover replaced"].startswith(kept)
    assert block.resolve(estate["alias"]) == kept and block.count(kept) == ROWS


def test_presigned_urls_are_short_lived_and_never_in_error_texts(qdrant):
    from blocks.qdrant import _without_query

    _, block = qdrant
    url = block.backup_url("qdrant/leads/x.snapshot")
    assert "X-Amz-Expires=600" in url or "Expires=" in url
    with pytest.raises(InvalidInput, match="between 1 and 3600"):
        block.backup_url("qdrant/leads/x.snapshot", 86400)
    text = _without_query(f"recover leads at http://q:6333: HTTP 500: b'cannot download {url}'")
    assert "Signature" not in text and "Credential" not in text and "x.snapshot?<redacted>" in text
