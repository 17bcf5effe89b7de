"""Backup validation (scheduled weekly): every backup exists, is non-empty, is fresh, verifies, is retained.

Runbook (continuity plans: "Testing Schedule & Procedures" - backup validation; "Backup Strategy"):
  1. load the estate's backup sources (pgBackRest stanzas, object-store prefixes)
  2. for each source: it exists, its newest backup is non-empty and within its RPO, its files
     verify (pgbackrest verify, sha256 checksums), and retention is as configured
  3. publish the checks as a table; a failed critical check fails the run and alerts on-call
  4. a validation that cannot run at all (missing or invalid sources block, unexpected error) alerts too
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.states import Completed, Failed, State

from blocks.backup_sources import BackupCheck, BackupSources
from blocks.errors import RecoveryError
from blocks.loading import load_block
from runbook.alerts import alert_on_call
from runbook.evidence import utcnow
from runbook.parameters import check_parameters, recovery_flow
from tasks.backups import check_object_backups, check_pgbackrest_backups, publish_backup_checks


@recovery_flow(name="backup-validation", description="Check that every backup exists, is fresh, verifies and is retained.")
def backup_validation(sources_block: str = "default", notifier: str | None = None) -> State:
    """Validate every configured backup source.

    Args:
        sources_block: name of the BackupSources block.
        notifier: notification block ('<block-type-slug>/<name>') alerted on a failed critical check or
            when the validation cannot run; defaults to the one the ``dr_notifier`` variable names.

    Returns:
        Completed("Valid") or Failed("BackupValidationFailed"); either carries the checks as a list of dicts.
    """
    logger = get_run_logger()
    started = utcnow()
    try:
        check_parameters()
        sources = load_block(BackupSources, sources_block)
        sources.check_settings()
        checks: list[BackupCheck] = []
        for source in sources.pgbackrest:
            checks += _checked(source.label, source.critical, lambda s=source: check_pgbackrest_backups(sources, s))
        for source in sources.object_prefixes:
            checks += _checked(source.label, source.critical, lambda s=source: check_object_backups(sources, s))
        publish_backup_checks(checks)
    except Exception as exc:  # alerted, then re-raised: a validation that cannot run is itself a failure
        alert_on_call(notifier, "backups", f"backup validation could not run: {type(exc).__name__}: {exc}", started)
        raise
    data = [c.as_dict() for c in checks]
    failed = [c for c in checks if c.critical and not c.passed]
    warnings = [c for c in checks if not c.critical and not c.passed]
    for c in warnings:
        logger.warning("Non-critical check failed: %s: %s", c.name, c.detail)
    if failed:
        summary = f"{len(failed)} critical backup check(s) failed: " + "; ".join(f"{c.name} ({c.detail})" for c in failed[:5])
        alert_on_call(notifier, "backups", summary, started)
        return Failed(name="BackupValidationFailed", message=summary, data=data)
    message = f"{len(checks)} checks over {len(sources.pgbackrest) + len(sources.object_prefixes)} sources passed"
    if warnings:
        message += f"; {len(warnings)} non-critical warning(s)"
    return Completed(name="Valid", message=message, data=data)


def _checked(label: str, critical: bool, run) -> list[BackupCheck]:
    """Run one source's checks; a source that cannot be checked at all is a failed check, not a crash."""
    try:
        return run()
    except RecoveryError as exc:
        return [BackupCheck(label, "checked", False, f"could not be checked: {exc}", critical)]
