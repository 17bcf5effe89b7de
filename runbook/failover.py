"""Promoting a replica in place of a lost primary: the decision, the journal and the promotion.

Shared by the database-server failover and the regional failover and failback. The approver answers
a :class:`FailoverDecision` that states the data loss; a promotion is journalled in a Prefect
Variable before and after it happens, so a re-run of the same incident finishes the work and
promotes nothing twice, and a primary no failover journalled is left to a person.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Iterator

from prefect.states import State
from prefect.variables import Variable
from pydantic import Field

from blocks import PostgresCluster
from blocks._pg_replication import ReplicaPromotion
from blocks.errors import PostgresError
from runbook.approval import ApprovalDecision
from runbook.evidence import RecoveryReport, utcnow
from runbook.run import Recovery
from tasks.replication import list_writers, measure_replica_lag, promote_replica, wait_for_replay

# How long a journalled promotion of another incident still explains a promoted replica.
JOURNAL_TTL = timedelta(hours=24)


class FailoverDecision(ApprovalDecision):
    """The approver's answer to a failover, with an explicit word on the stated data loss."""

    accept_data_loss: bool = Field(
        description="Tick to accept the data loss stated in the preview. Required when the replica lag is above "
                    "the RPO or unknown; a failover above the RPO without it promotes nothing. The field has no "
                    "default on purpose: an answer that does not state it is not taken as an acceptance.")


def dsn_for(cluster: PostgresCluster, port: int, host: str | None = None) -> str:
    """The DSN applications use for the instance on ``port``; the password stays in its own secret."""
    inst = cluster.instance_at(port)
    return f"postgresql://{cluster.user}@{host or inst.host}:{inst.port}/{cluster.database}"


# The journal ----------------------------------------------------------------------------------------

def journal_name(scope: str) -> str:
    """The Prefect Variable that journals a promotion done for ``scope`` (an estate or a cluster)."""
    return "dr_failover_" + re.sub(r"[^a-z0-9]+", "_", scope.lower()).strip("_")


def read_journal(scope: str, incident_id: str | None = None) -> dict | None:
    """The promotion journalled for ``scope`` by an earlier run, if any.

    An entry of another incident counts only while it is younger than ``JOURNAL_TTL``: a promotion
    journalled long ago says nothing about who the primary should be today.
    """
    entry = Variable.get(journal_name(scope), default=None)
    if not isinstance(entry, dict):
        return None
    if incident_id is not None and entry.get("incident_id") == incident_id:
        return entry
    try:
        written = datetime.fromisoformat(str(entry.get("written_at")))
    except ValueError:
        return None
    if written.tzinfo is None or utcnow() - written > JOURNAL_TTL:
        return None
    return entry


def write_journal(scope: str, entry: dict) -> None:
    """Journal a step of a promotion for ``scope`` (stamped with the time it was written)."""
    Variable.set(journal_name(scope), {**entry, "written_at": utcnow().isoformat()}, overwrite=True)


def clear_journal(scope: str) -> None:
    """Forget the promotion journalled for ``scope``: the topology it described is gone."""
    Variable.unset(journal_name(scope))


# The decision ---------------------------------------------------------------------------------------

def finish_refused(run: Recovery, outcome: str, message: str) -> State:
    """End a failover that stopped short of promoting (LagAboveRpo, NoCandidate, ...): a Failed state."""
    return run.finish(outcome, message)


def decide(run: Recovery, preview: str, lag_within_rpo: bool, what: str = "Failover") -> State | None:
    """The approval of a failover; None to go on, else the state the run ends in.

    Above the RPO (or with an unknown lag) an approval goes on only when it accepts the stated data
    loss; that acceptance, or its absence, is a recorded step of its own.
    """
    decision = run.approve(preview, decision_model=FailoverDecision)
    if decision is None or not decision.approved:
        return run.declined(decision, what)
    if not lag_within_rpo:
        with run.step("Data loss above the RPO") as step:
            if not decision.details.get("accept_data_loss"):
                step.outcome = "blocked"
                step.detail = f"approved by {decision.approver}, who did not accept the stated data loss"
                return finish_refused(run, "LagAboveRpo", "The replica lag is above the RPO (or unknown) and the "
                                      "approval did not accept the stated data loss; nothing was promoted.")
            step.detail = f"accepted by {decision.approver}"
    return None


def confirm_lag_after_fence(run: Recovery, cluster: PostgresCluster, chosen: int, failed_port: int,
                            fenced: dict, lost_at: datetime, wait_seconds: float = 60) -> str | None:
    """Check, after the old primary is fenced, that promoting ``chosen`` loses no more than was approved.

    A fenced primary that answered named its last WAL position: the candidate must replay it (bounded
    wait). Otherwise the lag is measured again and held against the RPO or the approver's acceptance.

    Returns:
        None to go on, or a message why nothing is promoted.
    """
    report, rpo = run.report, run.report.rpo_objective_seconds
    final = fenced.get("final_lsn")
    if final and wait_for_replay(cluster, chosen, final, wait_seconds):
        report.facts["replayed before promotion"] = f"{cluster.instance_at(chosen).address} replayed {final}"
        return None
    lag = measure_replica_lag(cluster, chosen, failed_port, lost_at)
    report.facts["replica lag at promotion"] = {"bytes": lag.bytes, "seconds": lag.seconds, "detail": lag.detail}
    accepted = bool(report.approvals and report.approvals[-1].details.get("accept_data_loss"))
    if lag.within(rpo) or accepted:
        report.rpo_seconds = lag.seconds
        return None
    return (f"After fencing, {cluster.instance_at(chosen).address} is "
            f"{'an unknown time' if lag.seconds is None else f'{lag.seconds:.1f} s'} behind (RPO {rpo} s) and the "
            f"approval did not accept data loss; the old primary is {fenced['state']} and nothing was promoted.")


# The promotion --------------------------------------------------------------------------------------

def promote_journalled(run: Recovery, cluster: PostgresCluster, port: int, scope: str) -> ReplicaPromotion:
    """Promote the replica on ``port`` unless another instance takes writes, journalled for ``scope``."""
    writers = list_writers(cluster)
    if any(p != port for p in writers):
        raise PostgresError(f"instances on ports {writers} accept writes; refusing to promote a second writer")
    entry = {"promoted_port": port, "incident_id": run.incident_id}
    write_journal(scope, {**entry, "state": "promoting"})
    promotion = promote_replica(cluster, port)
    write_journal(scope, {**entry, "state": "promoted", "promoted_at": promotion.promoted_at or utcnow().isoformat()})
    return promotion


def record_replica_promotion(run: Recovery, promotion: ReplicaPromotion, **extra: object) -> None:
    """The report's promotion: the endpoint promoted, whether an earlier run had promoted it already, when."""
    run.report.promotion = {"endpoint": promotion.address, "already_promoted": promotion.already_primary,
                            "promoted_at": promotion.promoted_at, **extra}


# Evidence -------------------------------------------------------------------------------------------

def step_seconds(report: RecoveryReport) -> dict[str, float]:
    """How long each finished step took."""
    return {s.step: round((s.end - s.start).total_seconds(), 3) for s in report.steps if s.end}


@contextmanager
def timed_steps(run: Recovery) -> Iterator[None]:
    """Record each step's duration in the report ("step seconds") however the run ends."""
    try:
        yield
    finally:
        run.report.facts["step seconds"] = step_seconds(run.report)
