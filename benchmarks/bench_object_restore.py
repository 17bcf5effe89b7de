"""Point-in-time restore of an object prefix: ``ObjectStore.apply_restore`` against a plain sequential boto3 loop.

Starts its own moto server (``moto_server``, a separate process), writes ``BENCH_OBJECTS`` objects
(default 10,000) under one prefix of a versioned bucket, takes T, and deletes them all after T. Both
methods then apply the same restore plan (every key: undelete its version of T by ``copy_object``),
one after the other from the same state (the objects are deleted again in between): the plain loop
makes the copies one at a time, ``apply_restore`` with a bounded thread pool (``BENCH_WORKERS``,
default 16). Each is checked to leave every object with its content at T. The plan is built from the
version ids the seeding returned: moto deep-copies every stored version on each listing page, so
timing ``plan_restore``'s listing here would measure moto. Prints ``NAME: ratio=X goal<=Y`` and
``NAME: value=X UNIT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import boto3
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from blocks.object_store import ObjectStore, RestoreChange, RestorePlan  # noqa: E402
from sandbox.paths import free_port  # noqa: E402

OBJECTS = int(os.environ.get("BENCH_OBJECTS", "10000"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "16"))
BUCKET, PREFIX = "bench-restore", "data/"


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def start_moto(port: int) -> subprocess.Popen:
    binary = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto_server did not start within 30 s")


def seed(s3) -> tuple[datetime, dict[str, str]]:
    """Write the objects, take T, delete them all; returns T and each key's version id of T."""
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    keys = [f"{PREFIX}obj-{i:06d}" for i in range(OBJECTS)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        versions = list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=f"good {k}".encode())["VersionId"],
                                 keys))
    time.sleep(1.1)
    as_of = datetime.now(timezone.utc)
    time.sleep(1.1)
    delete_all(s3, keys)
    return as_of, dict(zip(keys, versions, strict=True))


def delete_all(s3, keys: list[str]) -> None:
    """Put a delete marker on every key (batches of 1,000, as DeleteObjects allows)."""
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def undelete_plan(as_of: datetime, versions: dict[str, str]) -> RestorePlan:
    """The plan ``plan_restore`` makes for this state: every key undeleted to its version of T."""
    changes = [RestoreChange(key, "undelete", "(latest delete marker)", True, version, as_of)
               for key, version in sorted(versions.items())]
    return RestorePlan(bucket=BUCKET, prefix=PREFIX, as_of=as_of, keys_examined=len(versions), history_starts=as_of,
                       changes=changes)


def plain_loop(s3, plan) -> int:
    """What an operator's script does with the same plan: one copy_object after the other."""
    for change in plan.changes:
        s3.copy_object(Bucket=plan.bucket, Key=change.key,
                       CopySource={"Bucket": plan.bucket, "Key": change.key, "VersionId": change.target_version_id})
    return len(plan.changes)


def all_good(s3) -> bool:
    """Every object of ``bucket`` holds its content at T (checked by etag)."""
    import hashlib

    wrong = 0
    seen = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
        seen += len(page.get("Contents", []))
        wrong += sum(o["ETag"].strip('"') != hashlib.md5(f"good {o['Key']}".encode()).hexdigest()
                     for o in page.get("Contents", []))
    return wrong == 0 and seen == OBJECTS


def main() -> None:
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    port = free_port()
    moto = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                          region_name="us-east-1")
        log(f"seeding {OBJECTS} objects, T, then deleting them all")
        as_of, versions = seed(s3)
        store = ObjectStore(bucket_name=BUCKET, max_workers=WORKERS, environment="sandbox", credentials=AwsCredentials(
            aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(endpoint_url=endpoint)))

        plan = undelete_plan(as_of, versions)
        sample = store.plan_restore(f"{PREFIX}obj-00000", as_of)  # one listing page: the block agrees with the plan
        if [(c.key, c.action, c.target_version_id) for c in sample.changes] != \
                [(c.key, c.action, c.target_version_id) for c in plan.changes if c.key.startswith(sample.prefix)]:
            raise SystemExit("plan_restore disagrees with the benchmark's plan")
        started = time.perf_counter()
        copied = plain_loop(s3, plan)
        loop_seconds = time.perf_counter() - started
        loop_ok = all_good(s3)
        log(f"plain loop: {copied} copies in {loop_seconds:.1f} s")

        delete_all(s3, list(versions))
        plan = undelete_plan(as_of, versions)
        started = time.perf_counter()
        result = store.apply_restore(plan)
        block_seconds = time.perf_counter() - started
        log(f"ObjectStore.apply_restore: {result.applied} changes in {block_seconds:.1f} s "
            f"(at most {result.peak_in_flight} in flight), {len(result.failed)} failed")

        if result.failed or copied != OBJECTS or not loop_ok or not all_good(s3):
            raise SystemExit(f"restore incomplete: {len(result.failed)} failed, {copied} copied by the loop "
                             f"(loop result {'ok' if loop_ok else 'wrong'})")
        print(f"object_restore_vs_sequential_loop: ratio={block_seconds / loop_seconds:.2f} goal<=0.5 "
              f"(ObjectStore.apply_restore {block_seconds:.1f} s with {WORKERS} workers, plain boto3 loop "
              f"{loop_seconds:.1f} s, {OBJECTS} copies each)")
        print(f"object_restore_throughput: value={OBJECTS / block_seconds:.0f} objects/s "
              f"(sequential loop {OBJECTS / loop_seconds:.0f} objects/s)")
    finally:
        moto.terminate()
        try:
            moto.wait(timeout=10)
        except subprocess.TimeoutExpired:
            moto.kill()


if __name__ == "__main__":
    main()
