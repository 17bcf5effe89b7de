"""pgBackRest, driven as the database's operating-system user with an explicit config file."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone

from blocks._process import chown_to, run_as
from blocks.errors import BackupError, CommandFailed, InvalidInput

_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_RESTORE_POINT = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: RESTORE_POINT (.+)$")
_BACKUP_SET = re.compile(r"restore backup set (\S+)")
_HISTORY_ENTRY = re.compile(r"^\s*(\d+)\s+([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})\b")
_VERIFY_PROBLEM = re.compile(r"status: (error|invalid)|checksum invalid|invalid checksum|missing|ERROR|WARN")


def parse_verify_output(output: str) -> list[str]:
    """Problems reported by ``pgbackrest verify`` (it exits 0 even when files are corrupt)."""
    return [" ".join(line.split()) for line in output.splitlines() if _VERIFY_PROBLEM.search(line)]


@dataclass(frozen=True)
class BackupSet:
    """One backup in the repository."""

    label: str
    type: str
    started_at: datetime
    stopped_at: datetime
    error: bool
    size_bytes: int
    lsn_stop: str = "0/0"


def parse_timeline_history(text: str) -> dict[int, str]:
    """A timeline history file as {ancestor timeline: WAL position where the next timeline branched off it}."""
    forks = {}
    for line in (text or "").splitlines():
        entry = _HISTORY_ENTRY.match(line)
        if entry:
            high, _, low = entry.group(2).upper().partition("/")
            forks[int(entry.group(1))] = f"{int(high, 16):X}/{int(low, 16):X}"
    return forks


def lsn_value(lsn: str) -> int:
    """An LSN such as ``0/5037608`` as a number, for ordering."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low or "0", 16)


