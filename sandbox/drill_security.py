"""The security-breach drill on the sandbox, and the blocks the security-breach response uses there.

Blocks saved by :func:`save_blocks` (fixed names, overwritten on every ``dr up`` and every drill):

* ``IamPrincipals`` ``sandbox-iam``, ``SecretsManagerStore`` ``sandbox-secrets`` and
  ``QuarantineSecurityGroup`` ``sandbox-quarantine`` on the sandbox's AWS APIs;
* ``EvidenceVault`` ``sandbox-evidence``: bucket ``dr-sandbox-evidence``, one day of compliance retention;
* ``KubernetesTarget`` ``sandbox-security`` (namespace ``dr-security``).

The drill plants an intruder: an IAM user with a leaked access key, a database role with a
leaked password and an open session, a workload and an instance it controls, a leaked
application secret, and rows it wrote after the breach began. The sandbox's own superuser is
never touched, so the other drills keep working afterwards.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from pydantic import SecretStr

from blocks.aws_security import IamPrincipals, QuarantineSecurityGroup, SecretsManagerStore
from blocks.evidence_vault import EvidenceVault
from blocks.kubernetes import KubernetesTarget
from sandbox import addresses, pgcluster
from sandbox.drillkit import DrillResult, save_report
from sandbox.drillkit import check as _check

IAM_BLOCK, SECRETS_BLOCK, QUARANTINE_BLOCK = "sandbox-iam", "sandbox-secrets", "sandbox-quarantine"
EVIDENCE_BLOCK, KUBE_BLOCK = "sandbox-evidence", "sandbox-security"
EVIDENCE_BUCKET = "dr-sandbox-evidence"
INTRUDER_USER = "drill-intruder-svc"
INTRUDER_ROLE = "drill_app"
WORKLOAD = "drill-web"
HOST_TAG = "drill-intruder-host"
APP_GROUP = "drill-app"
APP_SECRET = "sandbox/drill/api-token"
APP_SECRET_BLOCK = "sandbox-drill-api-token"
CREDENTIAL_PREFIX = "sandbox/rotated"
SECRET_BLOCK_PREFIX = "sandbox-rotated"


def save_blocks(ep) -> None:
    """Save the AWS, evidence and Kubernetes blocks of the security-breach response (overwriting earlier ones)."""
    credentials = ep.aws_credentials()
    IamPrincipals(credentials=credentials).save(IAM_BLOCK, overwrite=True)
    SecretsManagerStore(credentials=credentials).save(SECRETS_BLOCK, overwrite=True)
    QuarantineSecurityGroup(credentials=credentials, group_name="dr-quarantine").save(QUARANTINE_BLOCK, overwrite=True)
    EvidenceVault(bucket=EVIDENCE_BUCKET, credentials=credentials, retention_days=1,
                  prefix="security").save(EVIDENCE_BLOCK, overwrite=True)
    KubernetesTarget(api_server=ep.kube_url, namespace="dr-security", verify_tls=False, environment="sandbox",
                     region="primary", rollout_timeout_seconds=60, poll_interval_seconds=0.5).save(KUBE_BLOCK, overwrite=True)


def _plant_iam(iam_client) -> str:
    """The intruder's IAM user with exactly one fresh (leaked) access key; returns its id."""
    try:
        iam_client.get_user(UserName=INTRUDER_USER)
    except iam_client.exceptions.NoSuchEntityException:
        iam_client.create_user(UserName=INTRUDER_USER)
    for key in iam_client.list_access_keys(UserName=INTRUDER_USER)["AccessKeyMetadata"]:
        iam_client.delete_access_key(UserName=INTRUDER_USER, AccessKeyId=key["AccessKeyId"])
    return iam_client.create_access_key(UserName=INTRUDER_USER)["AccessKey"]["AccessKeyId"]


def _plant_instance(ec2) -> tuple[str, str]:
    """A running instance in the application's security group, whatever an earlier drill left; (instance, group)."""
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"] or ec2.describe_vpcs()["Vpcs"]
    vpc_id = vpc[0]["VpcId"]
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [APP_GROUP]},
                                                   {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
    group = groups[0]["GroupId"] if groups else ec2.create_security_group(
        GroupName=APP_GROUP, Description="drill application", VpcId=vpc_id)["GroupId"]
    found = [i for r in ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": [HOST_TAG]},
                                                        {"Name": "instance-state-name", "Values": ["running"]}])["Reservations"]
             for i in r["Instances"]]
    if found:
        instance = found[0]["InstanceId"]
        for eni in found[0].get("NetworkInterfaces", []):
            ec2.modify_network_interface_attribute(NetworkInterfaceId=eni["NetworkInterfaceId"], Groups=[group])
        ec2.modify_instance_attribute(InstanceId=instance, Groups=[group])
    else:
        instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SecurityGroupIds=[group],
                                     TagSpecifications=[{"ResourceType": "instance",
                                                         "Tags": [{"Key": "Name", "Value": HOST_TAG}]}])["Instances"][0]["InstanceId"]
    return instance, group


