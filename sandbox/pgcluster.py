"""A real PostgreSQL 15 primary + streaming replica with pgBackRest WAL archiving, on loopback.

Everything runs as the ``postgres`` operating-system user even when the caller is root.
Used by ``dr up`` and by the test suite; it imports nothing from Prefect.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PG_BIN = Path(os.environ.get("DR_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"
STANZA = "main"


class SandboxError(RuntimeError):
    """The sandbox could not be built or started."""


@dataclass(frozen=True)
class ClusterLayout:
    root: Path
    primary_port: int
    replica_port: int | None
    password: str

    @property
    def primary_dir(self) -> Path:
        return self.root / "pg" / "primary"

    @property
    def replica_dir(self) -> Path:
        return self.root / "pg" / "replica"

    @property
    def socket_dir(self) -> Path:
        return self.root / "pg" / "sockets"

    @property
    def recovery_dir(self) -> Path:
        return self.root / "pg" / "recovery"

    @property
    def pgbackrest_dir(self) -> Path:
        return self.root / "pgbackrest"

    @property
    def pgbackrest_conf(self) -> Path:
        return self.pgbackrest_dir / "pgbackrest.conf"

    @property
    def pgpass(self) -> Path:
        return self.root / "pg" / "pgpass"

    def dsn(self, port: int, dbname: str = "postgres") -> str:
        """A DSN without the password (it lives in the pgpass file and the block)."""
        return f"postgresql://postgres@127.0.0.1:{port}/{dbname}"


def _ids() -> tuple[int, int]:
    entry = pwd.getpwnam(OS_USER)
    return entry.pw_uid, entry.pw_gid


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        uid, gid = _ids()
        os.chown(path, uid, gid)


def _run(cmd: list[str], *, timeout: float = 300, env: dict | None = None, check: bool = True):
    kwargs: dict = {}
    full_env = dict(os.environ, **(env or {}))
    if os.geteuid() == 0:
        uid, gid = _ids()
        kwargs.update(user=uid, group=gid, extra_groups=[])
        full_env["HOME"] = pwd.getpwnam(OS_USER).pw_dir
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd="/", **kwargs)
    if check and proc.returncode != 0:
        raise SandboxError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-800:]}")
    return proc


def _mkdir(path: Path, mode: int = 0o750) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    _own(path)


def is_running(data_dir: Path) -> bool:
    if not (data_dir / "PG_VERSION").exists():
        return False
    return _run([str(PG_BIN / "pg_ctl"), "status", "-D", str(data_dir)], check=False, timeout=30).returncode == 0


def start(data_dir: Path, timeout: int = 120) -> None:
    if is_running(data_dir):
        return
    log = data_dir.parent / f"{data_dir.name}.log"
    if not log.exists():
        log.touch()
        _own(log)
    _run([str(PG_BIN / "pg_ctl"), "start", "-w", "-t", str(timeout), "-D", str(data_dir), "-l", str(log)], timeout=timeout + 10)


def stop(data_dir: Path, mode: str = "fast") -> None:
    if (data_dir / "postmaster.pid").exists():
        _run([str(PG_BIN / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(data_dir)], check=False, timeout=120)


def psql(layout: ClusterLayout, port: int, sql: str, dbname: str = "postgres", timeout: float = 300) -> str:
    """Run ``sql`` with psql over TCP (password from the pgpass file)."""
    proc = _run(
        [str(PG_BIN / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
         "-U", "postgres", "-d", dbname, "-c", sql],
        env={"PGPASSFILE": str(layout.pgpass)}, timeout=timeout,
    )
    return proc.stdout.strip()


def _write_pgbackrest_conf(layout: ClusterLayout) -> None:
    d = layout.pgbackrest_dir
    for sub in ("repo", "log", "lock", "spool"):
        _mkdir(d / sub)
    layout.pgbackrest_conf.write_text(
        "[global]\n"
        f"repo1-path={d / 'repo'}\n"
        "repo1-retention-full=3\n"
        f"log-path={d / 'log'}\n"
        f"lock-path={d / 'lock'}\n"
        f"spool-path={d / 'spool'}\n"
        "log-level-file=detail\n"
        "start-fast=y\n"
        "compress-type=lz4\n"
        "process-max=2\n"
        "\n"
        f"[{STANZA}]\n"
        f"pg1-path={layout.primary_dir}\n"
        f"pg1-port={layout.primary_port}\n"
        f"pg1-socket-path={layout.socket_dir}\n"
        f"pg1-user={OS_USER}\n"
    )
    _own(layout.pgbackrest_conf)


def _primary_settings(layout: ClusterLayout) -> str:
    archive = f"pgbackrest --config={layout.pgbackrest_conf} --stanza={STANZA} archive-push %p"
    return (
        "\n# dr sandbox\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {layout.primary_port}\n"
        f"unix_socket_directories = '{layout.socket_dir}'\n"
        "wal_level = replica\n"
        "archive_mode = on\n"
        f"archive_command = '{archive}'\n"
        "archive_timeout = 60\n"
        "max_wal_senders = 8\n"
        "wal_keep_size = '512MB'\n"
        "hot_standby = on\n"
        "track_commit_timestamp = on\n"
        "shared_buffers = '128MB'\n"
        "max_connections = 50\n"
        "fsync = on\n"
        "log_line_prefix = '%m [%p] %q%u@%d '\n"
    )


def _hba() -> str:
    return (
        "local all postgres peer\n"
        "local replication postgres peer\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
        "host replication all 127.0.0.1/32 scram-sha-256\n"
    )


def _initdb(data_dir: Path, password: str, *options: str) -> None:
    """A new, empty data directory whose superuser ``postgres`` logs in over TCP with ``password``."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    pwfile = data_dir.parent / ".initpw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    _own(pwfile)
    try:
        _run([str(PG_BIN / "initdb"), "-D", str(data_dir), *options, "-U", "postgres", f"--pwfile={pwfile}",
              "--auth-local=peer", "--auth-host=scram-sha-256", "-N", "-E", "UTF8", "--locale=C.UTF-8"], timeout=120)
    finally:
        pwfile.unlink(missing_ok=True)


