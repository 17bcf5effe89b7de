"""Recovery objectives per business function, against which every run's RTO and RPO are judged."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import BaseModel, Field

from blocks.errors import InvalidInput


class Objective(BaseModel):
    """The recovery time and recovery point objectives of one business function or system."""

    rto_seconds: int = Field(ge=1, description="Longest acceptable time from detection to service restored.")
    rpo_seconds: int = Field(ge=0, description="Most data, in seconds of commits, that may be lost.")
    priority: str = Field(default="P1", description="Priority tier of the function (P1 highest).")


def _defaults() -> dict[str, Objective]:
    # Business impact analysis tables of the continuity plans: database 15 min / 5 min,
    # PostgreSQL RPO 5 min, vector DB 1 h, object storage 15 min, cache ephemeral; a security breach
    # is recovered and hardened within 120 min.
    return {
        "database": Objective(rto_seconds=15 * 60, rpo_seconds=5 * 60, priority="P1"),
        "authentication": Objective(rto_seconds=15 * 60, rpo_seconds=5 * 60, priority="P1"),
        "application": Objective(rto_seconds=30 * 60, rpo_seconds=0, priority="P1"),
        "object-storage": Objective(rto_seconds=25 * 60, rpo_seconds=15 * 60, priority="P2"),
        "vector-db": Objective(rto_seconds=2 * 3600, rpo_seconds=3600, priority="P2"),
        "cache": Objective(rto_seconds=30 * 60, rpo_seconds=0, priority="P3"),
        "configuration": Objective(rto_seconds=2 * 3600, rpo_seconds=3600, priority="P3"),
        # ML models: restored within 4 h from the daily model backups.
        "ml-models": Objective(rto_seconds=4 * 3600, rpo_seconds=24 * 3600, priority="P1"),
        # Security breach: recovery and hardening within 120 min, data back to 1 h before the breach.
        "security": Objective(rto_seconds=2 * 3600, rpo_seconds=3600, priority="P1"),
    }


class RecoveryObjectives(Block):
    """RTO and RPO per business function.

    Example:
        ```python
        from blocks import RecoveryObjectives
        objectives = RecoveryObjectives.load("default")
        objectives.for_function("database").rto_seconds   # 900
        ```
    """

    _block_type_name = "Recovery Objectives"
    _block_type_slug = "recovery-objectives"
    _description = "Recovery time and point objectives per business function."

    functions: dict[str, Objective] = Field(
        default_factory=_defaults, description="Objectives keyed by business function or system name."
    )

    def for_function(self, name: str) -> Objective:
        """The objective of ``name``; an unknown name is refused with the known ones."""
        try:
            return self.functions[name]
        except KeyError as exc:
            known = ", ".join(sorted(self.functions))
            raise InvalidInput(f"no recovery objective for function {name!r}; known: {known}") from exc
