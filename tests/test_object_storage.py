"""Object storage recovery against moto's S3 server, through boto3 and the MinIO SDK."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import boto3
import pytest

from blocks.errors import InvalidInput
from blocks.object_store import ObjectStore
from runbook.evidence import load_report

PREFIX = "docs/"
RUN = uuid.uuid4().hex[:6]


def _name(role: str) -> str:
    return f"dr-{role}-{RUN}"


def _credentials(endpoint: str):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    return AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
                          aws_client_parameters=AwsClientParameters(endpoint_url=endpoint))


def _store(endpoint: str, bucket: str, client: str = "boto3", secondary: str | None = None, **kw) -> ObjectStore:
    return ObjectStore(bucket_name=bucket, credentials=_credentials(endpoint), secondary_bucket_name=secondary,
                       client=client, environment="sandbox", **kw)


RESTORE_BUCKETS = ("boto3", "minio", "dry", "flow", "refuse")


@pytest.fixture(scope="module")
def history(moto_endpoint):
    """Versioned buckets with the same history around one time T; returns (endpoint, T, s3 client)."""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    buckets = [_name(role) for role in RESTORE_BUCKETS]
    for bucket in [*buckets, _name("conc")]:
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for bucket in buckets:
        for key in "abcde":
            s3.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=f"{key} as of T".encode())
        s3.put_object(Bucket=bucket, Key="other/x", Body=b"outside the prefix")
    for i in range(60):
        s3.put_object(Bucket=_name("conc"), Key=f"{PREFIX}{i:03d}", Body=b"good")
    time.sleep(1.1)  # S3 records whole seconds: T sits in a second of its own
    as_of = datetime.now(timezone.utc)
    time.sleep(1.1)
    for bucket in buckets:
        s3.put_object(Bucket=bucket, Key=f"{PREFIX}a", Body=b"a overwritten after T")
        s3.delete_object(Bucket=bucket, Key=f"{PREFIX}b")
        s3.put_object(Bucket=bucket, Key=f"{PREFIX}c", Body=b"c overwritten after T")
        s3.delete_object(Bucket=bucket, Key=f"{PREFIX}c")
        s3.put_object(Bucket=bucket, Key=f"{PREFIX}new", Body=b"created after T")
        s3.put_object(Bucket=bucket, Key="other/x", Body=b"outside, changed after T")
    for i in range(60):
        s3.put_object(Bucket=_name("conc"), Key=f"{PREFIX}{i:03d}", Body=b"bad")
    return moto_endpoint, as_of, s3


def _current(s3, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _version_count(s3, bucket: str) -> int:
    answer = s3.list_object_versions(Bucket=bucket)
    return len(answer.get("Versions", [])) + len(answer.get("DeleteMarkers", []))


EXPECTED_AFTER_RESTORE = {f"{PREFIX}{k}": f"{k} as of T".encode() for k in "abcde"} | {
    "other/x": b"outside, changed after T"}


@pytest.mark.parametrize("client", ["boto3", "minio"])
def test_restore_prefix_brings_back_deleted_and_overwritten_objects(history, client):
    endpoint, as_of, s3 = history
    bucket = _name(client)
    store = _store(endpoint, bucket, client)
    versions_before = _version_count(s3, bucket)
    plan = store.plan_restore(PREFIX, as_of)
    assert {c.key: c.action for c in plan.changes} == {
        f"{PREFIX}a": "restore", f"{PREFIX}b": "undelete", f"{PREFIX}c": "undelete", f"{PREFIX}new": "hide"}
    assert plan.keys_examined == 6
    result = store.apply_restore(plan)
    assert result.applied == 4 and not result.failed
    assert _current(s3, bucket) == EXPECTED_AFTER_RESTORE
    # nothing destroyed: four new versions or markers, the object created after T is still in the history
    assert _version_count(s3, bucket) == versions_before + 4
    kept = s3.list_object_versions(Bucket=bucket, Prefix=f"{PREFIX}new")["Versions"]
    assert s3.get_object(Bucket=bucket, Key=f"{PREFIX}new", VersionId=kept[0]["VersionId"])["Body"].read() == \
        b"created after T"
    assert store.plan_restore(PREFIX, as_of).changes == []  # a repeated restore does nothing twice
    check = store.verify_readable([f"{PREFIX}a", f"{PREFIX}b"])
    assert check.passed and check.checked == 2


def test_apply_is_bounded_by_max_workers(history):
    endpoint, as_of, s3 = history
    store = _store(endpoint, _name("conc"), max_workers=32)
    plan = store.plan_restore(PREFIX, as_of)
    assert len(plan.changes) == 60
    result = store.apply_restore(plan, max_workers=4)
    assert result.max_workers == 4 and 2 <= result.peak_in_flight <= 4
    assert set(_current(s3, _name("conc")).values()) == {b"good"}


def test_replica_completeness_lists_missing_and_stale(moto_endpoint):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    primary, replica = _name("primary"), _name("replica")
    for bucket in (primary, replica):
        s3.create_bucket(Bucket=bucket)
    for i in range(10):
        s3.put_object(Bucket=primary, Key=f"{PREFIX}{i}", Body=f"object {i}".encode())
        if i not in (3, 7):
            s3.put_object(Bucket=replica, Key=f"{PREFIX}{i}", Body=f"object {i}".encode())
    s3.put_object(Bucket=replica, Key=f"{PREFIX}5", Body=b"object 5 from an older write")  # same size, other etag
    s3.put_object(Bucket=replica, Key=f"{PREFIX}6", Body=b"6")  # other size
    s3.put_object(Bucket=replica, Key=f"{PREFIX}only-here", Body=b"x")
    for client in ("boto3", "minio"):
        comparison = _store(moto_endpoint, primary, client, secondary=replica).compare_replica(PREFIX)
        assert comparison.checked == 10
        assert comparison.missing == [f"{PREFIX}3", f"{PREFIX}7"]
        assert [s.key for s in comparison.stale] == [f"{PREFIX}5", f"{PREFIX}6"]
        assert comparison.extra == [f"{PREFIX}only-here"]
        assert not comparison.complete and comparison.oldest_unreplicated is not None


def test_minio_credentials_round_trip_through_a_saved_block(moto_endpoint, prefect_api):
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    bucket = _name("minio-creds")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k/1", Body=b"one")
    name = f"store-{uuid.uuid4().hex[:8]}"
    ObjectStore(bucket_name=bucket, client="minio", secondary_bucket_name=bucket, credentials=MinIOCredentials(
        minio_root_user="testing", minio_root_password="testing", region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint))).save(name)
    loaded = ObjectStore.load(name)
    assert isinstance(loaded.credentials, MinIOCredentials)
    assert loaded.credentials.minio_root_password.get_secret_value() == "testing"
    assert loaded.replica_endpoint == moto_endpoint
    assert loaded.compare_replica("k/").complete
    assert loaded.verify_readable(["k/1"], "secondary", {"k/1": (3, None)}).passed


def test_verify_replica_flow_reports_an_incomplete_replica(moto_endpoint, prefect_api):
    from flows.object_storage_recovery import object_storage_recovery

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    primary, replica = _name("vp"), _name("vr")
    for bucket in (primary, replica):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=primary, Key="p/1", Body=b"1")
    s3.put_object(Bucket=primary, Key="p/2", Body=b"2")
    s3.put_object(Bucket=replica, Key="p/1", Body=b"1")
    name = f"store-{uuid.uuid4().hex[:8]}"
    _store(moto_endpoint, primary, "minio", secondary=replica).save(name)
    state = object_storage_recovery(store_block=name, mode="verify-replica", prefix="p/",
                                    incident_detected_at=datetime.now(timezone.utc), return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "ReplicaIncomplete" and state.is_failed()
    assert report.facts["Missing in the replica"] == ["p/2"]
    assert report.facts["run_kind"] == "assurance"
    assert {c.name: c.passed for c in report.checks} == {"no object missing in the replica": False,
                                                         "no stale object in the replica": True}


def test_dry_run_lists_every_change_and_changes_nothing(history, prefect_api):
    from flows.object_storage_recovery import object_storage_recovery

    endpoint, as_of, s3 = history
    bucket = _name("dry")
    name = f"store-{uuid.uuid4().hex[:8]}"
    _store(endpoint, bucket).save(name)
    versions = _version_count(s3, bucket)
    contents = _current(s3, bucket)
    state = object_storage_recovery(store_block=name, mode="restore-prefix", prefix=PREFIX, restore_as_of=as_of,
                                    incident_detected_at=datetime.now(timezone.utc), dry_run=True,
                                    allowed_approvers=["alice"], return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun"
    assert len(report.plan) == 4
    assert [line.split()[:2] for line in report.plan] == [
        ["restore", f"{PREFIX}a:"], ["undelete", f"{PREFIX}b:"], ["undelete", f"{PREFIX}c:"], ["hide", f"{PREFIX}new:"]]
    assert "->" in report.plan[0] and "overwritten" not in report.plan[0]
    assert _version_count(s3, bucket) == versions and _current(s3, bucket) == contents


def test_restore_flow_recovers_the_prefix_with_the_minio_client(history, prefect_api):
    from flows.object_storage_recovery import object_storage_recovery

    endpoint, as_of, s3 = history
    bucket = _name("flow")
    name = f"store-{uuid.uuid4().hex[:8]}"
    _store(endpoint, bucket, "minio").save(name)
    detected = datetime.now(timezone.utc)
    state = object_storage_recovery(store_block=name, mode="restore-prefix", prefix=PREFIX, restore_as_of=as_of,
                                    incident_detected_at=detected, approval_policy="auto", drill=True,
                                    return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "Recovered", report.summary
    assert _current(s3, bucket) == EXPECTED_AFTER_RESTORE
    assert all(c.passed for c in report.checks) and len(report.checks) == 2
    assert report.approvals[0].policy == "auto (drill)"
    assert report.rto_met and report.rpo_seconds == pytest.approx((detected - as_of).total_seconds())


@pytest.mark.parametrize("client", ["boto3", "minio"])
def test_block_refuses_what_cannot_be_restored(history, client):
    endpoint, as_of, s3 = history
    bucket = _name("refuse")
    store = _store(endpoint, bucket, client)
    versions = _version_count(s3, bucket)
    refusals = [
        (lambda: store.plan_restore("", as_of), "restore prefix is empty"),
        (lambda: store.plan_restore(PREFIX, as_of - timedelta(hours=1)), "before the versioning history"),
        (lambda: store.plan_restore(PREFIX, as_of.replace(tzinfo=None)), "has no time zone"),
        (lambda: store.plan_restore(PREFIX, datetime.now(timezone.utc) + timedelta(hours=1)), "in the future"),
        (lambda: store.plan_restore("nothing-here/", as_of), "has no objects"),
        (lambda: _store(endpoint, "no-such-bucket-here", client).require_bucket(), "does not exist"),
        (lambda: _store(endpoint, _name("primary"), client).require_bucket(versioned=True), "versioning"),
        (lambda: store.require_bucket("secondary"), "no secondary bucket"),
    ]
    for call, message in refusals:
        with pytest.raises(InvalidInput, match=message):
            call()
    assert _version_count(s3, bucket) == versions


@pytest.mark.parametrize("change, message", [
    ({"prefix": ""}, "restore prefix is empty"),
    ({"restore_as_of": "an hour before"}, "before the versioning history"),
], ids=["empty-prefix", "before-versioning"])
def test_flow_refuses_bad_inputs_before_any_change(history, prefect_api, change, message):
    from flows.object_storage_recovery import object_storage_recovery

    endpoint, as_of, s3 = history
    bucket = _name("refuse")
    name = f"store-{uuid.uuid4().hex[:8]}"
    _store(endpoint, bucket).save(name)
    if change.get("restore_as_of") == "an hour before":
        change["restore_as_of"] = as_of - timedelta(hours=1)
    versions = _version_count(s3, bucket)
    params = {"store_block": name, "mode": "restore-prefix", "prefix": PREFIX, "restore_as_of": as_of,
              "incident_detected_at": datetime.now(timezone.utc), "approval_policy": "auto", "drill": True} | change
    state = object_storage_recovery(**params, return_state=True)
    assert state.is_failed()
    with pytest.raises(InvalidInput, match=message):
        state.result()
    assert load_report(state.state_details.flow_run_id).outcome == "Refused"
    assert _version_count(s3, bucket) == versions


def test_failover_points_apps_at_the_replica_once(moto_endpoint, kube, prefect_api):
    """The primary is unreachable: dry run changes nothing, the failover repoints and restarts, a re-run after an
    interruption finishes the secret (endpoint and bucket are both checked) and restarts nothing again."""
    from fixtures_kube import seed_deployment
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from flows.object_storage_recovery import FAILOVER_ANNOTATION, object_storage_recovery
    from sandbox.paths import free_port

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    replica = _name("failover")
    s3.create_bucket(Bucket=replica)
    for i in range(5):
        s3.put_object(Bucket=replica, Key=f"up/{i}", Body=f"object {i}".encode())
    dead = f"http://127.0.0.1:{free_port()}"
    store = ObjectStore(
        bucket_name="primary-leads",
        credentials=AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing",
                                   region_name="us-east-1", aws_client_parameters=AwsClientParameters(
                                       endpoint_url=dead, config={"retries": {"max_attempts": 1}})),
        secondary_bucket_name=replica, secondary_credentials=_credentials(moto_endpoint), environment="sandbox",
    )
    store_name, kube_name = f"store-{uuid.uuid4().hex[:8]}", f"kube-{uuid.uuid4().hex[:8]}"
    store.save(store_name)
    seed_deployment(kube, "api", replicas=2)
    kube.set_secret_value("minio", "endpoint", dead)
    kube.set_secret_value("minio", "bucket", "primary-leads")
    kube.save(kube_name)
    params = {"store_block": store_name, "mode": "failover", "prefix": "up/", "kube_block": kube_name,
              "secret_name": "minio", "restart_deployments": ["api"], "rollout_timeout_seconds": 10,
              "approval_policy": "auto", "drill": True}

    dry = object_storage_recovery(**params, incident_detected_at=datetime.now(timezone.utc), dry_run=True,
                                  return_state=True)
    dry_report = load_report(dry.state_details.flow_run_id)
    assert dry.name == "DryRun"
    assert f"secret {kube.namespace}/minio key endpoint: current endpoint -> {moto_endpoint}" in dry_report.plan
    assert kube.read_secret_value("minio", "endpoint").get_secret_value() == dead
    assert moto_endpoint not in str(kube.get_deployment("api"))

    state = object_storage_recovery(**params, incident_detected_at=datetime.now(timezone.utc), return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "FailedOver", report.summary
    assert kube.read_secret_value("minio", "endpoint").get_secret_value() == moto_endpoint
    assert kube.read_secret_value("minio", "bucket").get_secret_value() == replica
    deployment = kube.get_deployment("api")
    restarted = deployment["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
    assert deployment["metadata"]["annotations"][FAILOVER_ANNOTATION] == moto_endpoint
    assert {c.name: c.passed for c in report.checks} == {"applications rolled out": True,
                                                         "replica objects readable": True}
    assert report.facts["Replica"].startswith("not compared: the primary could not be listed")
    assert "run_kind" not in report.facts
    assert report.rto_met

    # An interrupted run left the endpoint switched but the old bucket: the re-run sets the bucket only.
    kube.set_secret_value("minio", "bucket", "primary-leads")
    again = object_storage_recovery(**params, incident_detected_at=datetime.now(timezone.utc), return_state=True)
    again_report = load_report(again.state_details.flow_run_id)
    assert again.name == "FailedOver", again_report.summary
    assert kube.read_secret_value("minio", "bucket").get_secret_value() == replica
    assert again_report.plan[0] == f"secret {kube.namespace}/minio key bucket: current bucket -> {replica}"
    assert not any("key endpoint" in p or "restart" in p for p in again_report.plan)
    assert again_report.approvals  # the secret changes again, so the change is approved again
    assert kube.get_deployment("api")["spec"]["template"]["metadata"]["annotations"][
        "kubectl.kubernetes.io/restartedAt"] == restarted


def _multipart_history(s3, bucket: str) -> tuple[datetime, bytes]:
    """``big/obj`` uploaded in three parts (5, 5 and 1 MiB) before T, overwritten after T; returns (T, content)."""
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    mib = 1024 * 1024
    content = bytes(range(256)) * (11 * mib // 256)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big/obj", ContentType="application/x-model")
    parts = []
    for number, start in enumerate(range(0, len(content), 5 * mib), start=1):
        answer = s3.upload_part(Bucket=bucket, Key="big/obj", UploadId=upload["UploadId"], PartNumber=number,
                                Body=content[start:start + 5 * mib])
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    s3.complete_multipart_upload(Bucket=bucket, Key="big/obj", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": parts})
    assert s3.head_object(Bucket=bucket, Key="big/obj")["ETag"].strip('"').endswith("-3")
    time.sleep(1.1)
    as_of = datetime.now(timezone.utc)
    time.sleep(1.1)
    s3.put_object(Bucket=bucket, Key="big/obj", Body=b"truncated by a bad deploy")
    return as_of, content


@pytest.mark.parametrize("client, threshold_mib", [("boto3", 5), ("minio", 16)],
                         ids=["boto3-multipart-copy", "minio-single-copy"])
def test_restore_of_a_multipart_object_completes_and_a_rerun_adds_no_copy(moto_endpoint, client, threshold_mib):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    bucket = _name(f"mp-{client}")
    as_of, content = _multipart_history(s3, bucket)
    store = _store(moto_endpoint, bucket, client, multipart_copy_threshold_bytes=threshold_mib * 1024 * 1024)

    plan = store.plan_restore("big/", as_of)
    assert [c.action for c in plan.changes] == ["restore"] and plan.changes[0].target_etag.endswith("-3")
    result = store.apply_restore(plan)
    assert result.applied == 1 and not result.failed, result.failed

    head = s3.head_object(Bucket=bucket, Key="big/obj")
    assert s3.get_object(Bucket=bucket, Key="big/obj")["Body"].read() == content
    assert head["ContentType"] == "application/x-model"
    assert head["ETag"].strip('"').endswith("-3") == (client == "boto3")  # above the threshold: copied in parts
    assert head["Metadata"]["dr-content-etag"] == plan.changes[0].target_etag
    assert store.plan_restore("big/", as_of).changes == []  # a re-run copies nothing again
    assert store.verify_readable(["big/obj"], "primary", {"big/obj": (len(content), plan.changes[0].target_etag)}).passed
    assert _version_count(s3, bucket) == 3
