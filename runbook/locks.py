"""One recovery per target at a time, held through approval pauses.

The lock is a Prefect global concurrency limit of one slot, taken with a lease that the holder
renews while it runs (the slot stays held while a run is paused, unlike a deployment's
concurrency limit). The server takes a slot in one conditional update, so of any number of runs
asking at once exactly one gets it.

Beside the slot a Prefect Variable records the holder: its flow run id and the id of its lease.
A run that finds the lock taken can then tell a live recovery from a dead one: a holder already
in a final state (crashed, cancelled, failed, completed) left its slot behind. Such a slot is
reclaimed under a second one-slot limit, the reclaim mutex, taken without waiting: of several
runs reclaiming the same dead holder exactly one gets it. That run releases the dead holder's
lease by its id (which frees the slot and revokes the lease, so the server's sweep of expired
leases can never free the slot again once someone else holds it), takes the slot, records itself
and lets go of the mutex. The others are refused, naming the holder.
"""

from __future__ import annotations

import contextvars
import random
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterator
from uuid import UUID

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger
from prefect.variables import Variable

from blocks.errors import RecoveryError, RecoveryInProgress


# Seconds a held slot outlives a holder that stopped renewing it (Prefect's minimum lease).
LEASE_SECONDS = 60
# A live holder renews its lease this often, and retries a failed renewal this soon.
RENEW_SECONDS = LEASE_SECONDS * 0.75
RENEW_RETRY_SECONDS = 5.0
# How often a waiting run asks for the slot again.
POLL_SECONDS = 0.5
# How long the server takes to sweep a lease after it expired (its repossessor runs every 15 s).
SWEEP_SECONDS = 20


def lock_name(target: str) -> str:
    return "dr-recovery-" + re.sub(r"[^a-z0-9-]+", "-", target.lower()).strip("-")


def _mutex_name(name: str) -> str:
    return "dr-reclaim-" + name.removeprefix("dr-recovery-")


def _holder_variable(name: str) -> str:
    return name.replace("-", "_") + "_holder"


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("dr.locks")


def _record(name: str) -> dict | None:
    return Variable.get(_holder_variable(name), default=None) or None


def lock_holder(target: str) -> dict | None:
    """Who holds ``target``'s lock (None if nobody is recorded).

    Returns the recorded ``flow_run_id``, ``since`` and ``lease_id``, with the run's current
    ``state`` and whether that state is ``final`` (a final holder is dead and its slot reclaimable).
    """
    holder = _record(lock_name(target))
    if holder is None:
        return None
    holder = dict(holder)
    holder.setdefault("since", "unknown")
    holder.setdefault("lease_id", None)
    if not holder.get("flow_run_id"):
        holder["state"], holder["final"] = "UNKNOWN", False
        return holder
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(holder["flow_run_id"]))
            holder["state"] = run.state.type.value if run.state else "UNKNOWN"
            holder["final"] = bool(run.state and run.state.is_final())
        except ObjectNotFound:
            holder["state"], holder["final"] = "DELETED", True
    return holder


def _lease_exists(client: SyncPrefectClient, lease_id: UUID) -> bool:
    """Whether the server still has ``lease_id`` (renewing a lease that is about to be released is harmless)."""
    try:
        client.renew_concurrency_lease(lease_id=lease_id, lease_duration=LEASE_SECONDS)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 410:
            return False
        raise RecoveryError(f"could not read concurrency lease {lease_id}: {exc}") from exc
    return True


def release_lock(target: str) -> None:
    """Free ``target``'s lock whoever holds it (for an operator who has confirmed the holder is dead).

    The recorded holder's lease is released by its id, which also revokes it. A slot held under
    no lease the server knows (a server restart forgets leases) is reset.
    """
    name = lock_name(target)
    record = _record(name)
    with get_client(sync_client=True) as client:
        lease_id = UUID(record["lease_id"]) if record and record.get("lease_id") else None
        if lease_id is not None and _lease_exists(client, lease_id):
            client.release_concurrency_slots_with_lease(lease_id=lease_id)
        else:
            try:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
            except ObjectNotFound:
                pass  # never locked
    Variable.unset(_holder_variable(name))


