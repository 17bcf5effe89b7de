"""Prefect blocks that describe the estate and own its clients.

Register them with ``prefect block register -m blocks``.
"""

from blocks.errors import (
    ApprovalError,
    BackupError,
    CommandFailed,
    InvalidInput,
    PostgresError,
    PostgresUnavailable,
    RecoveryError,
    RecoveryInProgress,
)
from blocks.objectives import Objective, RecoveryObjectives
from blocks.postgres import CheckResult, PostgresCluster, PostgresInstance, VerificationQuery

__all__ = [
    "ApprovalError",
    "BackupError",
    "CheckResult",
    "CommandFailed",
    "InvalidInput",
    "Objective",
    "PostgresCluster",
    "PostgresError",
    "PostgresInstance",
    "PostgresUnavailable",
    "RecoveryError",
    "RecoveryInProgress",
    "RecoveryObjectives",
    "VerificationQuery",
]
