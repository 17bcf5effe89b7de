"""A breached estate for the security-breach response: a PostgreSQL cluster, an AWS account on moto,
a Kubernetes namespace on the emulator, with a compromised IAM key, database role, workload,
instance and application secret planted in it.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx
import psycopg
import pytest

from sandbox import pgcluster
from sandbox.paths import free_port


@dataclass
class BreachedEstate:
    """Names of the saved blocks and of every planted compromised thing, with the old credentials."""

    cluster_block: str
    cluster: object
    layout: pgcluster.ClusterLayout
    aws: object
    kube: object
    blocks: dict[str, str]
    user: str
    old_key_id: str
    role: str
    old_password: str
    workload: str
    instance_id: str
    original_groups: list[str]
    secret_id: str
    secret_block: str
    old_secret: str
    bucket: str
    uid: str
    sessions: list = field(default_factory=list)

    def indicators(self, **overrides) -> dict:
        base = {"iam_users": [self.user], "access_key_ids": [self.old_key_id], "database_roles": [self.role],
                "workloads": [self.workload], "instances": [self.instance_id],
                "secrets": [{"secrets_manager_id": self.secret_id, "prefect_secret_block": self.secret_block}]}
        return {**base, **overrides}

    def params(self, **overrides) -> dict:
        base = dict(cluster_block=self.cluster_block, secrets_block=self.blocks["secrets"],
                    evidence_block=self.blocks["evidence"], iam_block=self.blocks["iam"],
                    quarantine_block=self.blocks["quarantine"], kubernetes_block=self.blocks["kube"],
                    objectives_block=self.blocks["objectives"], credential_prefix=f"dr-tests/{self.uid}",
                    secret_block_prefix=f"rotated-{self.uid}", approval_policy="auto", drill=True,
                    indicators=self.indicators())
        return {**base, **overrides}


@pytest.fixture(scope="module")
def breach_cluster(work_root, prefect_api):
    """A PostgreSQL primary with pgBackRest and its first full backup, saved as a block, for one test module."""
    from blocks import PostgresCluster, PostgresInstance

    root = work_root / f"sec-{uuid.uuid4().hex[:8]}"
    layout = pgcluster.ClusterLayout(root, free_port(), None, "sup3r:secret\\pw")
    pgcluster.build(layout, with_replica=False)
    block = PostgresCluster(
        primary=PostgresInstance(port=layout.primary_port, data_directory=str(layout.primary_dir)),
        password=layout.password, socket_directory=str(layout.socket_dir),
        pgbackrest_config=str(layout.pgbackrest_conf), recovery_directory=str(layout.recovery_dir),
        environment="sandbox",
    )
    name = f"sec-{uuid.uuid4().hex[:8]}"
    block.save(name)
    yield name, block, layout
    pgcluster.stop_all(root)


@pytest.fixture(scope="module")
def breach_aws(moto_endpoint):
    """prefect-aws credentials on a freshly reset moto account, for one test module."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    httpx.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    return AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
                          aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint))


def kube_target(kube_server):
    """A KubernetesTarget on the emulator in a namespace of its own."""
    from blocks.kubernetes import KubernetesTarget

    return KubernetesTarget(api_server=kube_server.url, namespace=f"s-{uuid.uuid4().hex[:10]}", verify_tls=False,
                            environment="sandbox", region="test", request_timeout_seconds=10,
                            rollout_timeout_seconds=10, poll_interval_seconds=0.1)


