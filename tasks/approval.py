"""Approval before an irreversible step: a typed form, a named approver from an allowed list, a deadline."""

from __future__ import annotations

import time
from typing import Literal

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field, field_validator

from blocks.errors import InvalidInput
from tasks.evidence import ApprovalRecord, utcnow

ApprovalPolicy = Literal["required", "auto"]


class ApprovalDecision(RunInput):
    """The approver's answer. Every field is required: an empty resume is not an approval."""

    approve: bool = Field(description="Tick to approve the irreversible step; leave unticked to reject it.")
    approver: str = Field(description="Your name, exactly as it appears in the allowed approvers list.")
    comment: str = Field(description="Why: what you checked, or why you reject.")

    @field_validator("approver", "comment")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


def check_approval_settings(policy: str, allowed_approvers: list[str], timeout_seconds: int, drill: bool) -> None:
    """Refuse approval settings that could let an irreversible step through unchecked."""
    if policy not in ("required", "auto"):
        raise InvalidInput(f"approval policy {policy!r} is not 'required' or 'auto'")
    if policy == "auto" and not drill:
        raise InvalidInput("approval policy 'auto' is allowed only for drills (drill=True); use 'required'")
    if policy == "required" and not [a for a in allowed_approvers if a.strip()]:
        raise InvalidInput("approval policy 'required' needs at least one name in allowed_approvers")
    if timeout_seconds <= 0:
        raise InvalidInput(f"approval timeout {timeout_seconds} s must be a positive number of seconds")


def request_approval(
    preview_markdown: str,
    allowed_approvers: list[str],
    timeout_seconds: int,
    poll_interval_seconds: float = 5,
) -> tuple[ApprovalRecord | None, list[ApprovalRecord]]:
    """Pause the flow run until an allowed approver answers or the deadline passes.

    An answer from someone not in ``allowed_approvers`` is recorded as refused and the run
    pauses again for the time that is left.

    Returns:
        The accepted decision (None on timeout) and every answer received, refused ones included.
    """
    logger = get_run_logger()
    allowed = {a.strip() for a in allowed_approvers if a.strip()}
    deadline = time.monotonic() + timeout_seconds
    answers: list[ApprovalRecord] = []
    attempt = 0
    form = ApprovalDecision.with_initial_data(description=preview_markdown)
    while True:
        remaining = int(deadline - time.monotonic())
        if remaining <= 0:
            return None, answers
        attempt += 1
        try:
            decision = pause_flow_run(
                wait_for_input=form,
                timeout=remaining,
                poll_interval=min(poll_interval_seconds, max(remaining / 2, 1)),
                key=f"approval-{attempt}",
            )
        except FlowPauseTimeout:
            return None, answers
        record = ApprovalRecord(
            approver=decision.approver, approved=decision.approve, comment=decision.comment,
            at=utcnow(), policy="required", accepted=decision.approver in allowed,
        )
        answers.append(record)
        if record.accepted:
            logger.info("%s %s: %s", record.approver, "approved" if record.approved else "rejected", record.comment)
            return record, answers
        logger.warning(
            "Refused an answer from %r: not among the allowed approvers %s; waiting again",
            record.approver, sorted(allowed),
        )


def auto_approval(reason: str) -> ApprovalRecord:
    """The recorded approval of a drill run under the 'auto' policy."""
    return ApprovalRecord(approver="auto (drill policy)", approved=True, comment=reason, at=utcnow(), policy="auto (drill)")