@dataclass(frozen=True)
class PgBackRest:
    """The commands of one pgBackRest stanza.

    Args:
        stanza: the stanza name.
        config: path of the pgbackrest.conf to use (always passed explicitly).
        os_user: the user every command runs as (the database's owner).
        timeout: upper bound for one command, in seconds.
    """

    stanza: str
    config: str
    os_user: str
    timeout: float = 1800.0

    def _run(self, command: str, *options: str, params: tuple[str, ...] = (), timeout: float | None = None,
             check: bool = True):
        cmd = ["pgbackrest", f"--config={self.config}", f"--stanza={self.stanza}", *options, command, *params]
        try:
            return run_as(cmd, user=self.os_user, timeout=timeout or self.timeout, check=check)
        except CommandFailed as exc:
            raise BackupError(f"pgBackRest {command} failed for stanza {self.stanza!r}: {exc}") from exc

    def stanza_create(self) -> None:
        """Create the stanza (idempotent in pgBackRest)."""
        self._run("stanza-create")

    def check(self) -> None:
        """Confirm archiving and the repository work (pushes a WAL switch)."""
        self._run("check", timeout=120)

    def verify(self, timeout: float | None = None) -> list[str]:
        """Problems ``pgbackrest verify`` reports in the repository (it exits 0 even on a corrupted file)."""
        try:
            proc = self._run("verify", "--log-level-console=info", timeout=timeout, check=False)
        except BackupError as exc:  # overran its timeout
            return [f"verify did not finish: {exc}"]
        problems = parse_verify_output(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            problems.insert(0, f"verify exited {proc.returncode}")
        return problems

    def backup(self, kind: str = "full") -> BackupSet:
        """Take a backup of ``kind`` (full, diff, incr) and return it."""
        self._run("backup", f"--type={kind}", "--start-fast")
        sets = self.backups()
        if not sets:
            raise BackupError(f"pgBackRest reported success but stanza {self.stanza!r} lists no backup")
        return sets[-1]

    def info(self) -> dict:
        """The stanza's ``info --output=json`` document."""
        proc = self._run("info", "--output=json", timeout=120)
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise BackupError(f"pgBackRest info for stanza {self.stanza!r} is not JSON") from exc
        for stanza in data:
            if stanza.get("name") == self.stanza:
                return stanza
        raise BackupError(f"pgBackRest has no stanza {self.stanza!r} in {self.config}")

    def backups(self) -> list[BackupSet]:
        """Backups oldest first."""
        out = []
        for item in self.info().get("backup", []):
            out.append(
                BackupSet(
                    label=item["label"],
                    type=item["type"],
                    started_at=datetime.fromtimestamp(item["timestamp"]["start"], timezone.utc),
                    stopped_at=datetime.fromtimestamp(item["timestamp"]["stop"], timezone.utc),
                    error=bool(item.get("error", False)),
                    size_bytes=int(item.get("info", {}).get("size", 0)),
                    lsn_stop=item.get("lsn", {}).get("stop", "0/0"),
                )
            )
        return out

    def archive_range(self) -> tuple[str, str] | None:
        """Oldest and newest archived WAL segment names of the current database id."""
        archives = self.info().get("archive", [])
        if not archives:
            return None
        current = archives[-1]
        if not current.get("min") or not current.get("max"):
            return None
        return current["min"], current["max"]

    def restore(
        self,
        data_directory: str,
        *,
        target_type: str,
        target: str,
        port: int,
        tablespace_dir: str | None = None,
        backup_set: str | None = None,
    ) -> str:
        """Restore into ``data_directory`` (never the live one) up to ``target``; return the backup set used."""
        args = [
            f"--pg1-path={data_directory}",
            f"--type={target_type}",
            f"--target={target}",
            "--target-action=promote",
            "--recovery-option=archive_mode=off",
            f"--recovery-option=port={port}",
        ]
        if tablespace_dir:
            args.append(f"--tablespace-map-all={tablespace_dir}")
        if backup_set:
            args.append(f"--set={backup_set}")
        # Never reuse files in place: the target is always a new directory.
        args += ["--no-delta", "--no-link-all"]
        proc = self._run("restore", *args, "--log-level-console=info")
        match = _BACKUP_SET.search(proc.stdout + proc.stderr)
        return match.group(1).rstrip(",") if match else "unknown"

    def timeline_history(self, timeline: int) -> str | None:
        """The archived history file of ``timeline`` (None when the archive holds none)."""
        name = f"{timeline:08X}.history"
        workdir = tempfile.mkdtemp(prefix="dr-wal-")
        try:
            chown_to(workdir, self.os_user)
            dest = os.path.join(workdir, name)
            got = self._run("archive-get", params=(name, dest), timeout=120, check=False)
            if got.returncode != 0 or not os.path.exists(dest):
                return None
            with open(dest) as fh:
                return fh.read()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def newest_timeline(self, probe: int = 8) -> tuple[int, str | None] | None:
        """The newest timeline the archive knows and its history file (None for timeline 1 or an unreadable file).

        The newest archived segment names a timeline; a history file of a later one (pushed at a
        promotion before any of its segments) wins, looking at most ``probe`` timelines further.
        """
        span = self.archive_range()
        if span is None:
            return None
        timeline = int(span[1][:8], 16)
        text = self.timeline_history(timeline) if timeline > 1 else ""
        for _ in range(probe):
            later = self.timeline_history(timeline + 1)
            if later is None:
                break
            timeline, text = timeline + 1, later
        return timeline, text

    def archive_push(self, wal_path: str) -> None:
        """Push one WAL segment or history file into the repository."""
        self._run("archive-push", params=(wal_path,), timeout=300)

    def restore_points(self, pg_waldump: str, max_segments: int = 512) -> dict[str, str]:
        """Restore points found in the archived WAL, name -> LSN of the newest one (scans at most ``max_segments``)."""
        span = self.archive_range()
        if span is None:
            return {}
        names: dict[str, str] = {}
        workdir = tempfile.mkdtemp(prefix="dr-wal-")
        try:
            chown_to(workdir, self.os_user)
            for segment in list(_segments_between(*span))[-max_segments:]:
                dest = os.path.join(workdir, segment)
                got = self._run("archive-get", params=(segment, dest), timeout=120, check=False)
                if got.returncode != 0 or not os.path.exists(dest):
                    continue
                dump = run_as(
                    [pg_waldump, "--rmgr=XLOG", dest], user=self.os_user, timeout=120, check=False
                )
                for line in dump.stdout.splitlines():
                    found = _RESTORE_POINT.search(line)
                    if found:
                        names[found.group(2).strip()] = found.group(1)
                os.unlink(dest)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return names


def format_target_time(moment: datetime) -> str:
    """A tz-aware time as pgBackRest's ``--target`` wants it: in UTC, every microsecond kept, offset spelled out.

    ``recovery_target_time`` is exact to the microsecond (a commit stamped later than the target is
    not replayed), so a target cut to milliseconds would lose the commits of its last millisecond.
    pgBackRest wants a space between date and time, and reads a time without an offset as the
    host's local time.

    Example:
        >>> format_target_time(datetime.fromisoformat("2026-11-23T10:00:00.123457+02:00"))
        '2026-11-23 08:00:00.123457+00:00'
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidInput(f"recovery target {moment.isoformat()} has no time zone; give an explicit UTC offset")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") + "+00:00"


def _segments_between(first: str, last: str):
    """Every 16 MB WAL segment name from ``first`` to ``last`` over the timelines in between."""
    a, b = _SEGMENT.match(first), _SEGMENT.match(last)
    if not a or not b:
        return
    tli_a, tli_b = int(a.group(1), 16), int(b.group(1), 16)
    pos_a = int(a.group(2), 16) * 256 + int(a.group(3), 16)
    pos_b = int(b.group(2), 16) * 256 + int(b.group(3), 16)
    for pos in range(pos_a, pos_b + 1):
        for tli in range(tli_a, tli_b + 1):
            yield f"{tli:08X}{pos // 256:08X}{pos % 256:08X}"