def sqlalchemy_url(port: int, password: str, dbname: str = "postgres") -> str:
    """The asyncpg URL an application such as the Prefect server connects with, password quoted."""
    return f"postgresql+asyncpg://postgres:{quote(password, safe='')}@127.0.0.1:{port}/{dbname}"


def build(layout: ClusterLayout, with_replica: bool = True) -> None:
    """Create (first time) or start (afterwards) the primary, the stanza and the replica. Idempotent."""
    if not (PG_BIN / "initdb").exists():
        raise SandboxError(f"PostgreSQL 15 binaries not found in {PG_BIN}; install the postgresql package")
    if shutil.which("pgbackrest") is None:
        raise SandboxError("pgbackrest not found on PATH; install the pgbackrest package")
    for path in (layout.root, layout.root / "pg", layout.recovery_dir):
        _mkdir(path, 0o755)
    _mkdir(layout.socket_dir, 0o755)
    _write_pgbackrest_conf(layout)
    fd = os.open(layout.pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        secret = layout.password.replace("\\", "\\\\").replace(":", "\\:")
        fh.write(f"127.0.0.1:*:*:postgres:{secret}\n")
    _own(layout.pgpass)

    fresh = not (layout.primary_dir / "PG_VERSION").exists()
    if fresh:
        _initdb(layout.primary_dir, layout.password, "--data-checksums")
        with open(layout.primary_dir / "postgresql.conf", "a") as fh:
            fh.write(_primary_settings(layout))
        (layout.primary_dir / "pg_hba.conf").write_text(_hba())
        _own(layout.primary_dir / "pg_hba.conf")
    start(layout.primary_dir)
    if fresh:
        psql(layout, layout.primary_port, "CREATE EXTENSION IF NOT EXISTS amcheck")  # integrity checks on the primary
        pgbackrest(layout, "stanza-create")
        pgbackrest(layout, "check")
        pgbackrest(layout, "--type=full", "backup", timeout=600)
    if with_replica and layout.replica_port:
        ensure_replica(layout)


def build_single(root: Path, port: int, password: str, *, durable: bool = True) -> Path:
    """Create (first time) and start a plain PostgreSQL server under ``root/pg/data``: no archiving, no replica.

    Used for an application's own database, such as the Prefect server's. ``durable=False`` turns fsync off
    for throw-away test servers. A stopped server starts on ``port`` even if it was created on another one.
    Returns the data directory. Idempotent.
    """
    if not (PG_BIN / "initdb").exists():
        raise SandboxError(f"PostgreSQL 15 binaries not found in {PG_BIN}; install the postgresql package")
    data_dir = root / "pg" / "data"
    sockets = root / "pg" / "sockets"
    for path in (root, root / "pg", sockets):
        _mkdir(path, 0o755)
    if not (data_dir / "PG_VERSION").exists():
        _initdb(data_dir, password)
        with open(data_dir / "postgresql.conf", "a") as fh:
            fh.write("\n# dr sandbox\ninclude_if_exists = 'dr.conf'\n")
        (data_dir / "pg_hba.conf").write_text(_hba())
        _own(data_dir / "pg_hba.conf")
    if not is_running(data_dir):
        settings = (
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{sockets}'\n"
            "max_connections = 100\n"
            "shared_buffers = '64MB'\n"
            + ("" if durable else "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        )
        (data_dir / "dr.conf").write_text(settings)
        _own(data_dir / "dr.conf")
    start(data_dir)
    return data_dir


def pgbackrest(layout: ClusterLayout, *args: str, timeout: float = 300) -> str:
    proc = _run(["pgbackrest", f"--config={layout.pgbackrest_conf}", f"--stanza={STANZA}", *args], timeout=timeout)
    return proc.stdout


def replica_streaming(layout: ClusterLayout) -> bool:
    try:
        out = psql(layout, layout.primary_port, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'", timeout=20)
    except SandboxError:
        return False
    return out.strip() not in ("", "0")


def ensure_replica(layout: ClusterLayout, timeout: float = 60) -> None:
    """Start the replica, or clone it afresh when it does not start or no longer follows the primary.

    A sandbox replica holds nothing the primary and the repository lack, so a broken one is
    replaced rather than kept.
    """
    if (layout.replica_dir / "PG_VERSION").exists():
        try:
            start(layout.replica_dir)
        except SandboxError:
            pass  # replaced below
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and is_running(layout.replica_dir):
            if replica_streaming(layout):
                return
            time.sleep(0.5)
        stop(layout.replica_dir, "immediate")
    if layout.replica_dir.exists():
        shutil.rmtree(layout.replica_dir)
    try:
        _run([str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(layout.primary_port), "-U", "postgres",
              "-D", str(layout.replica_dir), "-R", "-X", "stream", "-c", "fast", "--no-password"],
             env={"PGPASSFILE": str(layout.pgpass)}, timeout=600)
    except SandboxError:
        shutil.rmtree(layout.replica_dir, ignore_errors=True)
        raise
    with open(layout.replica_dir / "postgresql.auto.conf", "a") as fh:
        fh.write(f"port = '{layout.replica_port}'\n")
    start(layout.replica_dir)
    deadline = time.monotonic() + timeout
    while not replica_streaming(layout):
        if time.monotonic() > deadline:
            raise SandboxError(f"replica on port {layout.replica_port} is not streaming after {timeout:.0f}s")
        time.sleep(0.3)


def stop_all(root: Path) -> list[str]:
    """Stop every PostgreSQL instance whose data directory lies under ``root``; return their paths."""
    stopped = []
    pg = root / "pg"
    if not pg.exists():
        return stopped
    for pid_file in sorted(pg.glob("**/postmaster.pid")):
        data_dir = pid_file.parent
        stop(data_dir, "fast")
        if (data_dir / "postmaster.pid").exists():
            stop(data_dir, "immediate")
        stopped.append(str(data_dir))
    return stopped
