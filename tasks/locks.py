"""One recovery per target at a time, held through approval pauses.

The lock is a Prefect global concurrency limit of one slot (it stays held while a run is
paused, unlike a deployment's concurrency limit). Beside it a Prefect Variable names the
flow run holding it, so a run that finds the lock taken can tell a live recovery from a
dead one: a holder already in a final state (crashed, cancelled, failed, completed) left a
stale slot behind, which is reclaimed.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from typing import Iterator
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.variables import Variable

from blocks.errors import RecoveryInProgress


# Seconds a held slot outlives a holder that stopped renewing it (Prefect's minimum lease).
LEASE_SECONDS = 60


def lock_name(target: str) -> str:
    return "dr-recovery-" + re.sub(r"[^a-z0-9-]+", "-", target.lower()).strip("-")


def _holder_variable(name: str) -> str:
    return name.replace("-", "_") + "_holder"


def lock_holder(target: str) -> dict | None:
    """Who holds ``target``'s lock: flow run id, its current state, since when (None if nobody is recorded)."""
    holder = Variable.get(_holder_variable(lock_name(target)), default=None)
    if not holder:
        return None
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(holder["flow_run_id"]))
            holder["state"] = run.state.type.value if run.state else "UNKNOWN"
            holder["final"] = bool(run.state and run.state.is_final())
        except ObjectNotFound:
            holder["state"], holder["final"] = "DELETED", True
    return holder


def release_lock(target: str, keep_holder: bool = False) -> None:
    """Free ``target``'s lock whoever holds it (for an operator who has confirmed the holder is dead)."""
    name = lock_name(target)
    with get_client(sync_client=True) as client:
        try:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
        except ObjectNotFound:
            pass  # never locked
    if not keep_holder:
        Variable.unset(_holder_variable(name))


def _acquire(name: str, wait_seconds: float) -> ExitStack:
    held = ExitStack()
    # A failed lease renewal must not interrupt a recovery halfway through a promotion.
    held.enter_context(concurrency(name, occupy=1, strict=True, timeout_seconds=wait_seconds, lease_duration=LEASE_SECONDS,
                                   raise_on_lease_renewal_failure=False))
    return held


@contextmanager
def recovery_lock(target: str, wait_seconds: float, flow_run_id: UUID | None = None) -> Iterator[str]:
    """Hold the one slot of ``target``'s recovery lock for the duration of the block."""
    name = lock_name(target)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another recovery of the same target created it a moment ago
    try:
        held = _acquire(name, wait_seconds)
    except TimeoutError as exc:
        holder = lock_holder(target)
        held = None
        if holder is None:
            # Held but not recorded: a run between taking the slot and recording itself, or a slot whose
            # release did not reach the server. Such a lease runs out within LEASE_SECONDS.
            try:
                held = _acquire(name, LEASE_SECONDS + 5)
            except TimeoutError:
                holder = lock_holder(target)
        if held is None and (not holder or not holder["final"]):
            who = (f"flow run {holder['flow_run_id']} ({holder['state']}, since {holder['since']})"
                   if holder else "an unrecorded holder")
            raise RecoveryInProgress(
                f"another recovery of {target!r} is running: {who} holds lock {name}; waited {wait_seconds:.0f} s. "
                f"If that run's process is dead, a Prefect server that stayed up frees its slot about "
                f"{LEASE_SECONDS + 15} s after it died; to go on at once (or after a server restart, which forgets "
                f"leases), mark the run Crashed or Cancelled, or release the lock with `dr unlock {target}`"
            ) from exc
        if held is None:
            # Claim before releasing, and go on only if the claim stuck: of two runs reclaiming
            # the same stale lock, the one whose claim is overwritten backs off.
            claim = {"flow_run_id": str(flow_run_id), "since": datetime.now(timezone.utc).isoformat(), "reclaiming": True}
            Variable.set(_holder_variable(name), claim, overwrite=True)
            if Variable.get(_holder_variable(name), default=None) != claim:
                raise RecoveryInProgress(f"another run is reclaiming the stale lock {name} of {target!r}") from exc
            get_run_logger().warning("Reclaiming lock %s left by flow run %s (%s)", name, holder["flow_run_id"], holder["state"])
            release_lock(target, keep_holder=True)
            held = _acquire(name, wait_seconds)
    with held:
        if flow_run_id:
            Variable.set(_holder_variable(name), {"flow_run_id": str(flow_run_id),
                                                   "since": datetime.now(timezone.utc).isoformat()}, overwrite=True)
        try:
            yield name
        finally:
            Variable.unset(_holder_variable(name))
