"""Results shared by every system's checks: data, not exceptions."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check, as data. Only critical checks fail a run."""

    name: str
    passed: bool
    detail: str
    critical: bool = True

    def as_dict(self) -> dict:
        return asdict(self)