def _ensure_limit(client: SyncPrefectClient, name: str) -> None:
    """A one-slot, active global concurrency limit called ``name``."""
    try:
        limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass  # another recovery of the same target created it a moment ago
        return
    if limit.limit != 1 or not limit.active:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))


def _take_slot(client: SyncPrefectClient, name: str, flow_run_id: UUID | None) -> UUID | None:
    """The lease id of the one slot of ``name``, or None when it is taken (one request, atomic on the server)."""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id) if flow_run_id else None
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS, holder=holder)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 423:
            return None
        raise RecoveryError(f"could not take lock {name} on the Prefect server: {exc}") from exc
    granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
    if not granted.limits:
        client.release_concurrency_slots_with_lease(lease_id=granted.lease_id)
        raise RecoveryError(f"lock {name} does not exist on the Prefect server")
    return granted.lease_id


def _wait_for_slot(client: SyncPrefectClient, name: str, wait_seconds: float, flow_run_id: UUID | None,
                   give_up: Callable[[], bool] = lambda: False) -> UUID | None:
    """Ask for the slot until it is granted, ``wait_seconds`` have passed or ``give_up()`` says so."""
    deadline = time.monotonic() + max(0.0, wait_seconds)
    while True:
        lease_id = _take_slot(client, name, flow_run_id)
        left = deadline - time.monotonic()
        if lease_id is not None or left <= 0 or give_up():
            return lease_id
        time.sleep(min(left, POLL_SECONDS * random.uniform(0.5, 1.5)))


def _write_record(client: SyncPrefectClient, name: str, lease_id: UUID, flow_run_id: UUID | None) -> None:
    """Record the holder; if that fails the slot is given back at once."""
    try:
        Variable.set(_holder_variable(name), {
            "flow_run_id": str(flow_run_id) if flow_run_id else None,
            "lease_id": str(lease_id),
            "since": datetime.now(timezone.utc).isoformat(),
        }, overwrite=True)
    except BaseException:
        client.release_concurrency_slots_with_lease(lease_id=lease_id)
        raise


def _in_progress(target: str, name: str, holder: dict | None, wait_seconds: float) -> RecoveryInProgress:
    who = (f"flow run {holder['flow_run_id']} ({holder['state']}, since {holder['since']})"
           if holder else "an unrecorded holder")
    return RecoveryInProgress(
        f"another recovery of {target!r} is running: {who} holds lock {name}; waited {wait_seconds:.0f} s. "
        f"If that run's process is dead, a Prefect server that stayed up frees its slot about "
        f"{LEASE_SECONDS + SWEEP_SECONDS} s after it died; to go on at once (or after a server restart, which forgets "
        f"leases), mark the run Crashed or Cancelled, or release the lock with `dr unlock {target}`")


def _reclaim(client: SyncPrefectClient, target: str, name: str, dead: dict, wait_seconds: float,
             flow_run_id: UUID | None) -> UUID:
    """Take over the slot ``dead`` (a holder in a final state) left behind, or raise RecoveryInProgress."""
    mutex = _take_slot(client, _mutex_name(name), flow_run_id)
    if mutex is None:
        # Another run is reclaiming this lock now: name the run that ends up holding it.
        deadline = time.monotonic() + max(0.0, wait_seconds)
        holder = lock_holder(target)
        while holder and holder["flow_run_id"] == dead["flow_run_id"] and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            holder = lock_holder(target)
        if holder and not holder["final"]:
            raise _in_progress(target, name, holder, wait_seconds)
        raise RecoveryInProgress(
            f"another run is reclaiming lock {name} of {target!r}, left by flow run {dead['flow_run_id']} "
            f"({dead['state']}); waited {wait_seconds:.0f} s for it to record itself")
    try:
        holder = lock_holder(target)  # read again under the mutex: a reclaim may have finished meanwhile
        if holder is not None and not holder["final"]:
            raise _in_progress(target, name, holder, wait_seconds)
        if holder is not None:
            _logger().warning("Reclaiming lock %s left by flow run %s (%s)", name, holder["flow_run_id"],
                              holder["state"])
            if holder["lease_id"] and _lease_exists(client, UUID(holder["lease_id"])):
                # Frees the slot and revokes the lease: its expiry can no longer free the next holder's slot.
                client.release_concurrency_slots_with_lease(lease_id=UUID(holder["lease_id"]))
            else:
                # No lease the server knows (a record without one, or a server restart forgot it): nothing
                # else can free the slot it left, and nothing will take it away from the next holder.
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
        lease_id = _wait_for_slot(client, name, wait_seconds, flow_run_id)
        if lease_id is None:
            raise _in_progress(target, name, lock_holder(target), wait_seconds)
        _write_record(client, name, lease_id, flow_run_id)
        return lease_id
    finally:
        client.release_concurrency_slots_with_lease(lease_id=mutex)


