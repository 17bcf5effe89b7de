"""Object-storage and cache drills on the sandbox, and the blocks they use.

Blocks saved by :func:`save_blocks` (fixed names, overwritten on every ``dr up``):

* ``ObjectStore`` ``sandbox-objects``: bucket ``dr-leads`` (versioned) and its replica
  ``dr-leads-replica`` on the sandbox's moto server, through boto3;
  ``sandbox-objects-minio``: the same buckets through the MinIO SDK;
* ``RedisCache`` ``sandbox-cache``: database 1 of the sandbox's redis-server (database 0 is left
  alone, and the cache drill checks it is).

moto stores replication settings but replicates nothing, so the drill copies the objects to the
replica itself, as replication would have, before checking it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from blocks.object_store import ObjectStore
from blocks.redis_cache import RedisCache
from sandbox import addresses
from sandbox.drillkit import DrillResult, save_report
from sandbox.drillkit import check as _check

STORE_BLOCK, STORE_MINIO_BLOCK, CACHE_BLOCK = "sandbox-objects", "sandbox-objects-minio", "sandbox-cache"
BUCKET, REPLICA = "dr-leads", "dr-leads-replica"
DRILL_PREFIX = "drill/"
CACHE_DB = 1


def save_blocks(ep) -> None:
    """Save the sandbox's object store and cache blocks (overwriting earlier ones)."""
    common = dict(bucket_name=BUCKET, credentials=ep.aws_credentials(), secondary_bucket_name=REPLICA,
                  environment="sandbox", max_workers=16)
    ObjectStore(client="boto3", **common).save(STORE_BLOCK, overwrite=True)
    ObjectStore(client="minio", **common).save(STORE_MINIO_BLOCK, overwrite=True)
    host_port = ep.redis_url.rsplit("/", 1)[0]
    RedisCache.from_url(f"{host_port}/{CACHE_DB}", environment="sandbox").save(CACHE_BLOCK, overwrite=True)


def _s3(store: ObjectStore):
    return store.credentials.get_boto3_session().client(
        "s3", **store.credentials.aws_client_parameters.get_params_override())


def _prepare_buckets(s3) -> None:
    """Both buckets exist and are versioned; earlier drills' objects are removed (sandbox housekeeping)."""
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in (BUCKET, REPLICA):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=DRILL_PREFIX):
            entries = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                       for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            for i in range(0, len(entries), 1000):
                s3.delete_objects(Bucket=bucket, Delete={"Objects": entries[i:i + 1000], "Quiet": True})


def _result(scenario: str, report, flow_run_id: str, report_path, info, checks: list[dict], extra: dict) -> DrillResult:
    checks = checks + [
        _check("RTO within objective", bool(report.rto_met), f"{report.rto_seconds} s of {report.rto_objective_seconds} s"),
        _check("RPO within objective", bool(report.rpo_met), f"{report.rpo_seconds} s of {report.rpo_objective_seconds} s"),
    ]
    return DrillResult(
        scenario=scenario,
        passed=all(c["passed"] for c in checks),
        rto_seconds=report.rto_seconds,
        rto_objective_seconds=report.rto_objective_seconds,
        rpo_seconds=report.rpo_seconds,
        rpo_objective_seconds=report.rpo_objective_seconds,
        flow_run_id=flow_run_id,
        outcome=report.outcome,
        report=str(report_path),
        ui_url=f"{info.ui_url}/runs/flow-run/{flow_run_id}",
        checks=checks,
        extra=extra,
    )


