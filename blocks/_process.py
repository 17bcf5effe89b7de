"""Bounded external commands and waits, shared by the blocks."""

from __future__ import annotations

import os
import pwd
import random
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from blocks.errors import CommandFailed, RecoveryError

T = TypeVar("T")


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

    Output is captured; a non-zero exit raises :class:`CommandFailed` naming the command
    (never its environment, which may carry a password file path).
    """
    kwargs: dict = {}
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    if user and os.geteuid() == 0 and user != "root":
        entry = pwd.getpwnam(user)
        kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        full_env.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)
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