def _acquire(target: str, name: str, wait_seconds: float, flow_run_id: UUID | None) -> UUID:
    with get_client(sync_client=True) as client:
        _ensure_limit(client, name)
        _ensure_limit(client, _mutex_name(name))
        lease_id = _wait_for_slot(client, name, wait_seconds, flow_run_id)
        if lease_id is not None:
            _write_record(client, name, lease_id, flow_run_id)
            return lease_id
        holder = lock_holder(target)
        if holder is None:
            # Held but not recorded: a run between taking the slot and recording itself, or a slot whose
            # release did not reach the server. Such a lease runs out within LEASE_SECONDS.
            lease_id = _wait_for_slot(client, name, LEASE_SECONDS + SWEEP_SECONDS, flow_run_id,
                                      give_up=lambda: _record(name) is not None)
            if lease_id is not None:
                _write_record(client, name, lease_id, flow_run_id)
                return lease_id
            holder = lock_holder(target)
        if holder is None or not holder["final"]:
            raise _in_progress(target, name, holder, wait_seconds)
        return _reclaim(client, target, name, holder, wait_seconds, flow_run_id)


class _LeaseKeeper:
    """Renews a held lease until stopped; a failed renewal is logged, never raised into the recovery."""

    def __init__(self, name: str, lease_id: UUID) -> None:
        self.name, self.lease_id = name, lease_id
        self._stop = threading.Event()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), daemon=True,
                                        name=f"lease-{name}")
        self._thread.start()

    def _run(self) -> None:
        delay = RENEW_SECONDS
        with get_client(sync_client=True) as client:
            while not self._stop.wait(delay):
                try:
                    client.renew_concurrency_lease(lease_id=self.lease_id, lease_duration=LEASE_SECONDS)
                    delay = RENEW_SECONDS
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code == 410:
                        _logger().error("The lease of lock %s was revoked (released by an operator or reclaimed "
                                        "by another run): this run no longer holds the lock", self.name)
                        return
                    _logger().warning("Renewing the lease of lock %s failed (%s); retrying", self.name, exc)
                    delay = RENEW_RETRY_SECONDS
                except httpx.HTTPError as exc:
                    _logger().warning("Renewing the lease of lock %s failed (%s); retrying", self.name, exc)
                    delay = RENEW_RETRY_SECONDS

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=RENEW_RETRY_SECONDS)


@contextmanager
def recovery_lock(target: str, wait_seconds: float, flow_run_id: UUID | None = None) -> Iterator[str]:
    """Hold the one slot of ``target``'s recovery lock for the duration of the block.

    Waits up to ``wait_seconds`` for a live holder; reclaims the slot of a holder in a final state;
    raises RecoveryInProgress naming the holder otherwise.
    """
    name = lock_name(target)
    lease_id = _acquire(target, name, wait_seconds, flow_run_id)
    keeper = _LeaseKeeper(name, lease_id)
    try:
        yield name
    finally:
        keeper.stop()
        try:
            record = _record(name)
            if record and record.get("lease_id") == str(lease_id):  # not a record a reclaimer wrote since
                Variable.unset(_holder_variable(name))
        finally:
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots_with_lease(lease_id=lease_id)
