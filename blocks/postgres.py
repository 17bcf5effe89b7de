"""A self-managed PostgreSQL cluster backed up with pgBackRest, and the verbs recoveries need."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Iterator, Literal

import psycopg
from psycopg import sql
from prefect.blocks.core import Block
from pydantic import BaseModel, Field, SecretStr

from blocks._pg_replication import ReplicationVerbs
from blocks._pg_roles import RoleVerbs
from blocks._process import chown_to, run_as, wait_until
from blocks.errors import (
    CommandFailed,
    InvalidInput,
    PostgresError,
    PostgresUnavailable,
)
from blocks.pgbackrest import BackupSet, PgBackRest, format_target_time, lsn_value

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
    sql: str = Field(description="A query returning one row with one column.")
    expected: str | None = Field(
        default=None, description="The value, as text, the query must return; empty to only record it."
    )
    database: str | None = Field(default=None, description="Database to run it in; defaults to the cluster's.")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check, as data. Only critical checks fail a run."""

    name: str
    passed: bool
    detail: str
    critical: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


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
        """Environment pointing libpq tools at a private pgpass file, removed afterwards."""
        folder = tempfile.mkdtemp(prefix="dr-pgpass-")
        path = os.path.join(folder, "pgpass")
        secret = self.password.get_secret_value().replace("\\", "\\\\").replace(":", "\\:")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(f"*:*:*:{self.user}:{secret}\n")
        chown_to(folder, self.os_user)
        chown_to(path, self.os_user)
        try:
            yield {"PGPASSFILE": path, "PGCONNECT_TIMEOUT": str(self.connect_timeout_seconds)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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

    def row_count(self, table: str, port: int | None = None) -> int:
        """Exact row count of ``table`` (schema-qualified names allowed)."""
        with self.connect(port) as conn:
            try:
                ident = sql.Identifier(*table.split("."))
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
            except psycopg.errors.UndefinedTable as exc:
                raise InvalidInput(f"table {table!r} does not exist on {self._instance(port).address}") from exc
            except psycopg.Error as exc:
                raise PostgresError(f"counting {table!r} failed: {exc}") from exc
        return int(row[0])

    def run_sentinel(self, query: VerificationQuery, port: int | None = None) -> CheckResult:
        """Run one sentinel query; passes when it returns ``expected`` (or anything, with no expectation)."""
        try:
            value = self.query_one(query.sql, port=port, dbname=query.database)
        except PostgresError as exc:
            return CheckResult(f"sentinel: {query.name}", False, str(exc))
        text = "NULL" if value is None else str(value)
        if query.expected is None:
            return CheckResult(f"sentinel: {query.name}", True, f"returned {text}", critical=False)
        passed = text == query.expected
        return CheckResult(f"sentinel: {query.name}", passed, f"returned {text}, expected {query.expected}")

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
