"""Replication verbs of :class:`blocks.postgres.PostgresCluster`: lag, timelines, promotion of a replica, resync."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from blocks._process import chown_to, run_as, wait_until
from blocks.errors import BackupError, CommandFailed, InvalidInput, PostgresError, PostgresUnavailable, RecoveryError
from blocks.pgbackrest import lsn_value, parse_timeline_history

# Configuration files pg_rewind and pg_basebackup copy from the source; each instance keeps its own.
CONFIG_FILES = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")
# Settings that belong to one instance's role at one moment and never survive a resync.
ROLE_SETTINGS = ("default_transaction_read_only", "primary_conninfo", "primary_slot_name", "recovery_target",
                 "recovery_target_time", "recovery_target_name", "recovery_target_lsn", "recovery_target_xid",
                 "recovery_target_action", "recovery_target_timeline", "restore_command")
# Connection failures that show nothing answers at the address. Anything else a failed connect reports
# (authentication, pg_hba.conf, too many clients, starting up or shutting down) comes from a running server.
UNREACHABLE_MESSAGES = ("connection refused", "timeout expired", "timed out", "no such file or directory",
                        "no route to host", "network is unreachable")


def proves_unreachable(exc: PostgresUnavailable) -> bool:
    """True when a failed connection shows that no server answers (refused or timed out), not that one refused us."""
    if exc.__cause__ is not None and getattr(exc.__cause__, "sqlstate", None):
        return False
    text = str(exc.__cause__ or exc).lower()
    return any(marker in text for marker in UNREACHABLE_MESSAGES)


@dataclass(frozen=True)
class TimelineHistory:
    """The timeline a primary writes and where its history left each ancestor timeline.

    ``forks`` maps an ancestor timeline to the WAL position where the next timeline branched off
    it; None when the history file could not be read.
    """

    timeline: int
    forks: dict[int, str] | None
    source: str


@dataclass(frozen=True)
class TimelineCheck:
    """Whether an instance is on the primary's timeline, with the primary's history: only then may it be promoted."""

    address: str
    port: int
    timeline: int | None
    position: str | None
    primary_timeline: int | None
    on_history: bool
    detail: str


@dataclass(frozen=True)
class ReplicaLag:
    """How far a replica is behind, and the most data promoting it now could lose.

    ``seconds`` is an upper bound of the data-loss window: the time between the last commit the
    replica replayed and the primary's newest WAL (primary reachable) or the moment the primary
    was lost (primary unreachable; WAL the replica never received cannot be measured).
    """

    address: str
    port: int
    is_primary: bool
    bytes: int | None
    seconds: float | None
    measured_from: str
    last_replayed_commit: datetime | None
    detail: str
    received_lsn: str | None = None
    timeline: int | None = None
    primary_timeline: int | None = None
    on_history: bool = True

    @property
    def received_position(self) -> int:
        """``received_lsn`` as a number (-1 when unknown): more WAL received ranks higher."""
        if not self.received_lsn or "/" not in self.received_lsn:
            return -1
        high, low = self.received_lsn.split("/", 1)
        return (int(high, 16) << 32) + int(low, 16)

    def within(self, rpo_seconds: float) -> bool:
        """True when the replica is on the primary's timeline and its data-loss window is known and at most ``rpo_seconds``."""
        return self.on_history and self.seconds is not None and self.seconds <= rpo_seconds

    def as_dict(self) -> dict:
        data = asdict(self)
        data["last_replayed_commit"] = self.last_replayed_commit.isoformat() if self.last_replayed_commit else None
        return data


@dataclass(frozen=True)
class ReplicaPromotion:
    """The outcome of promoting a replica: idempotent, so ``already_primary`` tells a re-run apart."""

    address: str
    already_primary: bool
    timeline: int
    promoted_at: str


@dataclass(frozen=True)
class Resync:
    """How an instance became a standby of a new primary again."""

    address: str
    source: str
    method: str
    moved_aside: str | None
    detail: str


def _text(value) -> str:
    """A replication command's column (text or bytes) as text."""
    return bytes(value).decode() if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


def _forks_text(forks: dict[int, str]) -> str:
    return "(" + (", ".join(f"timeline {t} left at {lsn}" for t, lsn in sorted(forks.items())) or "no fork") + ")"


