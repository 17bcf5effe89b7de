"""A self-managed PostgreSQL cluster backed up with pgBackRest, and the verbs recoveries need."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Literal

import psycopg
from psycopg import sql
from prefect.blocks.core import Block
from pydantic import BaseModel, Field, SecretStr

from blocks._pg_replication import ReplicationVerbs
from blocks._pg_roles import RoleVerbs
from blocks._process import chown_to, owned_file_name, private_directory, remove_orphans, run_as, wait_until
from blocks.errors import (
    CommandFailed,
    InvalidInput,
    PostgresError,
    PostgresUnavailable,
)
from blocks.pgbackrest import BackupSet, PgBackRest, format_target_time, lsn_value
from blocks.results import CheckResult

MARKER = "dr_recovery.json"
INCIDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# SQLSTATE classes that may clear on their own: connection exceptions, operator intervention
# (shutdown, crash, cannot connect now), insufficient resources.
TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53")


def classify(exc: psycopg.Error, context: str) -> PostgresError:
    """A project error for a psycopg error: transient only for connection loss and server restarts.

    Authentication failures, unknown databases and cancelled statements are definite.
    """
    state = exc.sqlstate
    message = f"{context}: {str(exc).strip()}"
    if state is None and isinstance(exc, psycopg.OperationalError):
        return PostgresUnavailable(message)  # no answer from a server at all
    if state and state.startswith(TRANSIENT_SQLSTATES):
        return PostgresUnavailable(message)
    return PostgresError(message)


QUERY_NAME = "dr_check_query"


def _primary_message(exc: psycopg.Error) -> str:
    """The server's one-line message of ``exc`` (without the statement or its context)."""
    message = getattr(exc.diag, "message_primary", None) if exc.diag else None
    return message or (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _plan_nodes(plan) -> set[str]:
    """Node types anywhere in an ``EXPLAIN (FORMAT JSON)`` plan."""
    found: set[str] = set()
    stack = [plan]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "Node Type" in item:
                found.add(item["Node Type"])
            stack.extend(v for v in item.values() if isinstance(v, (list, dict)))
    return found


def free_local_port() -> int:
    """A TCP port nothing listens on at the moment, for a restored instance."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What a point-in-time restore writes into postgresql.auto.conf, removed again at promotion.
RECOVERY_SETTINGS = (
    "restore_command", "recovery_target", "recovery_target_time", "recovery_target_name", "recovery_target_lsn",
    "recovery_target_xid", "recovery_target_inclusive", "recovery_target_action", "recovery_target_timeline",
)


class PostgresInstance(BaseModel):
    """One PostgreSQL server: where it listens and, when it runs on this host, its data directory."""

    host: str = Field(default="127.0.0.1", description="Host name or address the server listens on.")
    port: int = Field(default=5432, ge=1, le=65535, description="TCP port.")
    data_directory: str | None = Field(
        default=None, description="Data directory on this host; needed to restore, promote or stop it."
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class VerificationQuery(BaseModel):
    """A sentinel query run against a restored instance; its single value is compared to ``expected``."""

    name: str = Field(description="Short name shown in the evidence.")
    sql: str = Field(
        description="ONE read-only statement returning one row with one column ('%' is an ordinary character). "
        "It runs in a READ ONLY transaction as the cluster's query_role, bounded by its query_timeout_seconds, "
        "and is parsed and planned on the primary before any change."
    )
    expected: str | None = Field(
        default=None, description="The value, as text, the query must return; empty to only record it."
    )
    database: str | None = Field(default=None, description="Database to run it in; defaults to the cluster's.")


@dataclass(frozen=True)
class Candidate:
    """A restored instance standing beside the primary, waiting for verification and promotion."""

    incident_id: str
    data_directory: str
    port: int
    target_type: str
    target: str
    backup_set: str
    reused: bool = False


@dataclass(frozen=True)
class Promotion:
    """What promotion did: which data directory serves the endpoint now, where the old one went."""

    endpoint: str
    data_directory: str
    old_primary_aside: str | None
    already_promoted: bool
    promoted_at: str


class PostgresCluster(ReplicationVerbs, RoleVerbs, Block):
    """A PostgreSQL primary with streaming replicas, backed up by pgBackRest.

    The primary is the instance at the address applications use: promotion puts the restored
    instance behind that address and moves the old data directory aside.

    Example:
        ```python
        from blocks import PostgresCluster
        cluster = PostgresCluster.load("sandbox")
        window = cluster.recoverable_window()
        ```
    """

    _block_type_name = "Postgres Cluster"
    _block_type_slug = "postgres-cluster"
    _logo_url = "https://www.postgresql.org/media/img/about/press/elephant.png"
    _description = "A self-managed PostgreSQL cluster with pgBackRest backups: primary, replicas, credentials."

    primary: PostgresInstance = Field(description="The primary, at the address applications connect to.")
    replicas: list[PostgresInstance] = Field(default_factory=list, description="Streaming replicas.")
    database: str = Field(default="postgres", description="Database used for checks and sentinel queries.")
    user: str = Field(default="postgres", description="Role with superuser rights used for recovery.")
    password: SecretStr = Field(description="Password of that role.")
    os_user: str = Field(default="postgres", description="Operating-system user that owns the data directories.")
    bin_dir: str = Field(default="/usr/lib/postgresql/15/bin", description="Directory of pg_ctl, pg_amcheck, ...")
    socket_directory: str | None = Field(default=None, description="unix_socket_directories of the instances.")
    pgbackrest_stanza: str = Field(default="main", description="pgBackRest stanza of this cluster.")
    pgbackrest_config: str = Field(default="/etc/pgbackrest/pgbackrest.conf", description="pgbackrest.conf path.")
    recovery_directory: str = Field(
        description="Directory on the primary's host where restored candidates are created."
    )
    environment: Literal["production", "staging", "sandbox"] = Field(
        default="production",
        description="Drills may approve themselves ('auto' policy) only outside production.",
    )
    connect_timeout_seconds: int = Field(default=5, ge=1, description="Connect timeout for every session.")
    statement_timeout_seconds: int = Field(default=300, ge=1, description="Statement timeout for every session.")
    start_timeout_seconds: int = Field(default=600, ge=5, description="Upper bound for start, recovery and stop.")
    query_timeout_seconds: int = Field(
        default=60, ge=1, le=86400,
        description="Statement timeout of each sentinel, verification, row-count and smoke query.",
    )
    query_role: str | None = Field(
        default="pg_read_all_data",
        description="Role those queries run as (SET ROLE inside their read-only transaction); the default may read "
        "every table and nothing else. Empty: run them as `user`, the superuser.",
    )
    application_roles: list[str] = Field(
        default_factory=list,
        description="Roles applications connect as. After a recovery each must be able to log in to `database` and "
        "write, or the run does not end Recovered. Empty: every non-superuser LOGIN role that owns or may write a "
        "table of `database`.",
    )

    # ------------------------------------------------------------------ plumbing

    @property
    def pgbackrest(self) -> PgBackRest:
        return PgBackRest(stanza=self.pgbackrest_stanza, config=self.pgbackrest_config, os_user=self.os_user)

    def _bin(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    def _instance(self, port: int | None) -> PostgresInstance:
        """The known instance on ``port`` (its own host); an unlisted port is a local instance beside the primary."""
        if port is None or port == self.primary.port:
            return self.primary
        for inst in self.replicas:
            if inst.port == port:
                return inst
        return PostgresInstance(host=self.primary.host, port=port)

    @contextmanager
    def connect(self, port: int | None = None, dbname: str | None = None) -> Iterator[psycopg.Connection]:
        """An autocommit session on the primary (or on the local instance at ``port``), bounded by timeouts."""
        inst = self._instance(port)
        try:
            conn = psycopg.connect(
                host=inst.host,
                port=inst.port,
                dbname=dbname or self.database,
                user=self.user,
                password=self.password.get_secret_value(),
                connect_timeout=self.connect_timeout_seconds,
                options=f"-c statement_timeout={self.statement_timeout_seconds * 1000}",
                autocommit=True,
                application_name="dr-pipelines",
            )
        except psycopg.OperationalError as exc:
            raise classify(exc, f"cannot connect to PostgreSQL at {inst.address}") from exc
        try:
            yield conn
        finally:
            conn.close()

    def query_one(self, statement: str, params: tuple = (), port: int | None = None, dbname: str | None = None):
        """The first column of the first row of ``statement``."""
        with self.connect(port, dbname) as conn:
            try:
                cur = conn.execute(statement, params)
                row = cur.fetchone() if cur.description else None
            except psycopg.Error as exc:
                raise classify(exc, f"query failed on {self._instance(port).address}") from exc
        return None if row is None else row[0]

    def is_reachable(self, port: int | None = None) -> bool:
        """True when the instance accepts a session."""
        try:
            self.query_one("SELECT 1", port=port)
        except PostgresUnavailable:
            return False
        return True

    @contextmanager
    def _pgpass(self) -> Iterator[dict[str, str]]:
        """Environment pointing libpq tools at a pgpass file, removed afterwards.

        The file lives in one private directory of the OS user (mode 0700); files left there by
        a process that was killed are removed first, so a password outlives its process by at
        most one run.
        """
        folder = private_directory(f"dr-pipelines-secrets-{self.os_user}", self.os_user)
        remove_orphans(folder)
        path = os.path.join(folder, owned_file_name("pgpass"))
        secret = self.password.get_secret_value().replace("\\", "\\\\").replace(":", "\\:")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(f"*:*:*:{self.user}:{secret}\n")
        chown_to(path, self.os_user)
        try:
            yield {"PGPASSFILE": path, "PGCONNECT_TIMEOUT": str(self.connect_timeout_seconds)}
        finally:
            with suppress(FileNotFoundError):
                os.unlink(path)

    def _pg_ctl(self, *args: str, timeout: float | None = None, check: bool = True):
        return run_as([self._bin("pg_ctl"), *args], user=self.os_user, timeout=timeout or self.start_timeout_seconds, check=check)

    # ------------------------------------------------------------------ status

    def is_in_recovery(self, port: int | None = None) -> bool:
        return bool(self.query_one("SELECT pg_is_in_recovery()", port=port))

    def is_fenced(self) -> bool:
        return self.query_one("SHOW default_transaction_read_only") == "on"

    def streaming_replicas(self) -> int:
        """Replicas streaming from the primary now."""
        return int(self.query_one("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"))

    def instance_running(self, data_directory: str) -> bool:
        proc = self._pg_ctl("status", "-D", data_directory, timeout=30, check=False)
        return proc.returncode == 0

    # ------------------------------------------------------------------ fencing

    def fence(self) -> int:
        """Stop writes on the primary.

        Every database's connection limit drops to 0 (the previous limit is kept in the database
        setting ``dr.fenced_connlimit``), so no non-superuser can connect or reconnect; superuser
        sessions get read-only transactions by default; other client sessions are ended.

        Returns:
            How many sessions were ended. Idempotent.
        """
        # The probe that waits for the setting stays open until the count, so that its session is
        # neither ended nor counted (a session closed a moment ago can still be listed).
        with self.connect() as conn, self.connect() as probe:
            conn.execute("SET default_transaction_read_only = off")
            for name, limit, fenced in conn.execute(
                "SELECT d.datname, d.datconnlimit, s.setconfig IS NOT NULL FROM pg_database d "
                "LEFT JOIN pg_db_role_setting s ON s.setdatabase = d.oid AND s.setrole = 0 "
                "AND s.setconfig::text LIKE '%dr.fenced_connlimit%' WHERE d.datallowconn"
            ).fetchall():
                if not fenced:
                    conn.execute(sql.SQL("ALTER DATABASE {} SET dr.fenced_connlimit = {}").format(
                        sql.Identifier(name), sql.Literal(str(limit))))
                conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 0").format(sql.Identifier(name)))
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            conn.execute("SELECT pg_reload_conf()")
            wait_until(lambda: probe.execute("SHOW default_transaction_read_only").fetchone()[0] == "on",
                       timeout=10, what="default_transaction_read_only to take effect")
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND pid <> %s",
                (probe.info.backend_pid,),
            ).fetchone()
        return int(row[0])

    def unfence(self) -> None:
        """Let connections and writes in again, with each database's previous connection limit. Idempotent."""
        with self.connect() as conn:
            conn.execute("SET default_transaction_read_only = off")
            rows = conn.execute(
                "SELECT d.datname, split_part(c, '=', 2) FROM pg_database d "
                "JOIN pg_db_role_setting s ON s.setdatabase = d.oid AND s.setrole = 0, "
                "unnest(s.setconfig) AS c WHERE c LIKE 'dr.fenced_connlimit=%'"
            ).fetchall()
            for name, limit in rows:
                conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
                    sql.Identifier(name), sql.Literal(int(limit))))
                conn.execute(sql.SQL("ALTER DATABASE {} RESET dr.fenced_connlimit").format(sql.Identifier(name)))
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: not self.is_fenced(), timeout=10, what="the primary to accept writes again")

    # ------------------------------------------------------------------ backups and window

    def backup(self, kind: str = "full") -> BackupSet:
        """Take a pgBackRest backup of the primary."""
        if kind not in {"full", "diff", "incr"}:
            raise InvalidInput(f"backup type {kind!r} is not one of full, diff, incr")
        return self.pgbackrest.backup(kind)

    def backups(self) -> list[BackupSet]:
        return self.pgbackrest.backups()

    def archive_wal(self, timeout: float = 60) -> datetime | None:
        """Close the current WAL segment on the primary and wait until it is archived.

        Returns:
            The time the newest segment was archived (the latest recoverable point), or None if
            nothing has been written since the last switch.
        """
        with self.connect() as conn:
            # Recovery to a time stops at the first commit after it; on a quiet database there may be
            # none, and recovery would end short of its target. An xid-only commit (no data) ends the WAL.
            conn.execute("SELECT pg_current_xact_id()")
            lsn_row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            wanted = lsn_row[0]

            def archived():
                row = conn.execute(
                    "SELECT last_archived_wal, last_archived_time FROM pg_stat_archiver"
                ).fetchone()
                if row[0] and row[0][8:] >= wanted[8:]:
                    return row
                return None

            row = wait_until(archived, timeout=timeout, interval=0.2, what=f"WAL segment {wanted} to be archived")
        return row[1]

    def latest_archived_time(self) -> datetime | None:
        """When the newest WAL segment reached the archive, read from the primary."""
        return self.query_one("SELECT last_archived_time FROM pg_stat_archiver")

    def create_restore_point(self, name: str) -> str:
        """Record a named restore point in the WAL; returns its LSN."""
        return str(self.query_one("SELECT pg_create_restore_point(%s)::text", (name,)))

    def restore_points(self) -> dict[str, str]:
        """Restore points present in the archived WAL: name -> LSN."""
        return self.pgbackrest.restore_points(self._bin("pg_waldump"))

    def backup_before_restore_point(self, name: str) -> str:
        """The newest usable backup that ended before restore point ``name`` (pgBackRest would take the newest)."""
        lsn = self.restore_points().get(name)
        if lsn is None:
            raise InvalidInput(f"restore point {name!r} is not in the archived WAL of stanza {self.pgbackrest_stanza!r}")
        usable = [b for b in self.backups() if not b.error and lsn_value(b.lsn_stop) <= lsn_value(lsn)]
        if not usable:
            raise InvalidInput(f"restore point {name!r} (LSN {lsn}) is older than the end of every backup")
        return usable[-1].label

    # ------------------------------------------------------------------ restore beside

    def candidate_directory(self, incident_id: str) -> str:
        """Where the restore for ``incident_id`` goes: always inside ``recovery_directory``."""
        if not INCIDENT_ID.match(incident_id or "") or ".." in incident_id:
            raise InvalidInput(
                f"incident id {incident_id!r} is not a plain name (letters, digits, '.', '_', '-'; at most 128)"
            )
        return os.path.join(self.recovery_directory, incident_id, "pgdata")

    def read_marker(self, data_directory: str) -> dict | None:
        """The recovery marker a restore left in ``data_directory``, if any."""
        path = os.path.join(data_directory, MARKER)
        try:
            with open(path) as fh:
                return json.load(fh)
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def restore_beside(self, incident_id: str, target: datetime | str, port: int | None = None) -> Candidate:
        """Restore the newest suitable backup plus WAL into a NEW data directory and start it on ``port``.

        The primary's data directory is never touched (tablespaces are mapped inside the new
        directory too). A candidate already restored for the same incident and target is reused,
        one still starting is waited for, and an interrupted restore is moved aside and redone.
        """
        if isinstance(target, datetime):
            target_type, target = "time", format_target_time(target)
        else:
            target_type = "name"
        data_dir = self.candidate_directory(incident_id)
        marker = self.read_marker(data_dir) or {}
        if marker.get("target") == target and marker.get("state") in ("restored", "restoring"):
            if marker["state"] == "restored" or self.instance_running(data_dir):
                return self._finish_restore(data_dir, marker, reused=True)
        if os.path.exists(data_dir) and self.instance_running(data_dir):
            self.stop_instance(data_dir)
        parent = os.path.dirname(data_dir)
        os.makedirs(parent, exist_ok=True)
        for path in (self.recovery_directory, parent):
            chown_to(path, self.os_user)
        if os.path.exists(data_dir):
            # A partial restore from an interrupted attempt of this same incident: keep it aside, start clean.
            shutil.move(data_dir, f"{data_dir}.partial-{int(datetime.now().timestamp())}")
        os.makedirs(data_dir, mode=0o700)
        chown_to(data_dir, self.os_user)
        port = port or free_local_port()
        chosen = self.backup_before_restore_point(target) if target_type == "name" else None
        backup_set = self.pgbackrest.restore(
            data_dir, target_type=target_type, target=target, port=port, tablespace_dir=f"{data_dir}-tablespaces",
            backup_set=chosen,
        )
        backup_set = chosen or backup_set
        marker = {"incident_id": incident_id, "target_type": target_type, "target": target, "port": port,
                  "backup_set": backup_set, "state": "restoring"}
        self._write_marker(data_dir, marker)
        return self._finish_restore(data_dir, marker, reused=False)

    def _finish_restore(self, data_dir: str, marker: dict, reused: bool) -> Candidate:
        self.start_instance(data_dir, marker["port"])
        self.wait_until_promoted(marker["port"])
        if marker.get("state") != "restored":
            last = self.last_replayed_commit(marker["port"])
            marker = {**marker, "state": "restored", "last_restored_commit": last.isoformat() if last else None}
            self._write_marker(data_dir, marker)
        return Candidate(marker["incident_id"], data_dir, marker["port"], marker["target_type"], marker["target"],
                         marker["backup_set"], reused)

    def _write_marker(self, data_directory: str, content: dict) -> None:
        path = os.path.join(data_directory, MARKER)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(content, fh)
        os.replace(tmp, path)
        chown_to(path, self.os_user)

    def start_instance(self, data_directory: str, port: int) -> None:
        """Start the instance in ``data_directory`` on ``port`` unless it already runs."""
        if self.instance_running(data_directory):
            return
        log = os.path.join(os.path.dirname(data_directory.rstrip("/")), f"{os.path.basename(data_directory.rstrip('/'))}.log")
        if not os.path.exists(log):
            open(log, "a").close()
            chown_to(log, self.os_user)
        try:
            self._pg_ctl("start", "-w", "-t", str(self.start_timeout_seconds), "-D", data_directory, "-l", log,
                         "-o", f"-p {port}")
        except CommandFailed as exc:
            tail = ""
            try:
                with open(log) as fh:
                    tail = " | ".join(fh.read().strip().splitlines()[-5:])
            except OSError:
                pass
            raise PostgresError(f"instance in {data_directory} did not start on port {port}: {exc}; log: {tail}") from exc

    def stop_instance(self, data_directory: str, mode: str = "fast") -> None:
        """Stop the instance in ``data_directory``; already stopped is fine."""
        if not os.path.exists(os.path.join(data_directory, "postmaster.pid")):
            return
        try:
            self._pg_ctl("stop", "-w", "-t", str(self.start_timeout_seconds), "-m", mode, "-D", data_directory)
        except CommandFailed as exc:
            if self.instance_running(data_directory):
                raise PostgresError(f"instance in {data_directory} did not stop: {exc}") from exc

    def wait_until_promoted(self, port: int) -> None:
        """Wait (bounded) until the instance on ``port`` has finished recovery and accepts writes."""

        def done() -> bool:
            try:
                return not self.is_in_recovery(port)
            except PostgresUnavailable:
                return False

        wait_until(done, timeout=self.start_timeout_seconds, interval=0.3, what=f"instance on port {port} to finish recovery")

    # ------------------------------------------------------------------ verification

    def amcheck(self, port: int | None = None, install_missing: bool = True) -> CheckResult:
        """``pg_amcheck --heapallindexed`` over every database of the instance.

        With ``install_missing`` the amcheck extension is created where it is absent (a write:
        use it on a restored candidate, not on a fenced primary). A check that overruns the
        statement timeout is reported as failed, never raised.
        """
        inst = self._instance(port)
        limit = self.statement_timeout_seconds
        cmd = [self._bin("pg_amcheck"), "--host", inst.host, "--port", str(inst.port), "--username", self.user,
               "--no-password", "--all", "--heapallindexed", "--maintenance-db", self.database]
        if install_missing:
            cmd.append("--install-missing")
        with self._pgpass() as env:
            try:
                proc = run_as(cmd, user=self.os_user, timeout=limit, env=env, check=False)
            except CommandFailed as exc:
                return CheckResult("pg_amcheck", False, f"{inst.address}: did not finish within {limit:.0f} s ({exc.returncode})")
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0:
            return CheckResult("pg_amcheck", True, f"no corruption found on {inst.address}")
        problems = [line.strip() for line in output.splitlines() if line.strip()][:6]
        return CheckResult("pg_amcheck", False, f"{inst.address}: " + " | ".join(problems))

    # ------------------------------------------------------------------ read-only queries

    @contextmanager
    def _read_only(self, port: int | None = None, dbname: str | None = None) -> Iterator[psycopg.Connection]:
        """A session inside a READ ONLY transaction that is always rolled back, with the query timeout and role."""
        with self.connect(port, dbname) as conn:
            try:
                conn.execute("BEGIN TRANSACTION READ ONLY")
                conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                    sql.Literal(self.query_timeout_seconds * 1000)))
                if self.query_role:
                    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(self.query_role)))
            except psycopg.Error as exc:
                raise classify(exc, f"read-only session on {self._instance(port).address}") from exc
            try:
                yield conn
            finally:
                if not conn.closed and conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    with suppress(psycopg.OperationalError):
                        conn.execute("ROLLBACK")

    @staticmethod
    def _prepare_one(conn: psycopg.Connection, statement: str) -> tuple[int, int]:
        """Parse ``statement`` on the server as one prepared statement; returns its parameter and column counts.

        The server's extended protocol refuses a text holding more than one statement, so nothing
        after a ``;`` is ever run, and ``%`` is an ordinary character (no client-side placeholders).
        """
        encoding = conn.info.encoding
        pgconn = conn.pgconn
        for result in (lambda: pgconn.prepare(QUERY_NAME.encode(), statement.encode(encoding)),
                       lambda: pgconn.describe_prepared(QUERY_NAME.encode())):
            res = result()
            if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
                raise psycopg.errors.error_from_result(res, encoding=encoding)
        return res.nparams, res.nfields

    @staticmethod
    def _shape_refusal(statement: str, nparams: int, nfields: int) -> str | None:
        if not statement.strip():
            return "it is empty"
        if nparams:
            return f"it takes {nparams} parameter(s); give a query with its values written out"
        if nfields != 1:
            return f"it returns {nfields} columns; a check query returns exactly one column"
        return None

    def read_only_value(self, statement: str, port: int | None = None, dbname: str | None = None):
        """The single value of a check query, run as ONE statement in a READ ONLY transaction, then rolled back.

        The transaction is bounded by ``query_timeout_seconds`` and runs as ``query_role``; a
        second statement, a write, or a query returning other than one column is refused.

        Raises:
            PostgresError: the query was refused or failed; InvalidInput for a table that does not exist.
        """
        address = self._instance(port).address
        with self._read_only(port, dbname) as conn:
            try:
                why = self._shape_refusal(statement, *self._prepare_one(conn, statement))
                if why:
                    raise PostgresError(f"query refused on {address}: {why}")
                cur = conn.execute(sql.SQL("EXECUTE {}").format(sql.Identifier(QUERY_NAME)))
                row = cur.fetchone()
            except psycopg.errors.UndefinedTable as exc:
                raise InvalidInput(f"{_primary_message(exc)} on {address}") from exc
            except psycopg.errors.QueryCanceled as exc:
                raise PostgresError(f"query on {address} stopped at the statement timeout of "
                                    f"{self.query_timeout_seconds} s: {_primary_message(exc)}") from exc
            except psycopg.Error as exc:
                raise classify(exc, f"query failed on {address}") from exc
        return None if row is None else row[0]

    def query_refusal(self, statement: str, port: int | None = None, dbname: str | None = None) -> str | None:
        """Why ``statement`` cannot be a check query on the instance (None when it can): parsed and planned, never run.

        The server parses it as one prepared statement and plans it inside a read-only transaction
        that is rolled back; a second statement, an unknown table, column or function, missing
        privileges of ``query_role``, parameters, other than one column, or a plan that writes or
        locks rows is a reason.
        """
        with self._read_only(port, dbname) as conn:
            try:
                why = self._shape_refusal(statement, *self._prepare_one(conn, statement))
                if why:
                    return why
                plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}").format(
                    sql.Identifier(QUERY_NAME))).fetchone()[0]
            except psycopg.Error as exc:
                if classify(exc, "").transient:
                    raise classify(exc, f"checking a query on {self._instance(port).address}") from exc
                text = _primary_message(exc)
                if "multiple commands" in text:
                    return "it is more than one statement; give exactly one"
                return f"the server refused it: {text}"
        writes = sorted(_plan_nodes(plan) & {"ModifyTable", "LockRows"})
        if writes:
            return f"it writes or locks rows ({', '.join(writes)}); check queries are read-only"
        return None

    @staticmethod
    def _table_statement(table: str) -> str:
        parts = (table or "").split(".")
        if not 1 <= len(parts) <= 3 or not all(parts):
            raise InvalidInput(f"table {table!r} is not a table name (table, schema.table or database.schema.table)")
        return sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*parts)).as_string()

    def table_refusal(self, table: str, port: int | None = None) -> str | None:
        """Why the rows of ``table`` cannot be counted on the instance (None when they can)."""
        try:
            statement = self._table_statement(table)
        except InvalidInput as exc:
            return str(exc)
        return self.query_refusal(statement, port)

    def database_exists(self, name: str, port: int | None = None) -> bool:
        """True when ``name`` is a database on the instance that accepts connections."""
        return bool(self.query_one("SELECT count(*) FROM pg_database WHERE datname = %s AND datallowconn "
                                   "AND NOT datistemplate", (name,), port=port))

    def row_count(self, table: str, port: int | None = None) -> int:
        """Exact row count of ``table`` (schema-qualified names allowed), read in a read-only transaction."""
        try:
            return int(self.read_only_value(self._table_statement(table), port))
        except InvalidInput as exc:
            raise InvalidInput(f"table {table!r}: {exc}") from exc
        except PostgresUnavailable:
            raise
        except PostgresError as exc:
            raise PostgresError(f"counting {table!r} failed: {exc}") from exc

    def run_sentinel(self, query: VerificationQuery, port: int | None = None) -> CheckResult:
        """Run one sentinel query (one statement, read-only, bounded); passes when it returns ``expected``."""
        try:
            value = self.read_only_value(query.sql, port=port, dbname=query.database)
        except (PostgresError, InvalidInput) as exc:
            return CheckResult(f"sentinel: {query.name}", False, str(exc))
        text = "NULL" if value is None else str(value)
        if query.expected is None:
            return CheckResult(f"sentinel: {query.name}", True, f"returned {text}", critical=False)
        passed = text == query.expected
        return CheckResult(f"sentinel: {query.name}", passed, f"returned {text}, expected {query.expected}")

    # ------------------------------------------------------------------ application access

    def application_role_names(self, port: int | None = None) -> list[str]:
        """``application_roles``, or the non-superuser LOGIN roles that own or may write a table of ``database``."""
        if self.application_roles:
            return list(self.application_roles)
        with self.connect(port) as conn:
            rows = conn.execute(
                "SELECT r.rolname FROM pg_roles r WHERE r.rolcanlogin AND NOT r.rolsuper AND r.rolname <> current_user "
                "AND r.rolname !~ '^pg_' AND EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname !~ '^pg_toast' AND (c.relowner = r.oid "
                "OR has_table_privilege(r.oid, c.oid, 'INSERT, UPDATE, DELETE'))) ORDER BY 1"
            ).fetchall()
        return [row[0] for row in rows]

    def application_access(self, port: int | None = None) -> list[CheckResult]:
        """Can applications use the instance again? Databases open to connections, and per application role:
        it may log in (LOGIN, connection limits, CONNECT privilege, password not expired) and a real write
        as that role, in a transaction that is rolled back, succeeds under the settings it would get.
        """
        address = self._instance(port).address
        roles = self.application_role_names(port)
        results = []
        with self.connect(port) as conn:
            allow, limit, sessions = conn.execute(
                "SELECT d.datallowconn, d.datconnlimit, (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid) "
                "FROM pg_database d WHERE d.datname = current_database()").fetchone()
            fenced = [row[0] for row in conn.execute(
                "SELECT d.datname FROM pg_database d JOIN pg_db_role_setting s ON s.setdatabase = d.oid "
                "AND s.setrole = 0, unnest(s.setconfig) AS c WHERE c LIKE 'dr.fenced_connlimit=%' ORDER BY 1")]
            problems = []
            if not allow:
                problems.append(f"database {self.database} does not allow connections")
            if limit == 0 or (limit > 0 and sessions >= limit):
                problems.append(f"database {self.database} accepts no more connections (limit {limit}, {sessions} open)")
            if fenced:
                problems.append(f"still fenced: {', '.join(fenced)} (connection limit kept in dr.fenced_connlimit)")
            results.append(CheckResult("databases accept connections", not problems,
                                       "; ".join(problems) or f"{self.database} at {address}: limit {limit}, {sessions} open"))
            if not roles:
                results.append(CheckResult("application roles", True, f"no non-superuser login role owns or may write a "
                                           f"table of {self.database}; none checked", critical=False))
            for role in roles:
                problems = self._login_refusals(conn, role) or []
                if not problems:
                    problem = self._write_refusal(conn, role)
                    problems = [problem] if problem else []
                results.append(CheckResult(f"application role {role} can connect and write", not problems,
                                           "; ".join(problems) or f"{role} may log in to {self.database} at {address} "
                                           "and a write as it was accepted (rolled back)"))
        return results

    def _login_refusals(self, conn: psycopg.Connection, role: str) -> list[str]:
        row = conn.execute(
            "SELECT r.rolcanlogin, r.rolconnlimit, r.rolvaliduntil < now(), "
            "(SELECT count(*) FROM pg_stat_activity a WHERE a.usename = r.rolname), "
            "has_database_privilege(r.oid, current_database(), 'CONNECT') FROM pg_roles r WHERE r.rolname = %s",
            (role,)).fetchone()
        if row is None:
            return [f"role {role} does not exist"]
        can_login, limit, expired, sessions, connect = row
        problems = []
        if not can_login:
            problems.append(f"role {role} cannot log in (NOLOGIN)")
        if limit == 0 or (limit > 0 and sessions >= limit):
            problems.append(f"role {role} may open no more connections (limit {limit}, {sessions} open)")
        if expired:
            problems.append(f"the password of role {role} has expired")
        if not connect:
            problems.append(f"role {role} has no CONNECT privilege on {self.database}")
        return problems

    def _write_refusal(self, conn: psycopg.Connection, role: str) -> str | None:
        """Why a write as ``role`` fails (None when it succeeds): a zero-row INSERT (or DELETE) that passes every
        check a real one does (read-only mode, privileges, statement triggers), inside a transaction rolled back."""
        target = conn.execute(
            "SELECT n.nspname, c.relname, a.attname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "AND a.attgenerated = '' AND a.attidentity <> 'a' "
            "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast' "
            "AND has_column_privilege(%s, c.oid, a.attnum, 'INSERT') ORDER BY c.oid, a.attnum LIMIT 1", (role,)
        ).fetchone()
        if target:
            write = sql.SQL("INSERT INTO {} ({}) SELECT NULL WHERE false").format(
                sql.Identifier(target[0], target[1]), sql.Identifier(target[2]))
        else:
            target = conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname !~ '^pg_toast' AND has_table_privilege(%s, c.oid, 'DELETE') ORDER BY c.oid LIMIT 1",
                (role,)).fetchone()
            if not target:
                return f"role {role} may insert into or delete from no table of {self.database}"
            write = sql.SQL("DELETE FROM {} WHERE false").format(sql.Identifier(target[0], target[1]))
        # The mode the role's sessions get: its own and its database's settings, else the server's.
        read_only = conn.execute(
            "SELECT split_part(c, '=', 2) FROM pg_db_role_setting s, unnest(s.setconfig) AS c "
            "WHERE c LIKE 'default\\_transaction\\_read\\_only=%%' AND ("
            "(s.setrole = (SELECT oid FROM pg_roles WHERE rolname = %s) AND s.setdatabase IN "
            "((SELECT oid FROM pg_database WHERE datname = current_database()), 0)) "
            "OR (s.setrole = 0 AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database()))) "
            "ORDER BY (s.setrole <> 0) DESC, (s.setdatabase <> 0) DESC LIMIT 1", (role,)).fetchone()
        mode = read_only[0] if read_only else conn.execute("SHOW default_transaction_read_only").fetchone()[0]
        readonly = mode.lower() in ("on", "true", "yes", "1")
        try:
            conn.execute("BEGIN TRANSACTION " + ("READ ONLY" if readonly else "READ WRITE"))
            try:
                conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                    sql.Literal(self.query_timeout_seconds * 1000)))
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                conn.execute(write)
            finally:
                conn.execute("ROLLBACK")
        except psycopg.Error as exc:
            if classify(exc, "").transient:
                raise classify(exc, f"write check as {role}") from exc
            return f"a write as {role} ({write.as_string()}) was refused: {_primary_message(exc)}"
        return None

    def last_replayed_commit(self, port: int) -> datetime | None:
        """Commit time of the last transaction the restored instance replayed."""
        return self.query_one("SELECT pg_last_xact_replay_timestamp()", port=port)

    # ------------------------------------------------------------------ promotion

    def promotion_progress(self, incident_id: str) -> str | None:
        """How far promotion for ``incident_id`` got: 'promoted', 'interrupted' (started, not finished) or None."""
        primary_dir = self.primary.data_directory
        if not primary_dir:
            return None
        at_endpoint = self.read_marker(primary_dir) or {}
        if at_endpoint.get("incident_id") == incident_id:
            return "promoted" if at_endpoint.get("state") == "promoted" else "interrupted"
        candidate = self.read_marker(self.candidate_directory(incident_id)) or {}
        if candidate.get("state") == "promoting" or os.path.exists(f"{primary_dir}.replaced-{incident_id}"):
            return "interrupted"
        return None

    def promoted_incident(self) -> dict | None:
        """The recovery marker of the data directory serving the endpoint, if a finished promotion put it there."""
        marker = self.read_marker(self.primary.data_directory) if self.primary.data_directory else None
        return marker if marker and marker.get("state") == "promoted" else None

    def candidate_for(self, incident_id: str) -> Candidate | None:
        """The restored candidate of ``incident_id``, wherever promotion left it."""
        for data_dir in (self.candidate_directory(incident_id), self.primary.data_directory or ""):
            marker = self.read_marker(data_dir) if data_dir else None
            if marker and marker.get("incident_id") == incident_id:
                return Candidate(incident_id, self.candidate_directory(incident_id), marker["port"],
                                 marker["target_type"], marker["target"], marker["backup_set"], True)
        return None

    def promote_candidate(self, candidate: Candidate) -> Promotion:
        """Put the verified candidate behind the primary's address; the old data directory is moved aside.

        Order keeps one writer at a time: the old primary stops before the candidate moves in.
        Every step is journalled in the candidate's marker first, so a re-run after an
        interruption at any point finishes the same promotion and never does it twice.
        """
        primary_dir = self.primary.data_directory
        if not primary_dir:
            raise InvalidInput("the cluster's primary has no data_directory: promotion needs the primary's host")
        aside = f"{primary_dir}.replaced-{candidate.incident_id}"
        moved_in = (self.read_marker(primary_dir) or {}).get("incident_id") == candidate.incident_id
        already = moved_in and (self.read_marker(primary_dir) or {}).get("state") == "promoted"
        if not moved_in:
            marker = self.read_marker(candidate.data_directory)
            if not marker:
                raise PostgresError(f"candidate {candidate.data_directory} is missing; nothing to promote")
            if marker.get("state") != "promoting":
                self._check_movable(candidate.data_directory, primary_dir, aside)
                self._write_marker(candidate.data_directory, {**marker, "state": "promoting", "old_primary_aside": aside})
            elif os.path.exists(primary_dir) and os.path.exists(aside):
                raise PostgresError(f"both {primary_dir} and {aside} exist; resolve by hand before promoting")
            self.stop_instance(candidate.data_directory)
            if os.path.exists(primary_dir):
                self.stop_instance(primary_dir)
                os.rename(primary_dir, aside)
            os.rename(candidate.data_directory, primary_dir)
        # The restore's recovery settings must not follow the new primary into replicas cloned from it:
        # a replica inheriting recovery_target_action = 'promote' would promote itself (two writers).
        self._set_auto_conf(primary_dir, {"port": str(self.primary.port), "archive_mode": "on"}, remove=RECOVERY_SETTINGS)
        if not already:
            self._write_marker(primary_dir, {**(self.read_marker(primary_dir) or {}), "state": "promoted",
                                             "promoted_at": datetime.now(timezone.utc).isoformat(),
                                             "old_primary_aside": aside})
        self.start_instance(primary_dir, self.primary.port)
        self.wait_until_promoted(self.primary.port)
        if not (self.read_marker(primary_dir) or {}).get("timeline_archived"):
            self._archive_new_timeline(primary_dir)
            self._write_marker(primary_dir, {**(self.read_marker(primary_dir) or {}), "timeline_archived": True})
        marker = self.read_marker(primary_dir) or {}
        return Promotion(
            endpoint=self.primary.address,
            data_directory=primary_dir,
            old_primary_aside=marker.get("old_primary_aside"),
            already_promoted=already,
            promoted_at=marker.get("promoted_at", ""),
        )

    def _check_movable(self, candidate_dir: str, primary_dir: str, aside: str) -> None:
        """Refuse, before anything stops, a promotion whose directory moves could fail halfway."""
        if os.path.exists(aside):
            raise PostgresError(f"{aside} already exists; refusing to overwrite a kept data directory")
        target_parent = os.path.dirname(primary_dir.rstrip("/")) or "/"
        if os.stat(candidate_dir).st_dev != os.stat(target_parent).st_dev:
            raise PostgresError(
                f"candidate {candidate_dir} and {target_parent} are on different filesystems; set the block's "
                "recovery_directory on the primary's filesystem so promotion is a rename"
            )
        if os.path.exists(primary_dir) and os.path.ismount(primary_dir):
            raise PostgresError(f"{primary_dir} is a mount point and cannot be moved aside; promotion needs its parent")

    def _archive_new_timeline(self, data_directory: str) -> None:
        """Archive the new timeline's history file and the WAL written before archiving was on again.

        The candidate ran with archive_mode=off while it was verified, so nothing of its timeline
        reached the repository; without the history file a later point-in-time restore would follow
        the old, corrupted timeline.
        """
        current = str(self.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())"))
        timeline = current[:8]
        wal_dir = os.path.join(data_directory, "pg_wal")
        for name in sorted(os.listdir(wal_dir)):
            if name == f"{timeline}.history" or (len(name) == 24 and name.startswith(timeline) and name < current):
                self.pgbackrest.archive_push(os.path.join(wal_dir, name))
        self.archive_wal()

    def _set_auto_conf(self, data_directory: str, settings: dict[str, str], remove: tuple[str, ...] = ()) -> None:
        """Replace ``settings`` and drop ``remove`` in postgresql.auto.conf of a stopped instance."""
        path = os.path.join(data_directory, "postgresql.auto.conf")
        lines = []
        if os.path.exists(path):
            with open(path) as fh:
                lines = [ln for ln in fh if ln.split("=", 1)[0].strip() not in (*settings, *remove)]
        lines += [f"{key} = '{value}'\n" for key, value in settings.items()]
        with open(path, "w") as fh:
            fh.writelines(lines)
        chown_to(path, self.os_user)
