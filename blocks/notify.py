"""Notification channels: Prefect's own notification blocks, configured for the shapes we post."""

from __future__ import annotations

from prefect.blocks.notifications import CustomWebhookNotificationBlock

from blocks.errors import InvalidInput

SLACK_TEXT_BODY = {"text": "{{body}}"}


def slack_compatible_webhook(url: str, name: str = "dr-alerts", timeout_seconds: float = 10) -> CustomWebhookNotificationBlock:
    """A custom-webhook block that POSTs Slack's incoming-webhook body ``{"text": ...}`` to ``url``.

    The URL (which carries the Slack token) is kept in the block's secret values, not in a plain field.
    Works with Slack, Mattermost, Rocket.Chat and any receiver that accepts that body.

    Example:
        ```python
        from blocks.notify import slack_compatible_webhook
        slack_compatible_webhook("https://hooks.slack.com/services/T/B/X").save("dr-alerts")
        # then: notifier="custom-webhook/dr-alerts"
        ```
    """
    if not url.startswith(("http://", "https://")):
        raise InvalidInput(f"webhook URL must start with http:// or https://, got {url[:8]!r}...")
    if timeout_seconds <= 0:
        raise InvalidInput(f"webhook timeout {timeout_seconds} s must be positive")
    return CustomWebhookNotificationBlock(
        name=name, url="{{webhook_url}}", method="POST", json_data=dict(SLACK_TEXT_BODY),
        headers={"Content-Type": "application/json"}, timeout=timeout_seconds,
        secrets={"webhook_url": url},
    )
