"""Secrets around the PostgreSQL processes the worker starts: their environment and the password files."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import psycopg

from conftest import seed_before_after, sql, subprocess_env
from flows.db_corruption import db_corruption

API_KEY = "pnu_worker_api_key_not_for_postgres"
AWS_SECRET = "aws/secret+access/key/not/for/postgres"


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        entries = [e.decode(errors="replace") for e in fh.read().split(b"\0") if e]
    return dict(e.split("=", 1) if "=" in e else (e, "") for e in entries)


def test_a_server_the_flow_starts_does_not_inherit_the_workers_secrets(cluster, monkeypatch):
    name, block, pg = cluster
    monkeypatch.setenv("PREFECT_API_KEY", API_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWORKERONLY")
    monkeypatch.setenv("PGPASSWORD", pg.password)
    target = seed_before_after(pg)
    state = db_corruption(cluster_block=name, recovery_target=target.isoformat(), approval_policy="auto", drill=True,
                          incident_detected_at=datetime.now(timezone.utc), take_backup_after=False, return_state=True)
    assert state.name == "Recovered", state.message
    # The postmaster serving the endpoint now was started by the flow (the restored instance moved in).
    pid = int((pg.primary_dir / "postmaster.pid").read_text().splitlines()[0])
    env = environ_of(pid)
    raw = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
    for secret in (API_KEY, AWS_SECRET, "AKIAWORKERONLY", pg.password):
        assert secret not in raw
    assert not [k for k in env if k.startswith(("PREFECT_", "AWS_", "PGPASS"))], sorted(env)
    assert env.get("HOME") == pwd.getpwnam(block.os_user).pw_dir and env.get("USER") == block.os_user
    assert "PATH" in env


def secrets_dir(block) -> str:
    return os.path.join(tempfile.gettempdir(), f"dr-pipelines-secrets-{block.os_user}")


def password_files(block) -> list[str]:
    folder = secrets_dir(block)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_password_file_left_by_a_killed_run_is_removed_by_the_next(cluster, prefect_api, work_root):
    name, block, pg = cluster
    sql(pg, "CREATE TABLE held (id int)")
    before = set(password_files(block))
    # pg_dump waits for this lock, so the killed worker is caught while its password file exists.
    with psycopg.connect(host="127.0.0.1", port=pg.primary_port, dbname="postgres", user="postgres",
                         password=pg.password, autocommit=False) as locker:
        locker.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        code = ("import sys\nfrom blocks import PostgresCluster\n"
                "PostgresCluster.load(sys.argv[1]).dump_database(sys.argv[2])\n")
        worker = subprocess.Popen([sys.executable, "-c", code, name, str(work_root / f"{name}.dump")],
                                  env=subprocess_env(prefect_api), start_new_session=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        left: list[str] = []
        while time.monotonic() < deadline and worker.poll() is None:
            left = [f for f in password_files(block) if f not in before and f.startswith(f"pgpass-{worker.pid}-")]
            waiting = sql(pg, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                              "AND application_name = 'pg_dump'")
            if left and waiting != "0":
                break
            time.sleep(0.1)
        assert left, worker.communicate(timeout=30)[0] if worker.poll() is not None else "no password file appeared"
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pg_dump die without cleaning up
        worker.wait(timeout=30)
        locker.rollback()

    folder = secrets_dir(block)
    info = os.stat(folder)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == pwd.getpwnam(block.os_user).pw_uid
    leftover = os.path.join(folder, left[0])
    assert os.path.exists(leftover)  # what SIGKILL leaves behind
    assert stat.S_IMODE(os.stat(leftover).st_mode) == 0o600
    assert ":postgres:s3cret" in open(leftover).read()  # the superuser password, escaped for pgpass

    block.dump_database(str(work_root / f"{name}-next.dump"))  # the next run that needs a password file
    assert not os.path.exists(leftover)
    assert [f for f in password_files(block) if f not in before] == []
