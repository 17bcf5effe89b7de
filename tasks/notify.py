"""Notifications in the shape of the continuity plans' templates: initial alert, update, resolved.

Messages go through any Prefect notification block (Slack webhook, a custom webhook posting
Slack's ``{"text": ...}`` body, e-mail, ...), named ``<block-type-slug>/<block-name>``. When no
block is named, the Prefect Variable ``dr_notifier`` names the estate's default; without one,
the message is only logged. A notification that cannot be delivered is logged, never fatal:
it must not stop a recovery.
"""

from __future__ import annotations

from datetime import datetime, timezone

import httpx
from prefect import get_run_logger, task
from prefect.blocks.core import Block
from prefect.variables import Variable
from pydantic import ValidationError

from blocks.errors import InvalidInput, RecoveryError
from tasks._policy import policy

DEFAULT_NOTIFIER_VARIABLE = "dr_notifier"
SERVICE = "dr-pipelines"


def _ts(moment: datetime | None = None) -> str:
    return (moment or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _lines(items: list[str] | str) -> str:
    if isinstance(items, str):
        return items
    return "; ".join(items) if items else "none"


def initial_alert(severity: str, service: str, impact: str, started_at: datetime, commander: str = "on-call",
                  status_page: str = "-", war_room: str | None = None) -> str:
    """The plan's "Initial Incident Notification"."""
    return "\n".join([
        f"\U0001f6a8 INCIDENT ALERT - {severity}",
        f"Service: {service}",
        f"Impact: {impact}",
        f"Start Time: {_ts(started_at)}",
        f"Incident Commander: {commander}",
        f"Status Page: {status_page}",
        f"War Room: {war_room or '#incident-' + started_at.astimezone(timezone.utc).strftime('%Y%m%d%H%M')}",
    ])


def status_update(status: str, actions_taken: list[str] | str, next_steps: list[str] | str, eta: str = "-",
                  at: datetime | None = None) -> str:
    """The plan's "Status Update Template"."""
    return "\n".join([
        f"\U0001f4ca INCIDENT UPDATE - {_ts(at)}",
        f"Current Status: {status}",
        f"Actions Taken: {_lines(actions_taken)}",
        f"Next Steps: {_lines(next_steps)}",
        f"ETA: {eta}",
    ])


def resolved(duration: str, root_cause: str, actions_taken: list[str] | str, post_mortem: str = "-",
             at: datetime | None = None) -> str:
    """The plan's "Resolution Notification"."""
    return "\n".join([
        f"\u2705 INCIDENT RESOLVED - {_ts(at)}",
        f"Duration: {duration}",
        f"Root Cause: {root_cause}",
        f"Actions Taken: {_lines(actions_taken)}",
        f"Post-Mortem: {post_mortem}",
    ])


def resolve_notifier(notifier: str | None) -> str | None:
    """The notifier to use: the one named, else the ``dr_notifier`` variable, else None."""
    if notifier and notifier.strip():
        return notifier.strip()
    value = Variable.get(DEFAULT_NOTIFIER_VARIABLE, default=None)
    return str(value).strip() if value else None


def load_notifier(name: str) -> Block:
    """Load a notification block by ``<block-type-slug>/<block-name>``."""
    if "/" not in name:
        raise InvalidInput(f"notifier {name!r} is not '<block-type-slug>/<block-name>', e.g. 'custom-webhook/dr-alerts'")
    try:
        block = Block.load(name)
    except (ValueError, ValidationError) as exc:
        raise InvalidInput(f"no notification block {name!r}; list them with `prefect block ls`") from exc
    if not hasattr(block, "notify"):
        raise InvalidInput(f"block {name!r} is not a notification block (it has no notify)")
    return block


def deliver(notifier: str | None, message: str, subject: str | None = None) -> bool:
    """Send ``message`` through the resolved notifier; True when it was delivered."""
    logger = get_run_logger()
    name = resolve_notifier(notifier)
    if name is None:
        logger.info("No notifier configured (variable %s); message not sent:\n%s", DEFAULT_NOTIFIER_VARIABLE, message)
        return False
    try:
        load_notifier(name).notify(message, subject)
    except RecoveryError as exc:
        logger.warning("Notification through %s failed: %s", name, exc)
        return False
    except (httpx.HTTPError, OSError) as exc:
        logger.warning("Notification through %s failed: %s", name, _redacted(exc))
        return False
    return True


def _redacted(exc: BaseException) -> str:
    """What went wrong, without the URL: a webhook URL carries its token."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"the receiver answered HTTP {exc.response.status_code}"
    return f"{type(exc).__name__} (delivery failed before an answer)"


@task(name="send-notification", **policy(timeout_seconds=60, retries=2))
def send_notification(notifier: str | None, message: str, subject: str | None = None) -> bool:
    """Send one message (an alert, update or resolution); returns whether it was delivered."""
    return deliver(notifier, message, subject)
