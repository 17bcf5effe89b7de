"""Approval before an irreversible step: a typed form, a named approver from an allowed list, a deadline."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal

import anyio
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import apause_flow_run
from prefect.input import RunInput
from prefect.input.actions import read_flow_run_input
from prefect.input.run_input import keyset_from_base_key
from prefect.states import Running
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import Field

from blocks.errors import InvalidInput
from runbook.evidence import ApprovalRecord, RecoveryReport, utcnow
from tasks.notify import deliver, status_update

ApprovalPolicy = Literal["required", "auto"]

# The server-side pause outlives the approval deadline by this much, so that at the deadline
# the flow can still leave the pause on its own terms and end in a state it names.
PAUSE_GRACE_SECONDS = 120


class ApprovalDecision(RunInput):
    """The approver's answer. Every field is required: an empty resume is not an approval."""

    approve: bool = Field(description="Tick to approve the irreversible step; leave unticked to reject it.")
    approver: str = Field(description="Your name, exactly as it appears in the allowed approvers list.",
                          min_length=1, pattern=r"\S")
    comment: str = Field(description="Why: what you checked, or why you reject.", min_length=1, pattern=r"\S")


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
    decision_model: type[ApprovalDecision] = ApprovalDecision,
    notifier: str | None = None,
) -> tuple[ApprovalRecord | None, list[ApprovalRecord]]:
    """Pause the flow run until an allowed approver answers or the deadline passes.

    An answer from someone not in ``allowed_approvers`` is recorded as refused and the run
    pauses again for the time that is left.

    ``decision_model`` may be a subclass of :class:`ApprovalDecision` with more required fields
    (e.g. an explicit acceptance of a stated data loss); their values land in ``ApprovalRecord.details``.

    Every request for an answer is announced through ``notifier`` (a notification block named
    ``<block-type-slug>/<block-name>``; by default the one the ``dr_notifier`` variable names) with
    a link to the paused run, the allowed approvers and the deadline.

    Returns:
        The accepted decision (None on timeout) and every answer received, refused ones included.
    """
    logger = get_run_logger()
    allowed = {a.strip() for a in allowed_approvers if a.strip()}
    deadline = time.monotonic() + timeout_seconds
    answers: list[ApprovalRecord] = []
    attempt = 0
    form = decision_model.with_initial_data(description=preview_markdown)
    while True:
        remaining = int(deadline - time.monotonic())
        if remaining <= 0:
            return None, answers
        attempt += 1
        _announce(notifier, preview_markdown, sorted(allowed), remaining, attempt)
        decision = _wait_for_answer(form, f"approval-{attempt}", remaining, min(poll_interval_seconds, max(remaining / 2, 1)))
        if decision is None:
            return None, answers
        approver, comment = decision.approver.strip(), decision.comment.strip()
        record = ApprovalRecord(
            approver=approver or "(blank)", approved=decision.approve, comment=comment or "(blank)",
            at=utcnow(), policy="required", accepted=approver in allowed and bool(comment),
            details=decision.model_dump(exclude={"approve", "approver", "comment"}),
        )
        answers.append(record)
        if record.accepted:
            logger.info("%s %s: %s", record.approver, "approved" if record.approved else "rejected", record.comment)
            return record, answers
        logger.warning(
            "Refused an answer from %r: not among the allowed approvers %s, or without a comment; waiting again",
            record.approver, sorted(allowed),
        )


def _run_link() -> tuple[str, str]:
    """Name and UI address of the current flow run."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    run = FlowRunContext.get().flow_run
    base = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
    return run.name, f"{base.rstrip('/')}/runs/flow-run/{run.id}"


def _announce(notifier: str | None, preview_markdown: str, allowed: list[str], remaining: int, attempt: int) -> None:
    """Tell the approvers that a run waits for them (an incident update in the plan's template)."""
    name, link = _run_link()
    title = next((line.lstrip("# ").strip() for line in preview_markdown.splitlines() if line.strip()), "approval")
    deadline = utcnow().timestamp() + remaining
    message = status_update(
        status=f"Awaiting approval: {title}",
        actions_taken=f"flow run {name} paused for a decision" + (" again (an earlier answer was refused)" if attempt > 1 else ""),
        next_steps=f"one of {', '.join(allowed) or 'the allowed approvers'} approves or rejects with Resume at {link}",
        eta=f"approval deadline {datetime.fromtimestamp(deadline, timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
    )
    deliver(notifier, message, subject=f"Approval needed: {name}")


def _wait_for_answer(form: type[ApprovalDecision], key: str, wait_seconds: float, poll_seconds: float):
    """Pause until an answer arrives or ``wait_seconds`` pass; then leave the pause, which has not yet expired."""

    async def bounded():
        with anyio.move_on_after(wait_seconds):
            return await apause_flow_run(wait_for_input=form, timeout=int(wait_seconds) + PAUSE_GRACE_SECONDS,
                                         poll_interval=poll_seconds, key=key)
        return None

    try:
        answer = run_coro_as_sync(bounded())
    except FlowPauseTimeout:
        answer = None
    if answer is not None:
        return answer
    flow_run_id = FlowRunContext.get().flow_run.id
    with get_client(sync_client=True) as client:
        if client.read_flow_run(flow_run_id).state.is_paused():
            client.set_flow_run_state(flow_run_id, Running(message="approval deadline passed without an answer"))
    # An answer may have landed between the deadline and leaving the pause.
    late = read_flow_run_input(keyset_from_base_key(f"paused-{key}")["response"], flow_run_id=flow_run_id)
    return form.model_validate(late) if late is not None else None


def auto_approval(reason: str) -> ApprovalRecord:
    """The recorded approval of a drill run under the 'auto' policy."""
    return ApprovalRecord(approver="auto (drill policy)", approved=True, comment=reason, at=utcnow(), policy="auto (drill)")


def approval_step(
    report: RecoveryReport,
    approval_policy: str,
    preview_markdown: str,
    allowed_approvers: list[str],
    timeout_seconds: int,
    poll_interval_seconds: float = 5,
    decision_model: type[ApprovalDecision] = ApprovalDecision,
) -> ApprovalRecord | None:
    """The runbook's approval step, recorded in ``report``.

    ``approval_policy`` is 'required' (a named approver answers the form ``decision_model``), 'auto'
    (drills only) or 'none' (a reversible step: the operator who triggered the run decided).

    Returns:
        The decision (None when the deadline passed without an accepted answer).
    """
    with report.step("Approval") as step:
        if approval_policy == "auto":
            decision = auto_approval("drill run: approval policy 'auto'")
            report.approvals.append(decision)
        elif approval_policy == "none":
            decision = ApprovalRecord(approver="on-call operator (flow trigger)", approved=True,
                                      comment="the step is reversible: approval policy 'none'", at=utcnow(),
                                      policy="none (reversible)")
            report.approvals.append(decision)
        else:
            decision, answers = request_approval(preview_markdown, allowed_approvers, timeout_seconds,
                                                 poll_interval_seconds, decision_model=decision_model)
            report.approvals.extend(answers)
        if decision is None:
            step.outcome, step.detail = "timed out", "no approval"
        elif not decision.approved:
            step.outcome, step.detail = "rejected", f"{decision.approver}: {decision.comment}"
        else:
            step.detail = f"approved by {decision.approver}"
    return decision
