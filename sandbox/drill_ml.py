"""Machine-learning drills on the sandbox: a corrupted model and a damaged vector collection.

Blocks saved by :func:`save_blocks` (fixed names, overwritten on every ``dr up``):

* ``ModelRegistry`` ``sandbox-models``: bucket ``dr-sandbox-models`` (versioned) on the sandbox's moto server;
* ``KubernetesTarget`` ``sandbox-ml`` (namespace ``dr-ml``): the ``optimizer`` serving deployment and the
  ``ppo-training`` Job;
* ``QdrantCluster`` ``sandbox-qdrant``: embedded Qdrant in the sandbox directory, backups in bucket
  ``dr-sandbox-qdrant``.

The vector drill keeps its source of truth in the sandbox PostgreSQL (block ``sandbox``), table
``vectors.lead_embeddings``.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sandbox import addresses
from sandbox.drillkit import DrillResult, save_report
from sandbox.drillkit import check as _check

MODELS_BLOCK, ML_KUBE_BLOCK, QDRANT_BLOCK, POSTGRES_BLOCK = "sandbox-models", "sandbox-ml", "sandbox-qdrant", "sandbox"
MODELS_BUCKET, QDRANT_BUCKET = "dr-sandbox-models", "dr-sandbox-qdrant"
MODEL, TRAINING_JOB, SERVING = "ppo-policy", "ppo-training", "optimizer"
ALIAS, TABLE, DIMS = "leads", "vectors.lead_embeddings", 64


def save_blocks(ep) -> None:
    """Save the model registry, the ML namespace and the Qdrant blocks (overwriting earlier ones)."""
    from prefect_aws.s3 import S3Bucket

    from blocks.kubernetes import KubernetesTarget
    from blocks.models import ModelRegistry
    from blocks.qdrant import QdrantCluster

    credentials = ep.aws_credentials()
    ModelRegistry(bucket=S3Bucket(bucket_name=MODELS_BUCKET, credentials=credentials), prefix="models",
                  restore_directory=str(Path(ep.root) / "models-restore"),
                  environment="sandbox").save(MODELS_BLOCK, overwrite=True)
    KubernetesTarget(api_server=ep.kube_url, namespace="dr-ml", verify_tls=False, environment="sandbox",
                     region="primary", deployments={SERVING: 2}, rollout_timeout_seconds=120,
                     poll_interval_seconds=0.5).save(ML_KUBE_BLOCK, overwrite=True)
    QdrantCluster(path=ep.qdrant_path, environment="sandbox", backup_prefix="qdrant",
                  backup_bucket=S3Bucket(bucket_name=QDRANT_BUCKET, credentials=credentials)
                  ).save(QDRANT_BLOCK, overwrite=True)


def _ensure_bucket(credentials, name: str) -> None:
    s3 = credentials.get_s3_client()
    if name not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})


def _write_model(folder: Path, seed: int, golden_rows: int) -> Path:
    """A small policy network (weights.npz) and its golden inputs and outputs (golden.npz)."""
    rng = np.random.default_rng(seed)
    layers = {"W0": rng.normal(size=(16, 32)), "b0": rng.normal(size=32),
              "W1": rng.normal(size=(32, 4)), "b1": rng.normal(size=4)}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "weights.npz", **layers)
    inputs = np.random.default_rng(seed + 1).normal(size=(golden_rows, 16))
    outputs = np.maximum(inputs @ layers["W0"] + layers["b0"], 0) @ layers["W1"] + layers["b1"]
    np.savez(folder / "golden.npz", inputs=inputs, outputs=outputs)
    return folder


def _prune_restored(folder: Path, keep: int = 3) -> None:
    """Sandbox housekeeping: keep only the newest ``keep`` restored model directories."""
    import shutil

    if not folder.is_dir():
        return
    restored = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in restored[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _serving_manifest() -> dict:
    labels = {"app": SERVING, "tier": "ml"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": SERVING, "labels": labels},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": SERVING}},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "serve",
                                                           "image": "registry.sandbox.local/optimizer:3.0"}]}}}}


def _result(scenario: str, report, flow_run_id: str, report_path, checks: list[dict], extra: dict) -> DrillResult:
    info = addresses.info()
    return DrillResult(
        scenario=scenario, passed=all(c["passed"] for c in checks),
        rto_seconds=report.rto_seconds, rto_objective_seconds=report.rto_objective_seconds,
        rpo_seconds=report.rpo_seconds, rpo_objective_seconds=report.rpo_objective_seconds,
        flow_run_id=flow_run_id, outcome=report.outcome, report=str(report_path),
        ui_url=f"{info.ui_url}/runs/flow-run/{flow_run_id}", checks=checks, extra=extra,
    )


def model_corruption(rows: int = 256) -> DrillResult:
    """Publish a good and a current model, let a training job garble both, recover the good one.

    ``rows`` is the number of golden inputs the functional check replays.
    """
    from blocks.kubernetes import KubernetesTarget
    from blocks.models import GoldenCheck, ModelRegistry
    from flows.model_corruption import model_corruption as recovery_flow
    from sandbox.services import endpoints
    from runbook.evidence import load_report

    ep = endpoints()
    registry = ModelRegistry.load(MODELS_BLOCK)
    _prune_restored(Path(registry.restore_directory) / MODEL)
    kube = KubernetesTarget.load(ML_KUBE_BLOCK)
    _ensure_bucket(registry.bucket.credentials, MODELS_BUCKET)
    s3, bucket = registry.bucket.credentials.get_s3_client(), registry.bucket_name

    # The estate before the incident: v1 (known good) and v2 in production, training running, serving ready.
    with tempfile.TemporaryDirectory(prefix="dr-drill-model-") as folder:
        for version, seed in (("v1", 11), ("v2", 12)):
            registry.publish_version(MODEL, version, _write_model(Path(folder) / version, seed, max(rows, 1)),
                                     GoldenCheck(tolerance=1e-9))
    registry.flip_pointer(MODEL, "v2")
    if kube.deployment_exists(SERVING):
        kube.scale(SERVING, 2)
    else:
        kube.create_object(_serving_manifest())
    kube.wait_ready(SERVING, timeout=60)
    kube.delete_job(TRAINING_JOB)
    kube.create_object({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": TRAINING_JOB, "labels": {"app": TRAINING_JOB}},
        "spec": {"parallelism": 1, "backoffLimit": 0,
                 "template": {"metadata": {"labels": {"app": TRAINING_JOB}},
                              "spec": {"restartPolicy": "Never",
                                       "containers": [{"name": "train", "image": "registry.sandbox.local/ppo:2.1"}]}}},
    })

    # The incident: the training job writes garbage over the weights of both versions.
    damaged = []
    for version in ("v1", "v2"):
        key = registry.pointer_key(MODEL).rsplit("/", 1)[0] + f"/{version}/weights.npz"
        body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        for offset in range(64, len(body), max(len(body) // 16, 1)):
            body[offset] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        damaged.append(key)
    detected = datetime.now(timezone.utc)
    before = registry.verify_current(MODEL, "v1")

    state = recovery_flow(
        registry_block=MODELS_BLOCK, model=MODEL, version="v1", kube_block=ML_KUBE_BLOCK,
        training_job_selector=f"app={TRAINING_JOB}", serving_deployments=[SERVING], rollout_timeout_seconds=60,
        incident_detected_at=detected, approval_policy="auto", drill=True, return_state=True,
    )
    flow_run_id = str(state.state_details.flow_run_id)
    report = load_report(flow_run_id)
    report_path = save_report(Path(ep.root), flow_run_id)

    pointer = registry.production_version(MODEL)[0]
    after = registry.verify_current(MODEL, "v1")
    jobs = {j["name"]: j for j in kube.list_jobs(f"app={TRAINING_JOB}")}
    status = kube.rollout_status(SERVING)
    golden = [c for c in report.checks if c.name == "golden outputs"]
    checks = [
        _check("fault injected: v1 weights damaged in the bucket", not all(c.passed for c in before),
               "; ".join(c.detail for c in before)),
        _check("flow outcome", report.outcome == "Recovered", f"{state.name}: {report.summary}"),
        _check("production pointer on the good version", pointer == "v1", f"PRODUCTION = {pointer}"),
        _check("bucket objects match the manifest again", all(c.passed for c in after),
               "; ".join(c.detail for c in after)),
        _check("golden outputs reproduced", bool(golden) and golden[0].passed, golden[0].detail if golden else "not run"),
        _check("training job stopped", bool(jobs.get(TRAINING_JOB, {}).get("suspended")), str(jobs.get(TRAINING_JOB))),
        _check("serving restarted and ready", status.complete, status.message),
        _check("RTO within objective", bool(report.rto_met), f"{report.rto_seconds} s of {report.rto_objective_seconds} s"),
    ]
    return _result("model-corruption", report, flow_run_id, report_path, checks,
                   {"model": MODEL, "version": "v1", "damaged": damaged})


def _ensure_embeddings(cluster, rows: int) -> np.ndarray:
    """The source of truth: ``rows`` deterministic unit vectors in ``vectors.lead_embeddings``."""
    rng = np.random.default_rng(2024)
    vectors = rng.normal(size=(rows, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with cluster.connect() as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS vectors")
        conn.execute("CREATE TABLE IF NOT EXISTS vectors.lead_embeddings "
                     "(id bigint PRIMARY KEY, embedding float4[] NOT NULL, payload jsonb)")
        count = conn.execute("SELECT count(*) FROM vectors.lead_embeddings").fetchone()[0]
        if count != rows:
            conn.execute("TRUNCATE vectors.lead_embeddings")
            with conn.cursor() as cur, cur.copy("COPY vectors.lead_embeddings (id, embedding, payload) FROM STDIN") as copy:
                for i, vec in enumerate(vectors, 1):
                    copy.write_row((i, vec.tolist(), f'{{"lead_id": {i}, "segment": "s{i % 7}"}}'))
    return vectors


def vector_db(rows: int = 2_000) -> DrillResult:
    """Damage the collection behind the ``leads`` alias, then re-index it from PostgreSQL.

    The fault deletes a fifth of the points and overwrites the vectors of another tenth; the
    recovery builds a new collection from the stored embeddings and moves the alias.
    """
    from blocks import PostgresCluster
    from blocks.qdrant import EmbeddingTable, QdrantCluster
    from flows.vector_db_recovery import vector_db_recovery as recovery_flow
    from sandbox.services import endpoints
    from runbook.evidence import load_report

    ep = endpoints()
    qdrant = QdrantCluster.load(QDRANT_BLOCK)
    cluster = PostgresCluster.load(POSTGRES_BLOCK)
    _ensure_bucket(qdrant.backup_bucket.credentials, QDRANT_BUCKET)
    table = EmbeddingTable(table=TABLE, payload_column="payload")
    _ensure_embeddings(cluster, rows)

    # The estate before the incident: ``leads`` points to a complete collection. Earlier drills'
    # replaced collections are removed so the sandbox does not grow.
    current = qdrant.resolve(ALIAS)
    if current is None or qdrant.count(current) != rows:
        current = f"{ALIAS}-seed-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        qdrant.create_collection(current, DIMS, "Cosine", replace=True)
        qdrant.upsert_batches(current, table.batches(cluster, 1000))
        qdrant.switch_alias(ALIAS, current)
    for name in qdrant.collections():
        if name.startswith(f"{ALIAS}-") and name != current:
            qdrant.delete_collection(name)

    # The incident: points lost and vectors overwritten in the live collection.
    from qdrant_client import models

    rng = np.random.default_rng()
    ids = list(range(1, rows + 1))
    lost = rng.choice(ids, size=rows // 5, replace=False).tolist()
    garbled = [i for i in rng.choice(ids, size=rows // 10, replace=False).tolist() if i not in set(lost)]
    with qdrant.client() as client:
        client.delete(current, points_selector=models.PointIdsList(points=lost), wait=True)
    noise = rng.normal(size=(len(garbled), DIMS)).astype(np.float32)
    qdrant.upsert_batches(current, [(garbled, noise, [{}] * len(garbled))])
    damaged_count = qdrant.count(ALIAS)
    detected = datetime.now(timezone.utc)

    state = recovery_flow(
        qdrant_block=QDRANT_BLOCK, alias=ALIAS, strategy="reindex", postgres_block=POSTGRES_BLOCK,
        source_table=table, incident_detected_at=detected, approval_policy="auto", drill=True, return_state=True,
    )
    flow_run_id = str(state.state_details.flow_run_id)
    report = load_report(flow_run_id)
    report_path = save_report(Path(ep.root), flow_run_id)

    served = qdrant.resolve(ALIAS)
    count = qdrant.count(ALIAS) if served else 0
    recall = report.facts.get("recall@10")
    checks = [
        _check("fault injected: points lost and vectors overwritten", damaged_count < rows,
               f"{damaged_count} of {rows} points left, {len(garbled)} vectors overwritten"),
        _check("flow outcome", report.outcome == "Recovered", f"{state.name}: {report.summary}"),
        _check("alias moved to the rebuilt collection", served is not None and served != current,
               f"{ALIAS} -> {served} (was {current})"),
        _check("point count equals the source", count == rows, f"{count} of {rows}"),
        _check("recall@10 >= 0.99", recall is not None and recall >= 0.99, f"{recall}"),
        _check("RTO within objective", bool(report.rto_met), f"{report.rto_seconds} s of {report.rto_objective_seconds} s"),
        _check("RPO within objective", bool(report.rpo_met), f"{report.rpo_seconds} s of {report.rpo_objective_seconds} s"),
    ]
    return _result("vector-db", report, flow_run_id, report_path, checks,
                   {"alias": ALIAS, "collection": served, "replaced": current, "rows": rows})