def plant_breach(cluster_fixture, aws, kube) -> BreachedEstate:
    """Plant a compromised IAM key, database role (with an open session), workload, instance and secret."""
    from prefect.blocks.system import Secret

    from blocks import Objective, RecoveryObjectives
    from blocks.aws_security import IamPrincipals, QuarantineSecurityGroup, SecretsManagerStore
    from blocks.evidence_vault import EvidenceVault
    from fixtures_kube import seed_deployment

    name, cluster, layout = cluster_fixture
    uid = uuid.uuid4().hex[:8]
    user, role, workload = f"svc-{uid}", f"app_{uid}", f"web-{uid}"
    iam = aws.get_client("iam")
    iam.create_user(UserName=user)
    key_id = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    old_password = f"old-{uuid.uuid4().hex}"
    pgcluster.psql(layout, layout.primary_port, f"CREATE ROLE {role} LOGIN PASSWORD '{old_password}'")
    session = psycopg.connect(host="127.0.0.1", port=layout.primary_port, dbname="postgres", user=role,
                              password=old_password, autocommit=True)
    ec2 = aws.get_client("ec2")
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    app_group = ec2.create_security_group(GroupName=f"app-{uid}", Description="app", VpcId=vpc)["GroupId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1,
                                 SecurityGroupIds=[app_group])["Instances"][0]["InstanceId"]
    secret_id, old_secret = f"app/{uid}/api-token", f"tok-{uuid.uuid4().hex}"
    aws.get_client("secretsmanager").create_secret(Name=secret_id, SecretString=old_secret)
    session.execute(f"SELECT 'exfiltrate-{uid}' AS marker")  # what the intruder's session ran last
    secret_block = f"api-token-{uid}"
    Secret(value=old_secret).save(secret_block, overwrite=True)
    seed_deployment(kube, workload, wait=True)

    blocks = {k: f"{k}-{uid}" for k in ("iam", "secrets", "quarantine", "kube", "evidence", "objectives")}
    IamPrincipals(credentials=aws).save(blocks["iam"])
    SecretsManagerStore(credentials=aws).save(blocks["secrets"])
    QuarantineSecurityGroup(credentials=aws, group_name=f"quarantine-{uid}").save(blocks["quarantine"])
    kube.save(blocks["kube"])
    bucket = f"evidence-{uid}"
    EvidenceVault(bucket=bucket, credentials=aws, retention_days=1).save(blocks["evidence"])
    functions = RecoveryObjectives().functions | {"security": Objective(rto_seconds=7200, rpo_seconds=3600, priority="P0")}
    RecoveryObjectives(functions=functions).save(blocks["objectives"])
    return BreachedEstate(name, cluster, layout, aws, kube, blocks, user, key_id, role, old_password, workload,
                          instance, [app_group], secret_id, secret_block, old_secret, bucket, uid, [session])


def breach_window(layout) -> tuple[datetime, datetime]:
    """Commit 'before' rows, start the breach, let the intruder commit 'after' rows; returns (breach start, detected)."""
    time.sleep(1.2)  # a target within the second the backup ended is not recoverable
    pgcluster.psql(layout, layout.primary_port,
                   "CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY, note text NOT NULL);"
                   "INSERT INTO ledger SELECT g, 'before' FROM generate_series(1, 200) g")
    time.sleep(0.3)
    breach = datetime.now(timezone.utc)
    time.sleep(0.3)
    pgcluster.psql(layout, layout.primary_port, "INSERT INTO ledger SELECT g, 'intruder' FROM generate_series(201, 230) g")
    return breach, datetime.now(timezone.utc)


class AppWriter:
    """An application role that keeps committing rows to the primary until the primary refuses it."""

    def __init__(self, layout, uid: str):
        self.layout, self.role, self.password = layout, f"writer_{uid}", f"w-{uuid.uuid4().hex}"
        self.table = f"app_writes_{uid}"
        pgcluster.psql(layout, layout.primary_port,
                       f"CREATE ROLE {self.role} LOGIN PASSWORD '{self.password}'; "
                       f"CREATE TABLE {self.table} (id bigserial PRIMARY KEY, committed_at timestamptz NOT NULL); "
                       f"GRANT INSERT, SELECT ON {self.table} TO {self.role}; "
                       f"GRANT USAGE ON SEQUENCE {self.table}_id_seq TO {self.role}")
        self.commits: list[datetime] = []
        self.refusal: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self):
        return psycopg.connect(host="127.0.0.1", port=self.layout.primary_port, dbname="postgres", user=self.role,
                               password=self.password, autocommit=True, connect_timeout=5)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                conn = conn or self._connect()
                row = conn.execute(f"INSERT INTO {self.table} (committed_at) VALUES (clock_timestamp()) "
                                   "RETURNING committed_at").fetchone()
                self.commits.append(row[0])
            except psycopg.Error as exc:
                if conn is not None and not conn.closed:
                    self.refusal = f"{type(exc).__name__}: {exc}"
                    break
                if conn is not None:
                    conn = None  # ended by the server: a new session must be refused too
                    continue
                self.refusal = f"{type(exc).__name__}: {exc}"
                break
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.commits and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
