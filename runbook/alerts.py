"""Alerts of the scheduled assurance jobs (backup validation, restore check, drill): a failure pages on-call.

A scheduled job is not a recovery and has no incident of its own; when it fails, or cannot run at
all, on-call receives the continuity plan's initial incident notification, with the job's flow run
as the place to look.
"""

from __future__ import annotations

from datetime import datetime

from prefect import runtime

from tasks.notify import initial_alert, send_notification


def alert_on_call(notifier: str | None, service: str, impact: str, started_at: datetime, severity: str = "P2") -> bool:
    """Send the initial incident notification of a failed assurance job; returns whether it was delivered.

    Args:
        notifier: notification block ('<block-type-slug>/<name>'); None for the one the ``dr_notifier`` variable names.
        service: what the job assures, e.g. 'backups'.
        impact: what failed, in one line.
        started_at: when the job started.
        severity: the incident severity of the alert.
    """
    return send_notification(notifier, initial_alert(
        severity=severity, service=service, impact=impact, started_at=started_at, commander="on-call",
        war_room=f"flow run {runtime.flow_run.name}"))
