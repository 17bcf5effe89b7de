"""Bounded external commands and waits, shared by the blocks."""

from __future__ import annotations

import os
import pwd
import random
import re
import shlex
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import TypeVar

from blocks.errors import CommandFailed, RecoveryError

T = TypeVar("T")

# What a command run for the recovery inherits from the worker: the locale, the time zone and a search
# path. Nothing else (API keys, cloud credentials, libpq settings) reaches a server it starts, whose
# environment any database superuser can read in /proc.
INHERITED_VARIABLES = ("PATH", "LANG", "LANGUAGE", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def minimal_environment(user: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a command run as ``user``: locale, time zone, PATH, HOME/USER of that user, ``extra``."""
    env = {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}
    env.update({name: value for name, value in os.environ.items() if name.startswith("LC_")})
    env.setdefault("PATH", DEFAULT_PATH)
    try:
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    except KeyError:
        entry = None
    if entry is not None:
        env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    env.update(extra or {})
    return env


def run_as(
    cmd: Sequence[str],
    *,
    user: str | None,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as ``user`` (when the caller is root and ``user`` differs), bounded by ``timeout``.

    The command gets a minimal environment (:func:`minimal_environment`) plus ``env``, never the
    worker's own. Output is captured; a non-zero exit raises :class:`CommandFailed` naming the
    command (never its environment, which may carry a password file path).
    """
    kwargs: dict = {}
    switch = bool(user and os.geteuid() == 0 and user != "root")
    full_env = minimal_environment(user if switch else None, env)
    if switch:
        entry = pwd.getpwnam(user)
        kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
    # Commands run as another user need a working directory that user may enter.
    workdir = cwd or "/"
    try:
        proc = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=workdir,
            **kwargs,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or "") + (exc.stderr or "")
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        raise CommandFailed(shlex.join(cmd), None, output) from exc
    except FileNotFoundError as exc:
        raise CommandFailed(shlex.join(cmd), 127, str(exc)) from exc
    if check and proc.returncode != 0:
        raise CommandFailed(shlex.join(cmd), proc.returncode, proc.stdout + proc.stderr)
    return proc


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str,
) -> T:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass.

    Raises:
        RecoveryError: naming ``what`` was awaited and for how long.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RecoveryError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(min(interval * (0.8 + 0.4 * random.random()), max(deadline - time.monotonic(), 0.01)))


def chown_to(path: str, user: str | None) -> None:
    """Give ``path`` to ``user`` when running as root (no-op otherwise)."""
    if user and os.geteuid() == 0 and user != "root":
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _owner_ids(user: str | None) -> tuple[int, int]:
    if user and os.geteuid() == 0 and user != "root":
        entry = pwd.getpwnam(user)
        return entry.pw_uid, entry.pw_gid
    return os.geteuid(), os.getegid()


def private_directory(name: str, user: str | None) -> str:
    """The directory ``name`` in the system's temporary directory: mode 0700, owned by ``user`` (root) or the caller.

    It is created when missing; an existing one that is a link, belongs to someone else or is open
    to others is refused, so nothing secret is ever written where another user can read or swap it.
    """
    path = os.path.join(tempfile.gettempdir(), name)
    uid, gid = _owner_ids(user)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(path, uid, gid)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise RecoveryError(f"{path} is not a private directory of uid {uid} (mode 0700); refusing to keep secrets in it")
    return path


_OWNED_FILE = re.compile(r"^[a-z]+-(\d+)-[0-9a-f]+$")


def remove_orphans(folder: str) -> list[str]:
    """Remove the files in ``folder`` whose creating process (``<kind>-<pid>-<token>``) no longer runs.

    A process killed outright (SIGKILL) never removes what it wrote; the next caller does.
    """
    removed = []
    for entry in os.listdir(folder):
        match = _OWNED_FILE.match(entry)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its process still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # runs, as another user
        path = os.path.join(folder, entry)
        with suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def owned_file_name(kind: str) -> str:
    """A file name recording the process that owns it, for :func:`remove_orphans`."""
    return f"{kind}-{os.getpid()}-{os.urandom(8).hex()}"