class ReplicationVerbs:
    """Mixed into ``PostgresCluster``; uses its ``connect``/``query_one``/``_pg_ctl`` plumbing."""

    # ------------------------------------------------------------------ instances

    def instances(self) -> list:
        """Every instance the block knows: the primary first, then the replicas."""
        return [self.primary, *self.replicas]

    def instance_at(self, port: int):
        """The known instance listening on ``port``; an unknown port is refused."""
        for inst in self.instances():
            if inst.port == port:
                return inst
        known = ", ".join(str(i.port) for i in self.instances())
        raise InvalidInput(f"no instance of this cluster listens on port {port}; known ports: {known}")

    def _as_primary(self, port: int):
        """A copy of this block whose primary is the instance on ``port`` (for verbs that act on the primary)."""
        return self.model_copy(update={"primary": self.instance_at(port)})

    def _data_directory(self, port: int) -> str:
        inst = self.instance_at(port)
        if not inst.data_directory:
            raise InvalidInput(f"instance {inst.address} has no data_directory: it is not on this host")
        return inst.data_directory

    def role(self, port: int) -> str:
        """'primary', 'standby', 'unreachable' (refused or timed out) or 'refusing' (a server that turns us away)."""
        return self._probe(port)[0]

    def _probe(self, port: int) -> tuple[str, str]:
        """The role of the instance on ``port`` and, when it cannot be asked, why."""
        try:
            return ("standby" if self.is_in_recovery(port) else "primary"), ""
        except PostgresUnavailable as exc:
            return ("unreachable" if proves_unreachable(exc) else "refusing"), str(exc)

    def accepts_writes(self, port: int) -> bool:
        """True when the instance answers, is not in recovery and is not fenced read-only."""
        try:
            return bool(self.query_one(
                "SELECT NOT pg_is_in_recovery() AND current_setting('default_transaction_read_only') = 'off'",
                port=port))
        except PostgresUnavailable:
            return False

    def writers(self) -> list[int]:
        """Ports of the known instances that accept writes now (more than one is split brain)."""
        return [inst.port for inst in self.instances() if self.accepts_writes(inst.port)]

    # ------------------------------------------------------------------ lag

    def replica_lag(self, port: int, primary_port: int | None = None, primary_lost_at: datetime | None = None) -> ReplicaLag:
        """Measure how far the replica on ``port`` is behind ``primary_port`` (default: the block's primary).

        Args:
            port: the replica.
            primary_port: the primary it follows.
            primary_lost_at: when the primary was seen failing; bounds the data-loss window when the
                primary cannot be asked.
        """
        inst = self.instance_at(port)
        with self.connect(port) as conn:
            try:
                in_recovery, received, replayed, replay_ts, now, receiver = conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), "
                    "pg_last_xact_replay_timestamp(), now(), (SELECT status FROM pg_stat_wal_receiver)"
                ).fetchone()
            except psycopg.Error as exc:
                raise PostgresError(f"reading replication status of {inst.address} failed: {exc}") from exc
        if not in_recovery:
            return ReplicaLag(inst.address, port, True, 0, 0.0, "replica", None, f"{inst.address} is a primary")
        source = self.instance_at(primary_port) if primary_port is not None else self.primary
        # WAL positions compare only along one history: a standby of an abandoned timeline is never "caught up".
        timeline = self.history_check(port, source.port if source.port != port else None)
        if not timeline.on_history:
            return ReplicaLag(inst.address, port, False, None, None, "timeline", replay_ts, timeline.detail,
                              str(received) if received is not None else None, timeline.timeline,
                              timeline.primary_timeline, False)
        extra = (timeline.timeline, timeline.primary_timeline)
        primary_lsn = None
        if source.port != port:
            try:
                primary_lsn = self.query_one(
                    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END", port=source.port)
            except PostgresUnavailable:
                primary_lsn = None
        if primary_lsn is not None:
            behind = int(self.query_one("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)",
                                        (str(primary_lsn), str(replayed)), port=source.port))
            behind = max(behind, 0)
            if behind == 0:
                seconds = 0.0
            elif replay_ts is not None:
                seconds = max((now - replay_ts).total_seconds(), 0.0)
            else:
                seconds = None
            detail = (f"{behind} bytes of WAL behind {source.address}"
                      + (f"; last replayed commit {replay_ts.isoformat()}" if replay_ts else ""))
            return ReplicaLag(inst.address, port, False, behind, seconds, "primary", replay_ts, detail,
                              str(received) if received is not None else None, *extra)
        pending = 0
        if received is not None and replayed is not None:
            pending = max(int(self.query_one("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)",
                                             (str(received), str(replayed)), port=port)), 0)
        lost_at = primary_lost_at or now
        window = "until the primary was lost"
        if replay_ts is None:
            seconds = None
        elif replay_ts <= lost_at:
            seconds = (lost_at - replay_ts).total_seconds()
        else:
            # The primary still committed after the moment it was reported lost: that moment bounds nothing.
            seconds = max((now - replay_ts).total_seconds(), 0.0)
            window = "until now (the last replayed commit is later than the reported loss)"
        detail = (f"{source.address} unreachable; {pending} received bytes not yet replayed; WAL never received "
                  f"cannot be measured; last replayed commit {replay_ts.isoformat() if replay_ts else 'unknown'}; "
                  f"data-loss window measured {window}; received up to {received or 'unknown'}; "
                  f"receiver {receiver or 'stopped'}")
        return ReplicaLag(inst.address, port, False, pending, seconds, "replica", replay_ts, detail,
                          str(received) if received is not None else None, *extra)

    def replayed(self, port: int, lsn: str, timeout_seconds: float = 30) -> bool:
        """Wait (bounded) until the instance on ``port`` has replayed WAL up to ``lsn``.

        Returns:
            True once replayed; False when the time runs out or replay is paused (it would not progress).
        """
        if not re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", str(lsn)):
            raise InvalidInput(f"WAL position {lsn!r} is not of the form 0/3000060")

        def progress() -> str:
            return str(self.query_one(
                "SELECT CASE WHEN NOT pg_is_in_recovery() THEN "
                "  CASE WHEN pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn) >= 0 THEN 'done' ELSE 'behind' END "
                "WHEN pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s::pg_lsn) >= 0 THEN 'done' "
                "WHEN pg_get_wal_replay_pause_state() <> 'not paused' THEN 'paused' ELSE 'behind' END",
                (lsn, lsn), port=port))

        deadline = time.monotonic() + timeout_seconds
        while (state := progress()) != "done":
            if state == "paused" or time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    # ------------------------------------------------------------------ timelines

    def timeline_of(self, port: int) -> tuple[int, str, dict[int, str]]:
        """The timeline the instance on ``port`` writes or (a standby) replays, its WAL position and that timeline's history.

        Asked over a replication session (``IDENTIFY_SYSTEM``, ``TIMELINE_HISTORY``): the only place a
        standby names the timeline it replays. The block's role needs a ``replication`` entry in
        pg_hba.conf, as cloning a replica does.

        Returns:
            (timeline, WAL position, {ancestor timeline: position where the history left it}).
        """
        inst = self.instance_at(port)
        try:
            conn = psycopg.connect(host=inst.host, port=inst.port, user=self.user,
                                   password=self.password.get_secret_value(), replication="true",
                                   connect_timeout=self.connect_timeout_seconds, autocommit=True,
                                   application_name="dr-pipelines")
        except psycopg.OperationalError as exc:
            kind = PostgresError if exc.sqlstate else PostgresUnavailable
            raise kind(f"replication session to {inst.address} refused: {str(exc).strip()}") from exc
        try:
            row = conn.execute("IDENTIFY_SYSTEM").fetchone()
            timeline, position = int(row[1]), _text(row[2])
            forks: dict[int, str] = {}
            if timeline > 1:
                history = conn.execute(f"TIMELINE_HISTORY {timeline}").fetchone()
                forks = parse_timeline_history(_text(history[1]))
        except psycopg.Error as exc:
            raise PostgresError(f"reading the timeline of {inst.address} failed: {str(exc).strip()}") from exc
        finally:
            conn.close()
        return timeline, position, forks

    def primary_history(self, primary_port: int | None = None, exclude: int | None = None) -> tuple[TimelineHistory | None, list[str]]:
        """The timeline and history of the cluster's current primary, and why any source could not tell.

        The primary on ``primary_port`` (any other instance than ``exclude`` when None) is asked when
        it answers as a primary. Otherwise the newest of what the stopped instances' data directories
        on this host and the WAL archive hold: a primary that cannot be asked still left its timeline there.
        """
        notes: list[str] = []
        others = ([self.instance_at(primary_port)] if primary_port is not None
                  else [inst for inst in self.instances() if inst.port != exclude])
        silent = []
        for inst in others:
            role, reason = self._probe(inst.port)
            if role == "primary":
                try:
                    timeline, _, forks = self.timeline_of(inst.port)
                    return TimelineHistory(timeline, forks, f"asked {inst.address}"), notes
                except PostgresError as exc:
                    notes.append(str(exc))
            elif role != "standby":
                notes.append(f"{inst.address} cannot be asked ({role})")
                silent.append(inst)
        found: list[TimelineHistory] = []
        for inst in silent:
            if inst.data_directory:
                on_disk = self._history_on_disk(inst.data_directory)
                if on_disk is not None:
                    found.append(on_disk)
                else:
                    notes.append(f"{inst.data_directory} names no timeline")
        try:
            newest = self.pgbackrest.newest_timeline()
        except BackupError as exc:
            notes.append(f"the WAL archive cannot be read: {exc}")
            newest = None
        if newest is not None:
            found.append(TimelineHistory(newest[0], parse_timeline_history(newest[1]) if newest[1] is not None else None,
                                         f"WAL archive of stanza {self.pgbackrest_stanza!r}"))
        if not found:
            return None, notes
        best = max(found, key=lambda h: (h.timeline, h.forks is not None))
        return best, notes

    def _history_on_disk(self, data_dir: str) -> TimelineHistory | None:
        """The timeline of a data directory on this host: its control file, and the newest history file in pg_wal."""
        proc = run_as([self._bin("pg_controldata"), "-D", data_dir], user=self.os_user, timeout=30, check=False)
        found = re.search(r"Latest checkpoint's TimeLineID:\s+(\d+)", proc.stdout)
        timeline = int(found.group(1)) if found else 0
        wal = os.path.join(data_dir, "pg_wal")
        listing = run_as(["ls", "-1", wal], user=self.os_user, timeout=30, check=False).stdout.split()
        written = [int(name[:8], 16) for name in listing if re.fullmatch(r"[0-9A-F]{8}\.history", name)]
        timeline = max([timeline, *written])
        if timeline == 0:
            return None
        forks: dict[int, str] | None = {}
        if timeline > 1:
            text = run_as(["cat", os.path.join(wal, f"{timeline:08X}.history")], user=self.os_user, timeout=30,
                          check=False)
            forks = parse_timeline_history(text.stdout) if text.returncode == 0 else None
        return TimelineHistory(timeline, forks, f"data directory {data_dir}")

    def history_check(self, port: int, primary_port: int | None = None) -> TimelineCheck:
        """Whether the instance on ``port`` is on the primary's timeline and history (see ``primary_history``).

        A standby of another timeline is never a promotion candidate, whatever its WAL position says:
        one left on the timeline a point-in-time restore abandoned replays (and would serve) the history
        that was recovered from, and one behind on an ancestor timeline would branch a second history.
        """
        inst = self.instance_at(port)
        history, notes = self.primary_history(primary_port, exclude=port)
        primary_timeline = history.timeline if history else None
        try:
            timeline, position, forks = self.timeline_of(port)
        except PostgresError as exc:
            return TimelineCheck(inst.address, port, None, None, primary_timeline, False,
                                 f"{inst.address}: its timeline cannot be read ({exc}); it is not a promotion candidate")
        where = f"{inst.address} is on timeline {timeline} at {position}"
        if history is None:
            return TimelineCheck(inst.address, port, timeline, position, None, False,
                                 f"{where}, but the primary's timeline cannot be established ({'; '.join(notes)}); "
                                 "it is not a promotion candidate")
        theirs = f"the primary's timeline {history.timeline} ({history.source})"
        if timeline == history.timeline and (history.forks is None or forks == history.forks):
            return TimelineCheck(inst.address, port, timeline, position, history.timeline, True, f"{where}, {theirs}")
        fork = (history.forks or {}).get(timeline)
        if timeline == history.timeline:
            why = f"its history {_forks_text(forks)} is not the primary's {_forks_text(history.forks or {})}"
        elif fork is not None and lsn_value(position) > lsn_value(fork):
            why = (f"it holds WAL of timeline {timeline} past {fork}, where the primary's history left that timeline: "
                   "it replays the abandoned history")
        elif fork is not None:
            why = f"it has not switched to timeline {history.timeline}, which branched off at {fork}"
        elif timeline > history.timeline:
            why = "a newer timeline than the primary's: it follows another history"
        else:
            why = f"timeline {timeline} is not in the primary's history {_forks_text(history.forks or {})}"
        return TimelineCheck(inst.address, port, timeline, position, history.timeline, False,
                             f"{where}, not on {theirs}: {why}; it is not a promotion candidate")

    # ------------------------------------------------------------------ fencing by instance

    def fence_instance(self, port: int) -> int:
        """Fence the instance on ``port`` (see ``fence``); returns the client sessions ended."""
        return self._as_primary(port).fence()

    def unfence_instance(self, port: int) -> None:
        """Let connections and writes into the instance on ``port`` again."""
        self._as_primary(port).unfence()

    def fence_old_primary(self, port: int, stop: bool = True) -> dict:
        """Make sure the instance on ``port`` can no longer take writes before another one is promoted.

        An instance that answers is fenced (see ``fence``). One that runs on this host is stopped when
        ``stop`` is set, whether or not it lets us in. Only an instance that refuses the TCP
        connection or does not answer in time (and, when local, is not running) is recorded as
        unreachable; a remote server that turns our session away cannot be fenced from here.

        Returns:
            ``{"address", "state", "sessions_ended", "final_lsn"}`` with state 'unreachable', 'fenced'
            or 'stopped'; ``final_lsn`` is the fenced primary's last WAL position when it could be read.

        Raises:
            PostgresError: the instance runs but cannot be fenced or stopped, or still accepts writes afterwards.
        """
        inst = self.instance_at(port)
        local_running = bool(inst.data_directory) and self.instance_running(inst.data_directory)
        role, reason = self._probe(port)
        if role == "unreachable" and not local_running:
            return {"address": inst.address, "state": "unreachable", "sessions_ended": 0, "final_lsn": None}
        if role not in ("primary", "standby") and not (stop and local_running):
            raise PostgresError(f"{inst.address} runs but cannot be fenced from here ({reason or 'not answering'}); "
                                "stop it by hand before another instance is promoted")
        ended, final_lsn, state = 0, None, "running"
        if role in ("primary", "standby"):
            ended = self.fence_instance(port)
            state = "fenced"
            if role == "primary":
                final_lsn = str(self.query_one("SELECT pg_current_wal_lsn()", port=port))
        if stop and local_running:
            self.stop_instance(inst.data_directory)
            if self.instance_running(inst.data_directory):
                raise PostgresError(f"{inst.address} is still running after the stop; refusing a second writer")
            state = "stopped"
        elif self.accepts_writes(port):
            raise PostgresError(f"{inst.address} still accepts writes after fencing; refusing a second writer")
        return {"address": inst.address, "state": state, "sessions_ended": ended, "final_lsn": final_lsn}

    # ------------------------------------------------------------------ start / stop

    def stop_at(self, port: int, mode: str = "fast") -> None:
        """Stop the local instance on ``port``; already stopped is fine."""
        if mode not in ("smart", "fast", "immediate"):
            raise InvalidInput(f"stop mode {mode!r} is not one of smart, fast, immediate")
        self.stop_instance(self._data_directory(port), mode)

    def start_at(self, port: int) -> None:
        """Start the local instance on ``port`` unless it runs."""
        self.start_instance(self._data_directory(port), port)
        wait_until(lambda: self.role(port) in ("primary", "standby"), timeout=self.start_timeout_seconds, interval=0.2,
                   what=f"instance on port {port} to accept sessions")

    # ------------------------------------------------------------------ promotion

    def promote(self, port: int, timeout_seconds: int = 60) -> ReplicaPromotion:
        """Promote the replica on ``port`` to a primary and open it for writes.

        A fence the old primary replicated to it (connection limits) is lifted. Idempotent: a
        primary is left as it is. A standby that is not on the primary's timeline and history (see
        ``history_check``) is refused before anything changes.
        """
        inst = self.instance_at(port)
        if self.is_in_recovery(port):
            check = self.history_check(port)
            if not check.on_history:
                raise PostgresError(f"{inst.address} is not promoted: {check.detail}")
        self.archive_from_own_directory(port)
        if not self.is_in_recovery(port):
            self.unfence_instance(port)
            return ReplicaPromotion(inst.address, True, self._timeline(port), "")
        ok = self.query_one("SELECT pg_promote(true, %s)", (int(timeout_seconds),), port=port)
        if not ok:
            raise PostgresError(f"{inst.address} did not finish promotion within {timeout_seconds} s")
        wait_until(lambda: not self.is_in_recovery(port), timeout=timeout_seconds, interval=0.2,
                   what=f"{inst.address} to leave recovery")
        # The control file names the new timeline only after a checkpoint; pg_rewind reads it from there.
        self.query_one("CHECKPOINT", port=port)
        self.unfence_instance(port)
        return ReplicaPromotion(inst.address, False, self._timeline(port), datetime.now(timezone.utc).isoformat())

    def archive_from_own_directory(self, port: int) -> str | None:
        """Make a pgBackRest ``archive_command`` of the instance name its own data directory.

        pgBackRest refuses to archive from a data directory other than the stanza's ``pg1-path``,
        so a promoted replica would leave a gap in the WAL archive. The setting goes into the
        instance's ``postgresql.auto.conf`` (a standby cannot run ALTER SYSTEM) and is reloaded.

        Returns:
            The archive command in effect afterwards (None when the instance is not on this host).
        """
        inst = self.instance_at(port)
        if not inst.data_directory:
            return None
        current = str(self.query_one("SELECT current_setting('archive_command')", port=port) or "")
        if "pgbackrest" not in current or " archive-push" not in current:
            return current
        own = f"--pg1-path={inst.data_directory}"
        if re.search(r"--pg1-path=\S+", current):
            wanted = re.sub(r"--pg1-path=\S+", lambda _: own, current, count=1)
        else:
            wanted = current.replace(" archive-push", f" {own} archive-push", 1)
        if wanted == current:
            return current
        path = os.path.join(inst.data_directory, "postgresql.auto.conf")
        with open(path) as fh:
            lines = [ln for ln in fh if ln.split("=", 1)[0].strip() != "archive_command"]
        quoted = wanted.replace("'", "''")
        lines.append(f"archive_command = '{quoted}'\n")
        with open(path, "w") as fh:
            fh.writelines(lines)
        chown_to(path, self.os_user)
        self.query_one("SELECT pg_reload_conf()", port=port)
        wait_until(lambda: self.query_one("SELECT current_setting('archive_command')", port=port) == wanted,
                   timeout=10, what=f"{inst.address} to reload its archive_command")
        return wanted

    def _timeline(self, port: int) -> int:
        return int(self.query_one("SELECT timeline_id FROM pg_control_checkpoint()", port=port))

    # ------------------------------------------------------------------ following a primary

    def follows(self, port: int, source_port: int) -> bool:
        """True when the instance on ``port`` streams WAL from the instance on ``source_port``."""
        try:
            row = self.query_one(
                "SELECT row_to_json(r)::text FROM (SELECT status, sender_port FROM pg_stat_wal_receiver) r", port=port)
        except PostgresUnavailable:
            return False
        if not row:
            return False
        status = json.loads(row)
        return status.get("status") == "streaming" and status.get("sender_port") == source_port

    def resync_as_standby(self, port: int, source_port: int, allow_clone: bool = True, timeout_seconds: int = 120,
                          rewind: bool = True) -> Resync:
        """Make the instance on ``port`` a streaming standby of the primary on ``source_port``.

        The instance is stopped and rewound with ``pg_rewind`` (as the OS user, password from a
        private pgpass file); when rewinding is impossible (or ``rewind`` is off) and ``allow_clone``
        is set, its data directory is moved aside (never deleted) and a fresh ``pg_basebackup`` clone
        takes its place. Its own configuration files are kept either way. Idempotent: a standby
        already streaming from the source is left as it is.
        """
        if port == source_port:
            raise InvalidInput(f"instance on port {port} cannot follow itself")
        inst, source = self.instance_at(port), self.instance_at(source_port)
        data_dir = self._data_directory(port)
        if self.follows(port, source_port) and not self._stale_role_settings(data_dir):
            return Resync(inst.address, source.address, "already-following", None, "already streaming")
        if self.role(source_port) != "primary":
            raise PostgresError(f"{source.address} is not a running primary; nothing to follow")
        if not rewind and not allow_clone:
            raise InvalidInput(f"resync of port {port}: rewind=False needs allow_clone=True (nothing else would resync it)")
        saved = self._read_config(self._config_source(data_dir))
        self.stop_instance(data_dir)
        moved_aside = None
        method, detail, reason = "rewind", "", "pg_rewind not tried"
        try:
            if not rewind:
                raise CommandFailed("pg_rewind", None, "not tried: a fresh clone was asked for")
            if not os.path.exists(os.path.join(data_dir, "PG_VERSION")):
                raise CommandFailed("pg_rewind", 1, f"{data_dir} holds no data directory")
            detail = self._rewind(data_dir, source)
        except CommandFailed as exc:
            if not allow_clone:
                raise PostgresError(f"pg_rewind of {data_dir} from {source.address} failed: {exc}") from exc
            method = "clone"
            reason = "a fresh clone was asked for" if not rewind else f"pg_rewind failed ({str(exc)[:200]})"
        if method == "clone":
            if os.path.exists(data_dir):
                moved_aside = self._move_aside(data_dir, "failed" if rewind else "abandoned")
            else:
                moved_aside = self._newest_moved_aside(data_dir)
            self._clone(data_dir, source)
            detail = f"{reason}; cloned afresh, old data directory kept at {moved_aside}"
        self._configure_standby(data_dir, port, source, saved)
        self.start_instance(data_dir, port)
        wait_until(lambda: self.follows(port, source_port), timeout=timeout_seconds, interval=0.3,
                   what=f"{inst.address} to stream from {source.address}")
        return Resync(inst.address, source.address, method, moved_aside, detail)

    def rebuild_from_primary(self, port: int, timeout_seconds: int = 120) -> Resync:
        """Make the replica on ``port`` a standby of the primary a point-in-time restore put at the endpoint.

        A replica streaming from the primary, on its timeline, is left as it is. Any other one holds
        (or may hold) the history the restore abandoned: it is stopped, its data directory is moved
        aside to ``<dir>.abandoned-<time>`` (never deleted) and a fresh clone of the primary takes
        its place. When the clone fails the replica is left stopped, so it neither serves reads of
        the abandoned history nor can be promoted, and the error says so. A replica on another host
        cannot be rebuilt from here: one off the primary's timeline is reported as an error.

        Returns:
            What was done: method 'already-following' or 'clone' (with where the old directory went).
        """
        inst, primary = self.instance_at(port), self.primary
        if port == primary.port:
            raise InvalidInput(f"port {port} is the primary's; only replicas are rebuilt from it")
        if self.follows(port, primary.port):
            check = self.history_check(port, primary.port)
            if check.on_history:
                return Resync(inst.address, primary.address, "already-following", None, check.detail)
        if not inst.data_directory:
            check = self.history_check(port, primary.port)
            if check.on_history:
                return Resync(inst.address, primary.address, "on-timeline", None,
                              f"{check.detail}; not streaming from {primary.address} and not on this host")
            raise PostgresError(f"{check.detail}. It is not on this host and cannot be rebuilt from here: rebuild it "
                                f"by hand from {primary.address}")
        try:
            return self.resync_as_standby(port, primary.port, timeout_seconds=timeout_seconds, rewind=False)
        except (RecoveryError, OSError) as exc:
            with contextlib.suppress(RecoveryError):
                self.stop_instance(inst.data_directory, "immediate")
            state = "still running" if self.instance_running(inst.data_directory) else "stopped"
            raise PostgresError(f"rebuilding {inst.address} from {primary.address} failed ({exc}); it is left {state} "
                                f"and is no promotion candidate; its old data directory is kept "
                                f"({self._newest_moved_aside(inst.data_directory) or inst.data_directory})") from exc

    def _stale_role_settings(self, data_dir: str) -> list[str]:
        """Recovery settings a standby must not carry (a recovery target would end its following and promote it)."""
        path = os.path.join(data_dir, "postgresql.auto.conf")
        try:
            with open(path) as fh:
                keys = [line.split("=", 1)[0].strip() for line in fh if "=" in line and not line.lstrip().startswith("#")]
        except OSError:
            return []
        return [k for k in keys if k.startswith("recovery_target") or k in ("restore_command", "default_transaction_read_only")]

    def _move_aside(self, data_dir: str, label: str) -> str:
        """Rename ``data_dir`` to ``<data_dir>.<label>-<UTC time>`` (never deleted); returns the new path."""
        stamp = f"{data_dir.rstrip('/')}.{label}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        aside, n = stamp, 1
        while os.path.exists(aside):
            n += 1
            aside = f"{stamp}-{n}"
        try:
            os.rename(data_dir, aside)
        except OSError as err:
            raise PostgresError(f"moving {data_dir} aside to {aside} failed: {err}") from err
        return aside

    def _newest_moved_aside(self, data_dir: str) -> str | None:
        """The newest copy of ``data_dir`` an earlier resync moved aside, if any."""
        parent, base = os.path.split(data_dir.rstrip("/"))
        pattern = re.compile(re.escape(base) + r"\.(?:failed|abandoned)-(\d{8}T\d{6}Z)(?:-(\d+))?$")
        try:
            names = [(m.group(1), int(m.group(2) or 1), n) for n in os.listdir(parent) if (m := pattern.match(n))]
        except OSError:
            return None
        return os.path.join(parent, max(names)[2]) if names else None

    def _config_source(self, data_dir: str) -> str:
        """Where the instance's own configuration is: its data directory, or (after a clone that failed
        half-way) the newest copy moved aside."""
        if os.path.exists(os.path.join(data_dir, "postgresql.conf")):
            return data_dir
        return self._newest_moved_aside(data_dir) or data_dir

    def _read_config(self, data_dir: str) -> dict[str, str]:
        saved = {}
        for name in CONFIG_FILES:
            path = os.path.join(data_dir, name)
            try:
                if os.path.exists(path):
                    with open(path) as fh:
                        saved[name] = fh.read()
            except OSError as exc:
                raise PostgresError(f"reading {path} failed: {exc}") from exc
        return saved

    def _source_conninfo(self, source) -> str:
        return make_conninfo(host=source.host, port=source.port, user=self.user, dbname=self.database,
                             connect_timeout=self.connect_timeout_seconds)

    def _rewind(self, data_dir: str, source) -> str:
        self.query_one("CHECKPOINT", port=source.port)  # a freshly promoted source must name its new timeline
        with self._pgpass() as env:
            proc = run_as([self._bin("pg_rewind"), f"--target-pgdata={data_dir}",
                           f"--source-server={self._source_conninfo(source)}", "--progress"],
                          user=self.os_user, timeout=self.start_timeout_seconds, env=env)
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        return "pg_rewind: " + (lines[-1] if lines else "done")

    def _clone(self, data_dir: str, source) -> None:
        parent = os.path.dirname(data_dir.rstrip("/"))
        os.makedirs(parent, exist_ok=True)
        with self._pgpass() as env:
            try:
                run_as([self._bin("pg_basebackup"), f"--dbname={self._source_conninfo(source)}", "-D", data_dir,
                        "-X", "stream", "-c", "fast", "--no-password"],
                       user=self.os_user, timeout=self.start_timeout_seconds * 4, env=env)
            except CommandFailed as exc:
                raise PostgresError(f"cloning {source.address} into {data_dir} failed: {exc}") from exc

    def _standby_passfile(self, data_dir: str) -> str:
        """A pgpass file the standby keeps for reconnecting: an existing one of the cluster, else one beside it."""
        for inst in self.instances():
            if not inst.data_directory:
                continue
            conf = os.path.join(inst.data_directory, "postgresql.auto.conf")
            try:
                with open(conf) as fh:
                    text = fh.read()
            except OSError:
                continue
            for line in text.splitlines():
                if line.split("=", 1)[0].strip() == "primary_conninfo":
                    value = line.split("=", 1)[1].strip().strip("'").replace("''", "'")
                    passfile = conninfo_to_dict(value).get("passfile")
                    if passfile and os.path.exists(passfile):
                        return passfile
        path = f"{data_dir.rstrip('/')}.pgpass"
        secret = self.password.get_secret_value().replace("\\", "\\\\").replace(":", "\\:")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(f"*:*:*:{self.user}:{secret}\n")
        chown_to(path, self.os_user)
        return path

    def _configure_standby(self, data_dir: str, port: int, source, saved: dict[str, str]) -> None:
        """Put the instance's own configuration back and point it at ``source`` as a standby."""
        for name, text in saved.items():
            path = os.path.join(data_dir, name)
            with open(path, "w") as fh:
                fh.write(text)
            chown_to(path, self.os_user)
        conninfo = make_conninfo(host=source.host, port=source.port, user=self.user,
                                 passfile=self._standby_passfile(data_dir), application_name=f"standby_{port}")
        auto = os.path.join(data_dir, "postgresql.auto.conf")
        lines = []
        if os.path.exists(auto):
            with open(auto) as fh:
                lines = [ln for ln in fh if ln.split("=", 1)[0].strip() not in (*ROLE_SETTINGS, "port")]
        quoted = conninfo.replace("'", "''")
        lines += [f"port = '{port}'\n", f"primary_conninfo = '{quoted}'\n"]
        with open(auto, "w") as fh:
            fh.writelines(lines)
        chown_to(auto, self.os_user)
        signal = os.path.join(data_dir, "standby.signal")
        open(signal, "a").close()
        chown_to(signal, self.os_user)
        recovery_signal = os.path.join(data_dir, "recovery.signal")
        if os.path.exists(recovery_signal):
            os.remove(recovery_signal)

    # ------------------------------------------------------------------ planned switchover

    def switchover(self, to_port: int, timeout_seconds: int = 120) -> dict:
        """Hand the primary role to the standby on ``to_port`` without losing a commit.

        The current primary is fenced, the standby waits until it has replayed everything,
        the old primary stops cleanly, the standby is promoted and opened for writes, and every
        other local instance is rewound to follow it. Idempotent: a re-run finishes what is left.

        Returns:
            What happened: the old and new primary, the promotion and the resync of each other instance.
        """
        target = self.instance_at(to_port)
        others = [inst for inst in self.instances() if inst.port != to_port]
        roles = {inst.port: self._probe(inst.port) for inst in others}
        writers = [inst for inst in others if roles[inst.port][0] == "primary"]
        unknown = [f"{inst.address} ({roles[inst.port][0]})" for inst in others
                   if roles[inst.port][0] not in ("primary", "standby")
                   and not (inst.data_directory and not self.instance_running(inst.data_directory))]
        old = None
        if self.role(to_port) == "primary":
            if writers:
                raise PostgresError(f"{target.address} and {writers[0].address} are both primaries; resolve by hand")
            if unknown:
                raise PostgresError(f"{target.address} is a primary but {', '.join(unknown)} cannot be asked; it may be "
                                    "the serving primary, so it is not opened for writes")
            if self.query_one("SELECT current_setting('default_transaction_read_only')", port=to_port) == "on":
                raise PostgresError(f"{target.address} is a fenced primary no switchover promoted; it stays fenced")
            promotion = ReplicaPromotion(target.address, True, self._timeline(to_port), "")
        else:
            if len(writers) != 1:
                raise PostgresError(f"expected one running primary to switch over from, found {len(writers)}")
            old = writers[0]
            if unknown:
                raise PostgresError(f"{', '.join(unknown)} cannot be asked; refusing to switch over")
            if not old.data_directory:
                raise PostgresError(f"{old.address} is not on this host: it cannot be stopped, so it is not switched over")
            if not self.follows(to_port, old.port):
                raise PostgresError(f"{target.address} does not stream from {old.address}; resync it first")
            self.fence_instance(old.port)
            try:
                final = str(self.query_one("SELECT pg_current_wal_lsn()", port=old.port))

                def caught_up() -> bool:
                    return int(self.query_one("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s::pg_lsn)",
                                              (final,), port=to_port)) >= 0

                wait_until(caught_up, timeout=timeout_seconds, interval=0.2, what=f"{target.address} to replay {final}")
                self.stop_at(old.port)
            except BaseException:
                if self.instance_running(old.data_directory):
                    with contextlib.suppress(PostgresError):
                        self.unfence_instance(old.port)  # nothing was promoted: the old primary keeps serving
                raise
            promotion = self.promote(to_port, timeout_seconds)
        self.unfence_instance(to_port)  # also when a re-run finds it promoted already
        resyncs = [asdict(self.resync_as_standby(inst.port, to_port, timeout_seconds=timeout_seconds))
                   for inst in others if inst.data_directory]
        return {"old_primary": old.address if old else None, "new_primary": target.address,
                "promotion": asdict(promotion), "resyncs": resyncs}
