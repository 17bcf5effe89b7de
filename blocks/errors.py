"""The project's exceptions: one root, a subclass per system.

Whether an error is worth retrying is a property of the error (``transient``), so the
task retry policy can decide without knowing every system.
"""

from __future__ import annotations


class RecoveryError(Exception):
    """Root of every error raised by this project."""

    transient: bool = False


class InvalidInput(RecoveryError, ValueError):
    """A parameter or block value was refused before anything changed. Never retried."""


class PostgresError(RecoveryError):
    """PostgreSQL refused or failed an operation."""


class PostgresUnavailable(PostgresError):
    """PostgreSQL could not be reached; may succeed on a retry."""

    transient = True


class BackupError(RecoveryError):
    """pgBackRest failed or reported an unusable repository."""


class CommandFailed(RecoveryError):
    """An external command exited non-zero or overran its timeout."""

    def __init__(self, command: str, returncode: int | None, output: str):
        self.command = command
        self.returncode = returncode
        self.output = output
        tail = output.strip().splitlines()[-5:]
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{command} {status}: " + " | ".join(tail))


class ApprovalError(RecoveryError):
    """An approval was refused, timed out, or came from someone not allowed to give it."""


class RecoveryInProgress(RecoveryError):
    """Another recovery already holds the lock on this target."""
