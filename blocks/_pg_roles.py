"""Role verbs of :class:`blocks.postgres.PostgresCluster`: logins, sessions and passwords of roles,
and the forensic copies a security incident keeps (a logical dump, the server logs).

Passwords never travel to the server in clear text: a SCRAM-SHA-256 verifier is computed on
this side and only the verifier is sent, so neither ``log_statement`` nor an error report on
the server can record the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import shutil
import tempfile
from datetime import datetime

import psycopg
from psycopg import sql
from pydantic import SecretStr

from blocks._process import chown_to, run_as
from blocks.errors import CommandFailed, InvalidInput, PostgresError

SCRAM_ITERATIONS = 4096
AUTH_FAILED_STATES = ("28P01", "28000")


def scram_verifier(password: SecretStr, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802 / 7677).

    Only ASCII passwords are accepted: SASLprep leaves them unchanged, so the verifier matches
    what the server would compute.
    """
    text = password.get_secret_value()
    if not text.isascii():
        raise InvalidInput("a password to set must be ASCII (generated passwords always are)")
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", text.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


class RoleVerbs:
    """Mixed into ``PostgresCluster``; uses its ``connect``/``query_one``/``_pgpass`` plumbing."""

    def role_exists(self, role: str, port: int | None = None) -> bool:
        """True when ``role`` exists on the instance."""
        return bool(self.query_one("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,), port=port))

    def role_can_login(self, role: str, port: int | None = None) -> bool:
        """The role's LOGIN attribute (False for an unknown role)."""
        return bool(self.query_one("SELECT coalesce(bool_or(rolcanlogin), false) FROM pg_roles WHERE rolname = %s",
                                   (role,), port=port))

    def role_sessions(self, role: str, port: int | None = None) -> int:
        """Sessions of ``role`` open now."""
        return int(self.query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,), port=port))

    def _require_role(self, role: str, port: int | None) -> None:
        if role == self.user:
            raise InvalidInput(f"role {role!r} is the recovery role of this cluster; it cannot be contained here")
        if not self.role_exists(role, port):
            raise InvalidInput(f"role {role!r} does not exist on {self._instance(port).address}")

    def disable_login(self, role: str, port: int | None = None) -> int:
        """Refuse new logins of ``role`` and end its open sessions. Idempotent.

        Returns:
            How many sessions were ended.
        """
        return len(self.contain_role(role, port))

    def contain_role(self, role: str, port: int | None = None) -> list[dict]:
        """Refuse new logins of ``role`` and end its open sessions, recording each session as it is ended.

        The ``pg_stat_activity`` row of every session (client address and port, application,
        backend start, state, the statement it ran last) is read in the same statement that
        terminates it, so what the intruder was doing is kept as evidence. Idempotent.

        Returns:
            One record per ended session.
        """
        self._require_role(role, port)
        with self.connect(port) as conn:
            try:
                conn.execute("SET default_transaction_read_only = off")
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
                cur = conn.execute(
                    "WITH seen AS (SELECT pid, usename, datname, host(client_addr) AS client_addr, client_port, "
                    "application_name, backend_start, xact_start, query_start, state_change, state, query "
                    "FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()) "
                    "SELECT seen.*, pg_terminate_backend(pid, 5000) AS terminated FROM seen", (role,)
                )
                columns = [c.name for c in cur.description]
                rows = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
            except psycopg.Error as exc:
                raise PostgresError(f"disabling logins of role {role!r} failed: {exc.sqlstate}") from exc
        for row in rows:
            for name, value in row.items():
                if isinstance(value, datetime):
                    row[name] = value.isoformat()
        return rows

    def enable_login(self, role: str, port: int | None = None) -> None:
        """Allow logins of ``role`` again. Idempotent."""
        self._require_role(role, port)
        with self.connect(port) as conn:
            try:
                conn.execute("SET default_transaction_read_only = off")
                conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
            except psycopg.Error as exc:
                raise PostgresError(f"enabling logins of role {role!r} failed: {exc.sqlstate}") from exc

    def set_password(self, role: str, password: SecretStr, port: int | None = None) -> None:
        """Give ``role`` a new password. Only its SCRAM verifier is sent, and this session logs no statements."""
        self._require_role(role, port)
        verifier = scram_verifier(password)
        with self.connect(port) as conn:
            for setting in ("SET log_statement = 'none'", "SET log_min_error_statement = 'panic'"):
                try:
                    conn.execute(setting)
                except psycopg.errors.InsufficientPrivilege:
                    # Superuser-only settings: without them the server may log the statement, which holds
                    # the verifier only, never the password.
                    pass
            try:
                conn.execute("SET default_transaction_read_only = off")
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))
            except psycopg.Error as exc:
                # The message and SQLSTATE only; the statement itself is never repeated.
                raise PostgresError(f"changing the password of role {role!r} failed: {exc.sqlstate}") from exc

    def can_login(self, role: str, password: SecretStr, port: int | None = None, dbname: str | None = None) -> bool:
        """True when ``role`` can open a session with ``password``; False when the server refuses it."""
        inst = self._instance(port)
        try:
            conn = psycopg.connect(host=inst.host, port=inst.port, dbname=dbname or self.database, user=role,
                                   password=password.get_secret_value(), connect_timeout=self.connect_timeout_seconds,
                                   application_name="dr-pipelines-check")
        except psycopg.OperationalError as exc:
            text = str(exc)
            if exc.sqlstate in AUTH_FAILED_STATES or "authentication failed" in text or "not permitted to log in" in text:
                return False
            raise PostgresError(f"login check of role {role!r} at {inst.address} failed: {exc.sqlstate or 'no answer'}") from exc
        conn.close()
        return True

    def dump_database(self, path: str, dbname: str | None = None, timeout: float = 1800) -> str:
        """A custom-format ``pg_dump`` of ``dbname`` (default: the cluster's database) written to ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="dr-pgdump-")
        chown_to(scratch, self.os_user)
        produced = os.path.join(scratch, os.path.basename(path))
        inst = self.primary
        cmd = [self._bin("pg_dump"), "--host", inst.host, "--port", str(inst.port), "--username", self.user,
               "--no-password", "--format=custom", "--file", produced, dbname or self.database]
        try:
            with self._pgpass() as env:
                try:
                    run_as(cmd, user=self.os_user, timeout=timeout, env=env)
                except CommandFailed as exc:
                    raise PostgresError(f"pg_dump of {dbname or self.database!r} at {inst.address} failed: {exc}") from exc
            shutil.move(produced, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return path

    def log_files(self, since: datetime | None = None) -> list[str]:
        """Server log files of the primary written since ``since`` (all of them without it).

        With the logging collector the files are in the log directory of ``pg_current_logfile()``;
        otherwise the primary's standard error goes to ``<data directory>.log`` beside it
        (the convention of ``pg_ctl -l`` used by :meth:`start_instance`).
        """
        data_dir = self.primary.data_directory
        current = self.query_one("SELECT pg_current_logfile()")
        candidates: list[str] = []
        if current:
            base = current if os.path.isabs(current) else os.path.join(data_dir or "", current)
            folder = os.path.dirname(base)
            if os.path.isdir(folder):
                candidates = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
        elif data_dir:
            sibling = data_dir.rstrip("/") + ".log"
            candidates = [sibling] if os.path.exists(sibling) else []
        cutoff = since.timestamp() if since else None
        return [p for p in candidates if os.path.isfile(p) and (cutoff is None or os.path.getmtime(p) >= cutoff)]

    def collect_logs(self, destination: str, since: datetime | None = None) -> list[str]:
        """Copy the primary's server log files written since ``since`` into ``destination``; returns the copies."""
        os.makedirs(destination, exist_ok=True)
        copies = []
        for source in self.log_files(since):
            target = os.path.join(destination, os.path.basename(source))
            shutil.copyfile(source, target)
            copies.append(target)
        return copies

    def password_matches(self, role: str, password: SecretStr, port: int | None = None) -> bool:
        """True when the role's stored SCRAM-SHA-256 verifier is the one of ``password``.

        The verifier is recomputed with the stored salt and iteration count, so this proves which
        password the server accepts without logging in (it also works for a NOLOGIN role). Any
        other password, the one before a rotation included, is then refused.
        """
        stored = self.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,), port=port)
        match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", str(stored or ""))
        if not match:
            return False
        iterations, salt = int(match.group(1)), base64.b64decode(match.group(2))
        expected = scram_verifier(password, iterations, salt)
        return hmac.compare_digest(expected.encode(), str(stored).encode())

    def password_verifier_digest(self, role: str, port: int | None = None) -> str | None:
        """A short fingerprint of the role's stored password verifier (never the verifier itself); None without one."""
        stored = self.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,), port=port)
        return None if stored is None else hashlib.sha256(str(stored).encode()).hexdigest()[:16]
