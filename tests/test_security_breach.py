"""The security-breach response against real PostgreSQL and pgBackRest, moto's server (IAM, Secrets
Manager, EC2, S3 object lock), the Kubernetes emulator and a Prefect server.

Bad inputs run first, on an estate of their own, and must leave it exactly as planted; then one
full response runs on another planted estate and every later test inspects its outcome.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
import pytest
from botocore.exceptions import ClientError
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from pydantic import SecretStr

from blocks import VerificationQuery
from fixtures_security import AppWriter, BreachedEstate, breach_window, kube_target, plant_breach
from flows.security_breach import security_breach
from sandbox import pgcluster
from runbook.evidence import load_report, render_markdown


def run(estate: BreachedEstate, **params):
    return security_breach(**estate.params(**params), return_state=True)


def current_secret(estate: BreachedEstate, secret_id: str) -> str:
    sm = estate.aws.get_client("secretsmanager")
    return sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"]


def secret_block_value(name: str) -> str:
    value = Secret.load(name).value.get_secret_value()
    return value if isinstance(value, str) else json.dumps(value)


def role_secret_id(estate: BreachedEstate) -> str:
    return f"dr-tests/{estate.uid}/postgres/{estate.role}"


def key_secret_id(estate: BreachedEstate) -> str:
    return f"dr-tests/{estate.uid}/iam/{estate.user}"


def assert_untouched(estate: BreachedEstate) -> None:
    """Nothing the response would change has changed."""
    keys = estate.aws.get_client("iam").list_access_keys(UserName=estate.user)["AccessKeyMetadata"]
    assert [(k["AccessKeyId"], k["Status"]) for k in keys] == [(estate.old_key_id, "Active")]
    assert estate.cluster.can_login(estate.role, SecretStr(estate.old_password))
    assert estate.sessions[0].execute("SELECT 1").fetchone() == (1,)  # the intruder's session is still open
    from blocks.aws_security import QuarantineSecurityGroup

    assert QuarantineSecurityGroup(credentials=estate.aws).instance_groups(estate.instance_id) == estate.original_groups
    assert estate.kube.get_network_policy(f"dr-deny-all-{estate.workload}") is None
    with pytest.raises(ClientError):
        estate.aws.get_client("s3").head_bucket(Bucket=estate.bucket)
    assert current_secret(estate, estate.secret_id) == estate.old_secret
    assert secret_block_value(estate.secret_block) == estate.old_secret
    sm = estate.aws.get_client("secretsmanager")
    assert not [s for s in sm.list_secrets()["SecretList"] if s["Name"].startswith(f"dr-tests/{estate.uid}/")]


def test_known_good_is_the_newest_clean_backup_ending_before_the_breach():
    from blocks.errors import InvalidInput
    from blocks.pgbackrest import BackupSet
    from tasks.forensics import known_good_from

    breach = datetime.fromisoformat("2026-03-01T12:00:00+00:00")

    def backup(label, stop_offset_s, error=False):
        stop = breach + timedelta(seconds=stop_offset_s)
        return BackupSet(label, "full", stop - timedelta(minutes=1), stop, error, 1)

    sets = [backup("old", -7200), backup("good", -600), backup("broken", -60, error=True), backup("edge", -0.5),
            backup("after", 300)]
    chosen = known_good_from(sets, breach)
    assert chosen.backup_label == "good" and chosen.target < breach
    with pytest.raises(InvalidInput, match="no known-good backup before the breach start"):
        known_good_from([backup("after", 300), backup("broken", -60, error=True)], breach)


@pytest.fixture(scope="module")
def untouched(breach_cluster, breach_aws, kube_server) -> BreachedEstate:
    return plant_breach(breach_cluster, breach_aws, kube_target(kube_server))


def _bad_inputs(estate: BreachedEstate) -> dict[str, tuple[dict, str]]:
    now = datetime.now().astimezone()
    first_backup = estate.cluster.backups()[0]
    return {
        "breach time in the future": (dict(breach_started_at=now + timedelta(hours=1)), "in the future"),
        "naive breach time": (dict(breach_started_at=datetime.now() - timedelta(minutes=5)), "no time zone"),
        "unknown principal": (dict(breach_started_at=now - timedelta(minutes=5),
                                   indicators=estate.indicators(iam_users=["nobody-here"], access_key_ids=[])),
                              "'nobody-here' is not an IAM user"),
        "unknown database role": (dict(breach_started_at=now - timedelta(minutes=5),
                                       indicators=estate.indicators(database_roles=["no_such_role"])),
                                  "'no_such_role' does not exist"),
        "unknown workload": (dict(breach_started_at=now - timedelta(minutes=5),
                                  indicators=estate.indicators(workloads=["ghost"])), "compromised workload 'ghost'"),
        "no backup before the breach": (dict(breach_started_at=first_backup.started_at - timedelta(seconds=30)),
                                        "no known-good backup before the breach start"),
        "workloads mapping to one name": (dict(breach_started_at=now - timedelta(minutes=5),
                                               indicators=estate.indicators(workloads=[estate.workload,
                                                                                       estate.workload.upper()])),
                                          "would both use the NetworkPolicy"),
        "unknown kubernetes kind": (dict(breach_started_at=now - timedelta(minutes=5),
                                         kubernetes_kinds=["deployments", "secretz"]),
                                    "kubernetes_kinds=['deployments', 'secretz'] (item 1 'secretz': not a known value)"),
        "revoking the response's own key": (dict(breach_started_at=now - timedelta(minutes=5),
                                                 iam_block=_iam_block_signing_with(estate, estate.old_key_id)),
                                            f"access key {estate.old_key_id} is compromised and is the key iam_block runs with"),
    }


def _iam_block_signing_with(estate: BreachedEstate, key_id: str) -> str:
    from blocks.aws_security import IamPrincipals

    name = f"iam-own-{estate.uid}"
    creds = estate.aws.model_copy(update={"aws_access_key_id": key_id})
    IamPrincipals(credentials=creds).save(name, overwrite=True)
    return name


@pytest.mark.parametrize("case", ["breach time in the future", "naive breach time", "unknown principal",
                                  "unknown database role", "unknown workload",
                                  "no backup before the breach", "workloads mapping to one name",
                                  "unknown kubernetes kind", "revoking the response's own key"])
def test_bad_input_is_refused_before_any_change(untouched, case):
    params, expected = _bad_inputs(untouched)[case]
    state = run(untouched, **params)
    assert state.is_failed()
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Refused"
    assert expected in report.summary, report.summary
    assert_untouched(untouched)


def test_dry_run_records_every_change_and_makes_none(untouched):
    state = run(untouched, breach_started_at=datetime.now().astimezone() - timedelta(seconds=1), restore_database=False,
                dry_run=True)
    assert state.name == "DryRun"
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "DryRun", report.summary
    plan = "\n".join(report.plan)
    assert f"access key {untouched.old_key_id} Active -> Inactive" in plan
    assert f"PostgreSQL role {untouched.role}: LOGIN -> NOLOGIN, 1 open session(s) recorded and ended" in plan
    assert f"security groups {untouched.original_groups} -> [quarantine-{untouched.uid}]" in plan
    assert f"no NetworkPolicy dr-deny-all-{untouched.workload} -> deny-all" in plan
    assert_untouched(untouched)


@dataclass
class Response:
    estate: BreachedEstate
    state: object
    report: object
    breach: datetime
    detected: datetime
    python_logs: list[str]
    writer: AppWriter


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def response(breach_cluster, breach_aws, kube_server) -> Response:
    """One full response to a planted breach, with every log line Python emitted during it."""
    estate = plant_breach(breach_cluster, breach_aws, kube_target(kube_server))
    # Every statement the response sends to the primary lands in its server log, which the leak check reads.
    pgcluster.psql(estate.layout, estate.layout.primary_port, "ALTER SYSTEM SET log_statement = 'all'")
    pgcluster.psql(estate.layout, estate.layout.primary_port, "SELECT pg_reload_conf()")
    breach, detected = breach_window(estate.layout)
    estate.cluster.backup("full")  # taken after the breach began: it holds the intruder's rows and must not be chosen
    writer = AppWriter(estate.layout, estate.uid)  # an application that keeps writing through the response
    writer.start()
    collect = _Collect()
    watched = [logging.getLogger(n) for n in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")]
    levels = [lg.level for lg in watched]
    for lg in watched[2:]:
        lg.setLevel(logging.DEBUG)
    for lg in watched:
        lg.addHandler(collect)
    try:
        state = run(estate, breach_started_at=breach, incident_detected_at=detected, row_count_tables=["ledger"],
                    verification_queries=[VerificationQuery(name="pre-breach rows", sql="SELECT count(*) FROM ledger",
                                                            expected="200")])
    finally:
        writer.stop()
        for lg, level in zip(watched, levels, strict=True):
            lg.removeHandler(collect)
            lg.setLevel(level)
    report = load_report(state.state_details.flow_run_id)
    return Response(estate, state, report, breach, detected, collect.lines, writer)


def test_response_recovers_and_reports_containment(response):
    report = response.report
    assert response.state.name == "Recovered", report.summary
    containment = report.facts["Containment time (detected -> isolated)"]
    assert float(containment.removesuffix(" s")) > 0
    markdown = render_markdown(report)
    assert "Containment time (detected -> isolated)" in markdown and report.facts["Evidence manifest sha256"] in markdown
    assert report.rto_seconds is not None and report.rpo_seconds is not None
    assert [a.policy for a in report.approvals] == ["auto (drill)"]
    assert not report.failed_critical()
    assert any("supervisory authority" in item for item in report.action_items)


def test_compromised_key_is_inactive_and_the_new_key_works(response):
    estate = response.estate
    keys = {k["AccessKeyId"]: k["Status"]
            for k in estate.aws.get_client("iam").list_access_keys(UserName=estate.user)["AccessKeyMetadata"]}
    assert keys[estate.old_key_id] == "Inactive"
    stored = json.loads(current_secret(estate, key_secret_id(estate)))
    assert keys[stored["access_key_id"]] == "Active" and stored["access_key_id"] != estate.old_key_id
    assert json.loads(secret_block_value(f"rotated-{estate.uid}-iam-{estate.user}")) == stored
    from prefect_aws import AwsCredentials

    probe = AwsCredentials(aws_access_key_id=stored["access_key_id"], aws_secret_access_key=stored["secret_access_key"],
                           region_name="us-east-1", aws_client_parameters=estate.aws.aws_client_parameters)
    assert probe.get_client("sts").get_caller_identity()["Arn"].endswith(f":user/{estate.user}")


def test_old_database_password_fails_and_the_new_one_works(response):
    estate = response.estate
    new_password = current_secret(estate, role_secret_id(estate))
    assert secret_block_value(f"rotated-{estate.uid}-postgres-{estate.role.replace('_', '-')}") == new_password
    assert not estate.cluster.can_login(estate.role, SecretStr(estate.old_password))
    assert estate.cluster.can_login(estate.role, SecretStr(new_password))
    assert estate.cluster.password_matches(estate.role, SecretStr(new_password))
    assert not estate.cluster.password_matches(estate.role, SecretStr(estate.old_password))
    check = next(c for c in response.report.checks
                 if c.name == f"password verifier replaced by the stored new password: {estate.role}")
    assert check.passed, check.detail
    with pytest.raises(psycopg.OperationalError):
        estate.sessions[0].execute("SELECT 1")  # the intruder's session was ended


def test_application_secret_rotated_in_both_stores(response):
    from prefect.logging import disable_run_logger

    from blocks.aws_security import SecretsManagerStore
    from tasks.credentials import check_secret_rotated

    estate = response.estate
    value = current_secret(estate, estate.secret_id)
    assert value != estate.old_secret and len(value) >= 32
    assert secret_block_value(estate.secret_block) == value
    store = SecretsManagerStore(credentials=estate.aws)
    with disable_run_logger():
        mine = check_secret_rotated.fn(store, estate.secret_id, estate.secret_block, "v", response.report.incident_id)
        other = check_secret_rotated.fn(store, estate.secret_id, estate.secret_block, "v", "breach-another-incident")
    assert mine.passed and not other.passed, (mine.detail, other.detail)


def test_writes_are_fenced_after_containment_and_the_loss_counts_them(response):
    report, writer = response.report, response.writer
    fenced_at = datetime.fromisoformat(report.facts["Writes fenced at"])
    isolated_at = datetime.fromisoformat(report.facts["Isolated at"])
    assert writer.commits and writer.refusal, f"the application must have written, then been refused: {writer.refusal}"
    assert any(reason in writer.refusal for reason in ("read-only transaction", "too many connections", "terminat")), \
        writer.refusal
    last = max(writer.commits)
    assert last > isolated_at, "an application row committed after containment, before the fence"
    assert last <= fenced_at
    # The reported loss runs from the restore point to the fence: it covers every discarded application row.
    start = report.last_restored_commit or datetime.fromisoformat(report.recovery_target)
    assert start + timedelta(seconds=report.rpo_seconds) >= last
    assert fenced_at.isoformat() in report.facts["Data-loss window"]
    counts = pgcluster.psql(response.estate.layout, response.estate.layout.primary_port,
                            f"SELECT count(*) FROM pg_class WHERE relname = '{writer.table}'")
    assert counts == "0"  # the restore discarded them: they were written after the breach began


def test_evidence_matches_its_manifest_and_cannot_be_deleted_or_overwritten(response):
    estate, facts = response.estate, response.report.facts
    s3 = estate.aws.get_client("s3")
    manifest_uri = facts["Evidence manifest"]
    key = manifest_uri.split(" ")[0].removeprefix(f"s3://{estate.bucket}/")
    version = manifest_uri.split("(version ")[1].rstrip(")")
    body = s3.get_object(Bucket=estate.bucket, Key=key, VersionId=version)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == facts["Evidence manifest sha256"]
    manifest = json.loads(body)
    names = sorted(o["key"].rsplit("/", 1)[-1] for o in manifest["objects"])
    assert names == sorted(["postgres.pgdump", "postgresql-logs.tar.gz", f"kubernetes-{estate.workload}.json",
                            "containment.json"])
    for obj in manifest["objects"] + [{"key": key, "version_id": version}]:
        data = s3.get_object(Bucket=estate.bucket, Key=obj["key"], VersionId=obj["version_id"])["Body"].read()
        if "sha256" in obj:
            assert hashlib.sha256(data).hexdigest() == obj["sha256"]
        head = s3.head_object(Bucket=estate.bucket, Key=obj["key"], VersionId=obj["version_id"])
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"] > response.detected + timedelta(hours=23)
        with pytest.raises(ClientError) as denied:
            s3.delete_object(Bucket=estate.bucket, Key=obj["key"], VersionId=obj["version_id"])
        assert denied.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError) as refused:
            s3.put_object(Bucket=estate.bucket, Key=obj["key"], Body=b"tampered", IfNoneMatch="*")
        assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
        # A plain overwrite only adds a newer version; the locked one stays byte for byte.
        s3.put_object(Bucket=estate.bucket, Key=obj["key"], Body=b"tampered")
        again = s3.get_object(Bucket=estate.bucket, Key=obj["key"], VersionId=obj["version_id"])["Body"].read()
        assert again == data
    containment = json.loads(next(
        s3.get_object(Bucket=estate.bucket, Key=o["key"], VersionId=o["version_id"])["Body"].read()
        for o in manifest["objects"] if o["key"].endswith("containment.json")))
    assert containment["revoked_keys"] == {estate.user: [estate.old_key_id]}
    # The intruder's session was recorded before it was ended.
    [session] = containment["database_sessions_ended"][estate.role]
    assert session["usename"] == estate.role and session["client_addr"] == "127.0.0.1"
    assert f"exfiltrate-{estate.uid}" in session["query"] and session["backend_start"] and session["terminated"]


def test_restore_point_is_before_the_breach_and_drops_the_intruders_rows(response):
    report, estate = response.report, response.estate
    assert datetime.fromisoformat(report.recovery_target) < response.breach
    backups = {b.label: b for b in estate.cluster.backups()}
    chosen = backups[report.candidate["backup_set"]]
    assert chosen.stopped_at < response.breach
    newest_before = max((b for b in backups.values() if b.stopped_at < response.breach), key=lambda b: b.stopped_at)
    assert chosen.label == newest_before.label
    assert any(b.started_at > response.breach for b in backups.values())  # a newer, tainted backup was skipped
    assert chosen.label in report.facts["Known-good restore point"]
    assert report.last_restored_commit is None or report.last_restored_commit < response.breach
    counts = pgcluster.psql(estate.layout, estate.layout.primary_port,
                            "SELECT count(*) FILTER (WHERE note = 'before') || ',' || count(*) FILTER (WHERE note = 'intruder') FROM ledger")
    assert counts == "200,0"


def test_isolation_is_in_place(response):
    estate = response.estate
    policy = estate.kube.get_network_policy(f"dr-deny-all-{estate.workload}")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": estate.workload}
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert not policy["spec"].get("ingress") and not policy["spec"].get("egress")
    ec2 = estate.aws.get_client("ec2")
    instance = ec2.describe_instances(InstanceIds=[estate.instance_id])["Reservations"][0]["Instances"][0]
    groups = [g["GroupId"] for g in instance["SecurityGroups"]]
    quarantine = ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]
    assert [g["GroupName"] for g in quarantine] == [f"quarantine-{estate.uid}"]
    assert quarantine[0]["IpPermissions"] == [] and quarantine[0]["IpPermissionsEgress"] == []
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    assert tags["dr:previous-security-groups"] == ",".join(estate.original_groups)
    hardening = {c.name: c for c in response.report.checks if c.stage == "hardening"}
    assert hardening[f"instance isolated: {estate.instance_id}"].passed
    assert hardening[f"workload isolated: dr-deny-all-{estate.workload}"].passed


def test_no_secret_value_appears_in_logs_artifacts_report_or_errors(response, prefect_api):
    estate = response.estate
    key = json.loads(current_secret(estate, key_secret_id(estate)))
    secrets = {
        "new role password": current_secret(estate, role_secret_id(estate)),
        "new secret access key": key["secret_access_key"],
        "new application secret": current_secret(estate, estate.secret_id),
        "old role password": estate.old_password,
        "old application secret": estate.old_secret,
        "cluster password": estate.layout.password,
    }
    flow_run_id = response.state.state_details.flow_run_id
    texts: list[str] = list(response.python_logs)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
        texts += [log.message for log in logs]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        texts += [json.dumps(a.data, default=str) + str(a.description) for a in artifacts]
        run_ = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))[0]
        texts.append(json.dumps(run_.parameters, default=str))
        texts.append(str(run_.state.message))
        for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))):
            texts.append(str(task_run.state.message if task_run.state else ""))
    texts.append(json.dumps(response.report.model_dump(mode="json")))
    texts.append(render_markdown(response.report))
    texts.append(str(response.state.message))
    s3 = estate.aws.get_client("s3")  # the evidence itself: dump, server logs, Kubernetes objects, containment record
    for obj in s3.list_object_versions(Bucket=estate.bucket).get("Versions", []):
        body = s3.get_object(Bucket=estate.bucket, Key=obj["Key"], VersionId=obj["VersionId"])["Body"].read()
        if body[:2] == b"\x1f\x8b":  # the server logs, as a gzipped tar
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
                body = b"".join(archive.extractfile(m).read() for m in archive.getmembers() if m.isfile())
            assert b"LOG:" in body
        texts.append(body.decode(errors="replace"))
    server_logs = [p.read_text(errors="replace") for p in estate.layout.root.glob("pg/**/*.log")]
    assert any("ALTER ROLE" in text for text in server_logs), "log_statement=all must have recorded the rotation"
    texts += server_logs
    assert len(logs) > 5, "the run's INFO logs must reach the API for this check to mean anything"
    assert len(artifacts) >= 2
    everything = "\n".join(texts)
    leaked = [name for name, value in secrets.items() if value in everything]
    assert not leaked, f"secret values found in the run's output: {leaked}"



def test_a_new_access_key_that_cannot_be_stored_is_deleted_and_a_leftover_one_is_cleaned_up(breach_aws):
    from prefect.logging import disable_run_logger

    from blocks.aws_security import AwsError, IamPrincipals, SecretsManagerStore
    from tasks.credentials import check_only_stored_key_active, replace_access_key

    iam_client, sm = breach_aws.get_client("iam"), breach_aws.get_client("secretsmanager")
    user = f"svc-rot-{uuid.uuid4().hex[:6]}"
    iam_client.create_user(UserName=user)
    old = iam_client.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    iam_client.update_access_key(UserName=user, AccessKeyId=old, Status="Inactive")
    iam, store = IamPrincipals(credentials=breach_aws), SecretsManagerStore(credentials=breach_aws)
    # A replica secret refuses writes in its region: the store there fails right after IAM made the key.
    doomed = f"dr-tests/{user}/doomed"
    sm.create_secret(Name=doomed, SecretString="x", AddReplicaRegions=[{"Region": "us-west-2"}])
    replica_store = SecretsManagerStore(credentials=breach_aws.model_copy(update={"region_name": "us-west-2"}))
    keys = lambda: {k["AccessKeyId"]: k["Status"] for k in iam_client.list_access_keys(UserName=user)["AccessKeyMetadata"]}  # noqa: E731
    with disable_run_logger():
        with pytest.raises(AwsError):
            replace_access_key.fn(iam, replica_store, user, [old], doomed, None, "breach-test", [])
        assert keys() == {old: "Inactive"}, "the key that could not be stored must not survive"
        # A key an interrupted attempt created and never stored is removed before the next one is made.
        leftover = iam_client.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
        secret_id = f"dr-tests/{user}/key"
        rotated = replace_access_key.fn(iam, store, user, [old], secret_id, None, "breach-test", [])
        assert leftover not in keys() and keys()[rotated.version] == "Active"
        assert check_only_stored_key_active.fn(iam, store, user, secret_id, []).passed
        iam_client.delete_access_key(UserName=user, AccessKeyId=old)
        extra = iam_client.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
        failed = check_only_stored_key_active.fn(iam, store, user, secret_id, [])
        assert not failed.passed and extra in failed.detail


def test_storing_the_same_evidence_again_succeeds_and_large_files_go_in_parts(breach_aws, tmp_path):
    from blocks.evidence_vault import EvidenceVault

    vault = EvidenceVault(bucket=f"ev-retry-{uuid.uuid4().hex[:8]}", credentials=breach_aws, retention_days=1,
                          multipart_threshold_bytes=5 * 1024 * 1024)
    big, small = tmp_path / "db.pgdump", tmp_path / "notes.json"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    small.write_text('{"a": 1}')
    created = datetime.now().astimezone()
    until = created + timedelta(days=1)
    first = vault.store("INC-1/run-1", [str(big), str(small)], None, {"flow_run_id": "run-1"}, until, created)
    again = vault.store("INC-1/run-1", [str(big), str(small)], None, {"flow_run_id": "run-1"}, until, created)
    assert again.manifest_version_id == first.manifest_version_id and again.manifest_sha256 == first.manifest_sha256
    checks = vault.verify(again)
    assert len(checks) == 3 and all(c.passed for c in checks), [c.detail for c in checks]
    s3 = breach_aws.get_client("s3")
    head = s3.head_object(Bucket=vault.bucket, Key=f"evidence/INC-1/run-1/{big.name}")
    assert head["ETag"].strip('"').endswith("-2"), "a file over the threshold is uploaded in parts"
    assert head["ObjectLockMode"] == "COMPLIANCE" and head["ContentLength"] == big.stat().st_size
    with pytest.raises(ClientError):
        s3.delete_object(Bucket=vault.bucket, Key=f"evidence/INC-1/run-1/{big.name}", VersionId=head["VersionId"])


def test_quarantine_isolates_every_network_interface(breach_aws):
    from prefect.logging import disable_run_logger

    from blocks.aws_security import QuarantineSecurityGroup
    from tasks.aws import check_quarantine

    ec2 = breach_aws.get_client("ec2")
    uid = uuid.uuid4().hex[:6]
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"]
    web = ec2.create_security_group(GroupName=f"web-{uid}", Description="web", VpcId=vpc)["GroupId"]
    admin = ec2.create_security_group(GroupName=f"admin-{uid}", Description="admin", VpcId=vpc)["GroupId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SecurityGroupIds=[web],
                                 SubnetId=subnet)["Instances"][0]["InstanceId"]
    second = ec2.create_network_interface(SubnetId=subnet, Groups=[admin])["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=second, InstanceId=instance, DeviceIndex=1)
    block = QuarantineSecurityGroup(credentials=breach_aws, group_name=f"quarantine-eni-{uid}")
    done = block.quarantine(instance)
    assert set(done.previous_by_interface) == set(block.interface_groups(instance)) and len(done.previous_by_interface) == 2
    assert admin in done.previous_by_interface[second]
    with disable_run_logger():
        checks = check_quarantine.fn(block, instance, done.group_id)
    assert all(c.passed for c in checks), [c.detail for c in checks]
    for eni in ec2.describe_network_interfaces(NetworkInterfaceIds=[second])["NetworkInterfaces"]:
        assert [g["GroupId"] for g in eni["Groups"]] == [done.group_id]
        assert admin in {t["Key"]: t["Value"] for t in eni["TagSet"]}["dr:previous-security-groups"]
    assert block.quarantine(instance).already


def test_a_secret_that_is_not_a_json_object_is_a_project_error(breach_aws):
    from blocks.aws_security import AwsError, SecretsManagerStore

    name = f"dr-tests/list-{uuid.uuid4().hex[:6]}"
    breach_aws.get_client("secretsmanager").create_secret(Name=name, SecretString="[1, 2]")
    with pytest.raises(AwsError, match="does not hold a JSON object") as raised:
        SecretsManagerStore(credentials=breach_aws).current_json(name)
    assert isinstance(raised.value.__cause__, AttributeError)


def test_a_role_manager_without_superuser_rights_can_set_a_password(breach_cluster):
    name, cluster, layout = breach_cluster
    uid = uuid.uuid4().hex[:6]
    manager, manager_pw, target = f"rolemgr_{uid}", f"m-{uid}-pw", f"victim_{uid}"
    pgcluster.psql(layout, layout.primary_port, f"CREATE ROLE {manager} LOGIN CREATEROLE PASSWORD '{manager_pw}'; "
                                                f"CREATE ROLE {target} LOGIN PASSWORD 'before'")
    limited = cluster.model_copy(update={"user": manager, "password": SecretStr(manager_pw)})
    limited.set_password(target, SecretStr(f"after-{uid}"))
    assert cluster.password_matches(target, SecretStr(f"after-{uid}"))
    assert not cluster.password_matches(target, SecretStr("before"))


def test_replicas_of_the_replaced_primary_are_named_for_re_cloning():
    from blocks import PostgresCluster, PostgresInstance
    from runbook.breach import replica_follow_ups as _replica_follow_ups
    from runbook.evidence import RecoveryReport

    cluster = PostgresCluster(primary=PostgresInstance(port=5432, data_directory="/srv/pg/primary"),
                              replicas=[PostgresInstance(port=5433, data_directory="/srv/pg/replica1")],
                              password="unused", recovery_directory="/srv/pg/recovery")
    now = datetime.now().astimezone()
    report = RecoveryReport(scenario="security-breach", incident_id="i", target="c", severity="P0",
                            incident_detected_at=now, started_at=now, recovery_target="", rto_objective_seconds=0,
                            rpo_objective_seconds=0)
    _replica_follow_ups(report, cluster)
    assert any("/srv/pg/replica1" in item and "re-clone" in item for item in report.action_items)
    [check] = [c for c in report.checks if c.name == "no replica serves data from before the restore"]
    assert not check.passed and not check.critical