def _plant_secret(store: SecretsManagerStore, value: SecretStr) -> None:
    from prefect.blocks.system import Secret

    store.put_value(APP_SECRET, value)
    Secret(value=value).save(APP_SECRET_BLOCK, overwrite=True)


def _plant_workload(kube: KubernetesTarget) -> None:
    kube.delete_network_policy(f"dr-deny-all-{WORKLOAD}")
    if not kube.deployment_exists(WORKLOAD):
        labels = {"app": WORKLOAD}
        kube.create_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": WORKLOAD, "labels": labels},
                            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                                     "template": {"metadata": {"labels": labels},
                                                  "spec": {"containers": [{"name": "web", "image": "registry.sandbox.local/web:2.3"}]}}}})


def run_drill(ep, lay: pgcluster.ClusterLayout, cluster_block: str, objectives_block: str, rows: int,
              reports_root: Path, ui_url: str) -> DrillResult:
    """Plant a breach on the estate described by ``ep``/``lay``, run the response, check what it left."""
    from blocks import PostgresCluster, VerificationQuery
    from flows.security_breach import security_breach as response_flow
    from runbook.evidence import load_report

    save_blocks(ep)
    credentials = ep.aws_credentials()
    cluster = PostgresCluster.load(cluster_block)
    store = SecretsManagerStore.load(SECRETS_BLOCK)
    kube = KubernetesTarget.load(KUBE_BLOCK)

    leaked_key = _plant_iam(credentials.get_client("iam"))
    instance, app_group = _plant_instance(credentials.get_client("ec2"))
    leaked_secret = SecretStr(secrets.token_urlsafe(24))
    _plant_secret(store, leaked_secret)
    _plant_workload(kube)
    leaked_password = SecretStr(secrets.token_urlsafe(24))
    with cluster.connect() as conn:
        conn.execute("SET default_transaction_read_only = off")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (INTRUDER_ROLE,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(INTRUDER_ROLE)))
    cluster.set_password(INTRUDER_ROLE, leaked_password)
    cluster.enable_login(INTRUDER_ROLE)
    pgcluster.psql(lay, lay.primary_port,
                   "DROP TABLE IF EXISTS public.drill_breach_ledger; "
                   "CREATE TABLE public.drill_breach_ledger (id bigint PRIMARY KEY, note text NOT NULL); "
                   f"GRANT SELECT, INSERT ON public.drill_breach_ledger TO {INTRUDER_ROLE}")
    cluster.backup("full")
    time.sleep(1.2)  # a target within the second the backup ended is not recoverable
    # Work committed after the backup and before the breach: the restore must replay it.
    pgcluster.psql(lay, lay.primary_port,
                   f"INSERT INTO public.drill_breach_ledger SELECT g, 'before' FROM generate_series(1, {rows}) g")
    time.sleep(0.3)
    breach = datetime.now(timezone.utc)
    time.sleep(0.3)
    intruder = psycopg.connect(host=cluster.primary.host, port=cluster.primary.port, dbname=cluster.database,
                               user=INTRUDER_ROLE, password=leaked_password.get_secret_value(), autocommit=True)
    intruder.execute(f"INSERT INTO public.drill_breach_ledger SELECT g, 'intruder' FROM generate_series({rows + 1}, {rows + 50}) g")
    detected = datetime.now(timezone.utc)

    try:
        state = response_flow(
            cluster_block=cluster_block, breach_started_at=breach, incident_detected_at=detected,
            indicators={"iam_users": [INTRUDER_USER], "access_key_ids": [leaked_key], "database_roles": [INTRUDER_ROLE],
                        "workloads": [WORKLOAD], "instances": [instance],
                        "secrets": [{"secrets_manager_id": APP_SECRET, "prefect_secret_block": APP_SECRET_BLOCK}]},
            secrets_block=SECRETS_BLOCK, evidence_block=EVIDENCE_BLOCK, iam_block=IAM_BLOCK,
            quarantine_block=QUARANTINE_BLOCK, kubernetes_block=KUBE_BLOCK,
            credential_prefix=CREDENTIAL_PREFIX, secret_block_prefix=SECRET_BLOCK_PREFIX,
            row_count_tables=["public.drill_breach_ledger"],
            verification_queries=[VerificationQuery(name="rows before the breach",
                                                    sql="SELECT count(*) FROM public.drill_breach_ledger", expected=str(rows))],
            objectives_block=objectives_block, approval_policy="auto", drill=True, return_state=True,
        )
        flow_run_id = str(state.state_details.flow_run_id)
        report = load_report(flow_run_id)
        report_path = save_report(reports_root, flow_run_id)
        checks = [_check("flow outcome", report.outcome == "Recovered", f"{state.name}: {report.summary}")]
        checks += _outcome_checks(cluster, store, kube, credentials, report, lay, rows, breach, leaked_key,
                                  leaked_password, leaked_secret, instance, app_group, intruder)
    finally:
        intruder.close()
    if lay.replica_port:
        pgcluster.ensure_replica(lay)  # the replica followed the breached timeline: clone it from the restored primary
    containment = report.facts.get("Containment time (detected -> isolated)", "-")
    return DrillResult(
        scenario="security-breach",
        passed=all(c["passed"] for c in checks),
        rto_seconds=report.rto_seconds,
        rto_objective_seconds=report.rto_objective_seconds,
        rpo_seconds=report.rpo_seconds,
        rpo_objective_seconds=report.rpo_objective_seconds,
        flow_run_id=flow_run_id,
        outcome=report.outcome,
        report=str(report_path),
        ui_url=f"{ui_url}/runs/flow-run/{flow_run_id}",
        checks=checks,
        extra={"containment_seconds": float(containment.removesuffix(" s")) if containment != "-" else None,
               "evidence_manifest_sha256": report.facts.get("Evidence manifest sha256"),
               "evidence_location": report.facts.get("Evidence location")},
    )