def object_storage(rows: int = 100_000) -> DrillResult:
    """Seed objects and their replica, overwrite, delete and add objects, restore the prefix as of before.

    Args:
        rows: the drill's size, on the scale of the database drills: one object per 100 rows,
            between 100 and 5,000 objects.
    """
    from flows.object_storage_recovery import object_storage_recovery
    from runbook.evidence import load_report

    info = addresses.info()
    store = ObjectStore.load(STORE_BLOCK)
    s3 = _s3(store)
    _prepare_buckets(s3)
    count = min(max(rows // 100, 100), 5000)
    prefix = f"{DRILL_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%S}/"
    originals = {f"{prefix}lead-{i:06d}.json": f'{{"lead": {i}, "status": "qualified"}}'.encode() for i in range(count)}

    def seed(item: tuple[str, bytes]) -> None:
        s3.put_object(Bucket=BUCKET, Key=item[0], Body=item[1])
        s3.put_object(Bucket=REPLICA, Key=item[0], Body=item[1])  # what replication would have copied

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(seed, originals.items()))
    checks = []
    replica_state = object_storage_recovery(store_block=STORE_BLOCK, mode="verify-replica", prefix=prefix,
                                            incident_detected_at=datetime.now(timezone.utc), return_state=True)
    checks.append(_check("replica complete before the fault", replica_state.name == "ReplicaComplete",
                         replica_state.message or replica_state.name))

    time.sleep(1.1)  # S3 keeps whole seconds: the recovery point gets a second of its own
    as_of = datetime.now(timezone.utc)
    time.sleep(1.1)
    keys = sorted(originals)
    overwritten, deleted = keys[0::10], keys[5::10]
    added = [f"{prefix}ransom-{i:03d}.txt" for i in range(max(1, count // 100))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=b"encrypted by attacker"), overwritten))
        list(pool.map(lambda k: s3.delete_object(Bucket=BUCKET, Key=k), deleted))
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=b"pay up"), added))
    detected = datetime.now(timezone.utc)

    state = object_storage_recovery(store_block=STORE_BLOCK, mode="restore-prefix", prefix=prefix,
                                    restore_as_of=as_of, incident_detected_at=detected, approval_policy="auto",
                                    drill=True, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    report = load_report(flow_run_id)
    report_path = save_report(info.root, flow_run_id)

    current = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        current.update({o["Key"]: o["ETag"].strip('"') for o in page.get("Contents", [])})
    wrong = [k for k, body in originals.items() if current.get(k) != hashlib.md5(body).hexdigest()]
    versions = sum(len(p.get("Versions", [])) for p in
                   s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix))
    checks += [
        _check("flow outcome", report.outcome == "Recovered", f"{state.name}: {report.summary}"),
        _check("every object back to its content at T", not wrong,
               f"{count - len(wrong)} of {count} match" + (f"; e.g. {wrong[:3]}" if wrong else "")),
        _check("objects created after T hidden", not [k for k in added if k in current],
               f"{len([k for k in added if k in current])} of {len(added)} still visible"),
        _check("no version destroyed", versions >= count + len(overwritten) + len(added),
               f"{versions} versions kept under {prefix}"),
    ]
    return _result("object-storage", report, flow_run_id, report_path, info, checks,
                   {"prefix": prefix, "objects": count, "overwritten": len(overwritten), "deleted": len(deleted),
                    "added": len(added), "restore_as_of": as_of.isoformat(), "changes": report.facts.get("Changes")})


class _App(threading.Thread):
    """A cache-aside reader over ``keys`` users: GET, and on a miss load from the database of record and SET."""

    def __init__(self, cache: RedisCache, keys: int):
        super().__init__(daemon=True, name="cache-app")
        import redis

        self.client = redis.Redis(host=cache.host, port=cache.port, db=cache.db, decode_responses=True,
                                  password=cache.password.get_secret_value() if cache.password else None)
        self.keys = keys
        self.stop = threading.Event()
        self.served_corrupt = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key = f"user:{i % self.keys}"
            value = self.client.get(key)
            if value is None:
                self.client.set(key, f"profile-{i % self.keys}")
            elif value == "CORRUPTED":
                self.served_corrupt += 1
            i += 1


def cache(rows: int = 100_000) -> DrillResult:
    """Fill the cache, corrupt a fifth of it, flush it with the recovery flow while an app repopulates it.

    Args:
        rows: the drill's size, on the scale of the database drills: one cached user per 50 rows,
            between 100 and 20,000 keys.
    """
    import redis

    from flows.cache_recovery import cache_recovery
    from runbook.evidence import load_report

    info = addresses.info()
    block = RedisCache.load(CACHE_BLOCK)
    keys = min(max(rows // 50, 100), 20_000)
    client = redis.Redis(host=block.host, port=block.port, db=block.db, decode_responses=True)
    other = redis.Redis(host=block.host, port=block.port, db=0, decode_responses=True)
    client.flushdb()
    other.set("dr:drill:other-database", "untouched")
    client.mset({f"user:{i}": f"profile-{i}" for i in range(keys)})
    client.mset({f"user:{i}": "CORRUPTED" for i in range(0, keys, 5)})  # the fault: bad values served from cache
    app = _App(block, keys)
    app.start()
    time.sleep(0.5)
    detected = datetime.now(timezone.utc)
    corrupt_before = app.served_corrupt
    try:
        state = cache_recovery(cache_block=CACHE_BLOCK, incident_detected_at=detected, warmup_window_seconds=30,
                               sample_interval_seconds=1, target_hit_rate=0.9, min_keys=keys,
                               approval_policy="auto", drill=True, return_state=True)
    finally:
        app.stop.set()
        app.join(10)
    flow_run_id = str(state.state_details.flow_run_id)
    report = load_report(flow_run_id)
    report_path = save_report(info.root, flow_run_id)
    values = client.mget([f"user:{i}" for i in range(keys)])
    corrupt_after = sum(1 for v in values if v == "CORRUPTED")
    checks = [
        _check("fault injected: corrupted values served", corrupt_before > 0, f"{corrupt_before} corrupted reads"),
        _check("flow outcome", report.outcome == "Recovered", f"{state.name}: {report.summary}"),
        _check("no corrupted value left", corrupt_after == 0, f"{corrupt_after} of {keys} keys corrupted"),
        _check("cache repopulated by the application", sum(v is not None for v in values) == keys,
               f"{sum(v is not None for v in values)} of {keys} keys"),
        _check("other database untouched", other.get("dr:drill:other-database") == "untouched", "db 0 marker key"),
    ]
    checks += [_check(f"warm-up: {c.name}", c.passed, c.detail) for c in report.checks]
    return _result("cache", report, flow_run_id, report_path, info, checks,
                   {"keys": keys, "warmup": report.facts.get("Warm-up samples (time, keys, hit rate)")})
