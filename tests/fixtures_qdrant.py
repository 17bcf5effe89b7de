"""Vector database for tests: embedded Qdrant in a fresh directory, a PostgreSQL source of truth, a backup bucket."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from sandbox.paths import free_port


PG_BIN = Path(os.environ.get("DR_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_postgres(cmd: list[str], timeout: float = 120) -> None:
    kwargs = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/", **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}")


@pytest.fixture(scope="session")
def vector_source(work_root, prefect_api):
    """A plain PostgreSQL 15 primary holding embedding tables, shared by the session: (block name, block, dir).

    Embedding tables need no backups, so this instance has no archiving (it starts in about a second).
    """
    from blocks import PostgresCluster, PostgresInstance

    root = work_root / f"vec-{uuid.uuid4().hex[:6]}"
    data, sockets = root / "data", root / "sockets"
    for folder in (root, sockets):
        folder.mkdir(parents=True)
        shutil.chown(folder, "postgres", "postgres")
    password = "vec:tor\\pass"
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, "postgres", "postgres")
    _as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "-N",
                  "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
    pwfile.unlink()
    port = free_port()
    with open(data / "postgresql.conf", "a") as fh:
        fh.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sockets}'\n"
                 "fsync = off\nsynchronous_commit = off\nmax_connections = 30\n")
    _as_postgres([str(PG_BIN / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data), "-l", str(root / "pg.log")])
    block = PostgresCluster(primary=PostgresInstance(port=port, data_directory=str(data)), password=password,
                            socket_directory=str(sockets), recovery_directory=str(root / "recovery"),
                            environment="sandbox")
    name = f"vec-{uuid.uuid4().hex[:8]}"
    block.save(name)
    yield name, block, data
    _as_postgres([str(PG_BIN / "pg_ctl"), "stop", "-w", "-m", "immediate", "-D", str(data)])


def seed_embeddings(cluster, table: str, rows: int, dims: int, seed: int = 1) -> np.ndarray:
    """Create ``table`` (id bigint, embedding float4[], payload jsonb) with ``rows`` random unit vectors."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(rows, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with cluster.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding float4[] NOT NULL, payload jsonb)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, embedding, payload) FROM STDIN") as copy:
                for i, vec in enumerate(vectors, 1):
                    copy.write_row((i, vec.tolist(), f'{{"lead": {i}}}'))
    return vectors


@pytest.fixture
def qdrant_dir():
    """A directory for embedded Qdrant storage on tmpfs (embedded Qdrant commits every point to SQLite)."""
    folder = tempfile.mkdtemp(prefix="dr-qdrant-", dir=_fast_tmp())
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _fast_tmp() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture(scope="session")
def qdrant_session(moto_endpoint, prefect_api):
    """One saved embedded QdrantCluster for the session (saving a block with nested blocks costs seconds)."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters
    from prefect_aws.s3 import S3Bucket

    from blocks.qdrant import QdrantCluster

    folder = tempfile.mkdtemp(prefix="dr-qdrant-", dir=_fast_tmp())
    credentials = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
                                 aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint))
    block = QdrantCluster(path=folder, environment="sandbox", backup_prefix="qdrant",
                          backup_bucket=S3Bucket(bucket_name=f"vec-{uuid.uuid4().hex[:8]}", credentials=credentials))
    name = f"qd-{uuid.uuid4().hex[:8]}"
    block.save(name)
    yield name, block
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def qdrant(qdrant_session, aws):
    """The session's embedded QdrantCluster, its versioned backup bucket present on a clean moto: (name, block).

    Tests share the storage directory: each names its collections and aliases uniquely.
    """
    name, block = qdrant_session
    s3 = aws.get_client("s3")
    s3.create_bucket(Bucket=block.backup_bucket.bucket_name)
    s3.put_bucket_versioning(Bucket=block.backup_bucket.bucket_name, VersioningConfiguration={"Status": "Enabled"})
    return name, block
