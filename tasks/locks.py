"""One recovery per target at a time, held through approval pauses (a global concurrency limit)."""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from typing import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from blocks.errors import RecoveryInProgress


def lock_name(target: str) -> str:
    return "dr-recovery-" + re.sub(r"[^a-z0-9-]+", "-", target.lower()).strip("-")


@contextmanager
def recovery_lock(target: str, wait_seconds: float) -> Iterator[str]:
    """Hold the one slot of ``target``'s recovery lock; refuse after ``wait_seconds`` if another run holds it."""
    name = lock_name(target)
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass  # created by an earlier recovery of the same target
    held = ExitStack()
    try:
        held.enter_context(concurrency(name, occupy=1, strict=True, timeout_seconds=wait_seconds))
    except TimeoutError as exc:
        raise RecoveryInProgress(
            f"another recovery of {target!r} is running (lock {name} held); waited {wait_seconds:.0f} s"
        ) from exc
    with held:
        yield name