def _outcome_checks(cluster, store, kube, credentials, report, lay, rows, breach, leaked_key, leaked_password,
                    leaked_secret, instance, app_group, intruder) -> list[dict]:
    iam = IamPrincipals(credentials=credentials)
    checks = []
    keys = {k.access_key_id: k.status for k in iam.access_keys(INTRUDER_USER)}
    checks.append(_check("leaked access key inactive", keys.get(leaked_key, "deleted") != "Active",
                         f"{leaked_key}: {keys.get(leaked_key, 'deleted')}"))
    if store.exists(f"{CREDENTIAL_PREFIX}/iam/{INTRUDER_USER}"):
        stored = store.current_json(f"{CREDENTIAL_PREFIX}/iam/{INTRUDER_USER}")
        new_id = stored["access_key_id"].get_secret_value()
        arn = iam.caller_arn(new_id, stored["secret_access_key"]) if keys.get(new_id) == "Active" else "-"
        checks.append(_check("new access key active and attributed to the user", arn.endswith(f"/{INTRUDER_USER}"),
                             f"{new_id}: {keys.get(new_id)}; caller {arn}"))
    old_fails = not cluster.can_login(INTRUDER_ROLE, leaked_password)
    checks.append(_check("leaked database password refused", old_fails, f"role {INTRUDER_ROLE}"))
    role_secret = f"{CREDENTIAL_PREFIX}/postgres/{INTRUDER_ROLE}"
    new_works = store.exists(role_secret) and cluster.can_login(INTRUDER_ROLE, store.current_value(role_secret))
    checks.append(_check("rotated database password works", new_works, f"password in {role_secret}"))
    try:
        intruder.execute("SELECT 1")
        ended = False
    except psycopg.Error:
        ended = True
    checks.append(_check("intruder's database session ended", ended, f"session of {INTRUDER_ROLE}"))
    rotated = store.current_value(APP_SECRET).get_secret_value() != leaked_secret.get_secret_value()
    checks.append(_check("leaked application secret replaced", rotated, APP_SECRET))
    evidence = [c for c in report.checks if c.stage == "evidence"]
    checks.append(_check("evidence locked and verified", bool(evidence) and all(c.passed for c in evidence),
                         f"{report.facts.get('Evidence location')} manifest sha256 {report.facts.get('Evidence manifest sha256')}"))
    target = report.recovery_target
    checks.append(_check("restore point before the breach", bool(target) and datetime.fromisoformat(target) < breach,
                         f"target {target or '-'}; breach {breach.isoformat()}"))
    if report.outcome == "Recovered":
        counts = pgcluster.psql(lay, lay.primary_port,
                                "SELECT count(*) FILTER (WHERE note = 'before') || ',' || count(*) FILTER (WHERE note = 'intruder') "
                                "FROM public.drill_breach_ledger")
        checks.append(_check("rows before the breach back, intruder's rows gone", counts == f"{rows},0",
                             f"before,intruder = {counts}"))
    policy = kube.get_network_policy(f"dr-deny-all-{WORKLOAD}")
    checks.append(_check("workload isolated by a deny-all NetworkPolicy", policy is not None, f"dr-deny-all-{WORKLOAD}"))
    groups = QuarantineSecurityGroup(credentials=credentials).instance_groups(instance)
    checks.append(_check("instance quarantined", app_group not in groups and len(groups) == 1, f"{instance}: {groups}"))
    checks.append(_check("RTO within objective", bool(report.rto_met), f"{report.rto_seconds} s of {report.rto_objective_seconds} s"))
    checks.append(_check("RPO within objective", bool(report.rpo_met), f"{report.rpo_seconds} s of {report.rpo_objective_seconds} s"))
    return checks


def security_breach(rows: int = 10_000) -> DrillResult:
    """Plant a compromised key, role, workload, instance and secret on the sandbox; contain, rotate, restore."""
    from sandbox.services import endpoints

    ep = endpoints()
    info = addresses.info()
    return run_drill(ep, addresses.layout(), addresses.CLUSTER_BLOCK, addresses.OBJECTIVES_BLOCK, rows, info.root, info.ui_url)
