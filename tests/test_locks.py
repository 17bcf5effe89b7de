"""The recovery lock against a real Prefect server: a dead holder's slot is reclaimed by exactly one
run, the dead lease is revoked (its expiry cannot free the new holder's slot), and the regional
flow never leaves a lock behind."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from conftest import subprocess_env
from sandbox.paths import free_port
from test_regional import pair, regions  # noqa: F401  (the two-region estate of the regional tests)

# Holds the lock of argv[1] for flow run argv[2] until killed.
HOLDER = """
import sys, time
from uuid import UUID
from runbook.locks import recovery_lock
with recovery_lock(sys.argv[1], 5, UUID(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def _new_run(client, name: str):
    from prefect import flow
    from prefect.states import Running

    @flow(name="lock-test")
    def lock_test() -> None:
        pass

    return client.create_flow_run(lock_test, name=name, state=Running())


def kill_a_holder(api_url: str, target: str) -> tuple[uuid.UUID, str]:
    """A run that took ``target``'s lock in another process, SIGKILLed and marked Crashed: (run id, lease id)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from runbook.locks import lock_holder

    with get_client(sync_client=True) as client:
        dead = _new_run(client, f"dead-{uuid.uuid4().hex[:6]}").id
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, target, str(dead)], env=subprocess_env(api_url),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "held", line + (proc.stdout.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(dead, Crashed(message="worker host lost"), force=True)
    holder = lock_holder(target)
    assert holder["flow_run_id"] == str(dead) and holder["final"] and holder["lease_id"], holder
    return dead, holder["lease_id"]


def active_slots(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def lease_exists(lease_id: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.renew_concurrency_lease(lease_id=uuid.UUID(lease_id), lease_duration=60)
        except httpx.HTTPStatusError as exc:
            assert exc.response.status_code == 410, exc
            return False
    return True


def test_three_runs_reclaiming_one_dead_holder_admit_exactly_one(prefect_api):
    from prefect.client.orchestration import get_client

    from blocks.errors import RecoveryInProgress
    from runbook.locks import lock_holder, lock_name, recovery_lock

    target = f"locks-{uuid.uuid4().hex[:6]}"
    dead, dead_lease = kill_a_holder(prefect_api, target)
    with get_client(sync_client=True) as client:
        runs = [_new_run(client, f"reclaimer-{i}").id for i in range(3)]

    start = threading.Barrier(len(runs))
    done = threading.Event()
    entered: list[uuid.UUID] = []
    refused: dict[uuid.UUID, BaseException] = {}

    def reclaim(run_id: uuid.UUID) -> None:
        start.wait(timeout=30)
        try:
            with recovery_lock(target, 3, run_id):
                entered.append(run_id)
                done.wait(timeout=60)  # hold the lock until the other two have given up
        except BaseException as exc:  # noqa: BLE001  (recorded and asserted on below)
            refused[run_id] = exc

    threads = [threading.Thread(target=reclaim, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(refused) + len(entered) < len(runs) and len(refused) < len(runs) - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    holder_during = lock_holder(target)
    slots_during = active_slots(lock_name(target))
    done.set()
    for thread in threads:
        thread.join(timeout=60)

    assert len(entered) == 1, (entered, refused)
    winner = entered[0]
    assert sorted(refused) == sorted(r for r in runs if r != winner)
    for exc in refused.values():
        assert isinstance(exc, RecoveryInProgress), repr(exc)
        assert str(winner) in str(exc), str(exc)
    assert holder_during["flow_run_id"] == str(winner) and not holder_during["final"]
    assert slots_during == 1
    # The dead run's lease was revoked, so its expiry cannot free the slot the winner held.
    assert not lease_exists(dead_lease)
    # Released on exit: free for the next run at once, nobody recorded.
    assert lock_holder(target) is None and active_slots(lock_name(target)) == 0
    with recovery_lock(target, 0, runs[0]):
        assert lock_holder(target)["flow_run_id"] == str(runs[0])


def test_a_live_holder_is_named_and_keeps_its_lock(prefect_api):
    from prefect.client.orchestration import get_client

    from blocks.errors import RecoveryInProgress
    from runbook.locks import lock_holder, lock_name, recovery_lock

    target = f"locks-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        first, second = (_new_run(client, f"live-{i}").id for i in range(2))
    with recovery_lock(target, 0, first):
        with pytest.raises(RecoveryInProgress, match=str(first)) as refused:
            with recovery_lock(target, 0.5, second):
                pytest.fail("a second run entered a held lock")
        assert "dr unlock" in str(refused.value)
        assert lock_holder(target)["flow_run_id"] == str(first) and active_slots(lock_name(target)) == 1
    assert lock_holder(target) is None and active_slots(lock_name(target)) == 0


def test_dr_unlock_releases_a_dead_holders_lease(prefect_api):
    from conftest import dr
    from runbook.locks import lock_holder, lock_name

    target = f"locks-{uuid.uuid4().hex[:6]}"
    dead, dead_lease = kill_a_holder(prefect_api, target)
    result = dr(prefect_api, "unlock", target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lock_holder(target) is None and active_slots(lock_name(target)) == 0
    assert not lease_exists(dead_lease)


# ---------------------------------------------------------------------------------------------------
# The server's own sweep of expired leases, on a server whose leases are kept on disk.

SERVICES_OFF = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS",
                "TASK_RUN_RECORDER", "EVENT_PERSISTER", "TRIGGERS", "EVENT_LOGGER", "DB_VACUUM",
                "CLEANUP_RECONCILER")


@pytest.fixture(scope="module")
def sweeping_server(work_root, prefect_api):
    """A second Prefect server on the test server's database, with its lease sweeper (the repossessor)
    running every second, every other service off, and its leases in files the test can reach:
    (API URL, lease directory)."""
    from prefect.settings import get_current_settings

    database_url = get_current_settings().server.database.connection_url.get_secret_value()
    root = work_root / f"sweeping-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(root), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",  # the test server migrated it
        "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
        **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in SERVICES_OFF},
    })
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on", "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the sweeping server did not start in 90 s"
            time.sleep(0.2)
        yield url, root / "concurrency_leases"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@contextmanager
def api(url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def expire(lease_dir: Path, lease_id: str) -> bool:
    """Move ``lease_id``'s expiry into the past, in the server's own lease storage; False if it has no such lease."""
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

    storage = ConcurrencyLeaseStorage(storage_path=lease_dir)
    return asyncio.run(storage.renew_lease(uuid.UUID(lease_id), timedelta(seconds=-5)))


def test_the_dead_lease_expiring_does_not_free_the_new_holders_slot(sweeping_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from blocks.errors import RecoveryInProgress
    from runbook.locks import lock_holder, lock_name, recovery_lock

    url, lease_dir = sweeping_server
    target = f"sweep-{uuid.uuid4().hex[:6]}"
    with api(url):
        dead, dead_lease = kill_a_holder(url, target)
        with get_client(sync_client=True) as client:
            rerun, third = (_new_run(client, f"after-{i}").id for i in range(2))
            control = f"control-{uuid.uuid4().hex[:6]}"  # a lease left to expire: shows the sweeper ran
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=control, limit=1))
            control_lease = client.increment_concurrency_slots_with_lease(
                names=[control], slots=1, mode="concurrency", lease_duration=60).json()["lease_id"]
        with recovery_lock(target, 2, rerun):
            assert lock_holder(target)["flow_run_id"] == str(rerun)
            expire(lease_dir, dead_lease)  # if the dead lease still existed, the sweeper would now take it back
            assert expire(lease_dir, control_lease)
            deadline = time.monotonic() + 30
            while active_slots(control) or (lease_dir / f"{dead_lease}.json").exists():
                assert time.monotonic() < deadline, "the server did not sweep the expired leases in 30 s"
                time.sleep(0.2)
            assert active_slots(lock_name(target)) == 1
            with pytest.raises(RecoveryInProgress, match=str(rerun)):
                with recovery_lock(target, 0.5, third):
                    pytest.fail("a third run entered while the rerun held the lock")
        assert active_slots(lock_name(target)) == 0


def test_a_holder_renews_its_lease_while_it_holds_the_lock(sweeping_server, monkeypatch):
    import json

    from prefect.client.orchestration import get_client

    from runbook import locks

    url, lease_dir = sweeping_server
    monkeypatch.setattr(locks, "RENEW_SECONDS", 0.2)
    target = f"renew-{uuid.uuid4().hex[:6]}"
    with api(url):
        with get_client(sync_client=True) as client:
            run = _new_run(client, "renewing").id
        with locks.recovery_lock(target, 0, run):
            lease_file = lease_dir / f"{locks.lock_holder(target)['lease_id']}.json"
            first = json.loads(lease_file.read_text())["expiration"]
            deadline = time.monotonic() + 20
            while json.loads(lease_file.read_text())["expiration"] == first:
                assert time.monotonic() < deadline, "the holder did not renew its lease in 20 s"
                time.sleep(0.1)
        assert not lease_file.exists() and active_slots(locks.lock_name(target)) == 0


# ---------------------------------------------------------------------------------------------------
# The regional flow takes two locks: the estate's, then the database's.

def test_a_regional_failover_refused_on_the_cluster_lock_leaves_the_estate_lock_free(regions, prefect_api):  # noqa: F811
    from prefect.client.orchestration import get_client

    from blocks.region import Region
    from flows.regional_failover import regional_failover
    from runbook.locks import lock_holder, lock_name, recovery_lock

    r = regions
    r.health.set_healthy("primary", False)
    estate = f"estate-{r.zone}"
    cluster_block = Region.load(r.primary).postgres_cluster
    with get_client(sync_client=True) as client:
        other, later = (_new_run(client, f"other-{i}").id for i in range(2))
    with recovery_lock(cluster_block, 0, other):  # another recovery of the database is running
        state = regional_failover(**r.params(lock_wait_seconds=1), return_state=True)
        assert state.is_failed() and str(other) in state.message, state.message
        r.untouched()
        # The estate lock the flow took first is free again, in this same process.
        assert lock_holder(estate) is None and active_slots(lock_name(estate)) == 0
        with recovery_lock(estate, 0, later):
            assert lock_holder(estate)["flow_run_id"] == str(later)
