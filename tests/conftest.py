"""Fixtures: a real Prefect server (test harness), real PostgreSQL 15 clusters with pgBackRest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402

from sandbox import pgcluster  # noqa: E402
from sandbox.paths import free_port  # noqa: E402

TESTS = Path(__file__).resolve().parent

# Fixtures for each system live in tests/fixtures_<system>.py and are loaded for every test module.
pytest_plugins = sorted(p.stem for p in TESTS.glob("fixtures_*.py"))


def pytest_collection_modifyitems(config, items):
    """Start the longest test (the whole sandbox and every drill) first, so parallel workers end together."""
    items.sort(key=lambda item: 0 if item.path.name == "test_sandbox.py" else 1)


@pytest.fixture(scope="session")
def prefect_api(work_root) -> str:
    """A real Prefect server on its own PostgreSQL database.

    Prefect's test harness keeps its database in SQLite, which answers "database is locked" when two
    test workers keep their servers busy; production servers run on PostgreSQL, and so does this one.
    """
    password = uuid.uuid4().hex
    port = free_port()
    pgcluster.build_single(work_root / "prefect-server", port, password, durable=False)
    with prefect_server(pgcluster.sqlalchemy_url(port, password), startup_timeout=90):
        yield PREFECT_API_URL.value()


@contextmanager
def prefect_server(database_url: str, startup_timeout: int):
    """Prefect's test harness, with the server's database at ``database_url``."""
    import prefect.context
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    with ExitStack() as stack:
        stack.enter_context(temporary_database_interface())
        stack.enter_context(temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: database_url}))
        server = SubprocessASGIServer(port=free_port())
        prior = SubprocessASGIServer._instances.get(None)
        SubprocessASGIServer._instances[None] = server
        stack.callback(lambda: SubprocessASGIServer._instances.update({None: prior}) if prior
                       else SubprocessASGIServer._instances.pop(None, None))
        stack.callback(server.stop)
        server.start(timeout=startup_timeout)
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
        stack.enter_context(prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()))
        yield
        run_coro_as_sync(_drain_workers())


async def _drain_workers() -> None:
    """Send the logs and events still queued before the server stops, as Prefect's test harness does."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        result = APILogWorker.instance().drain()
        if inspect.isawaitable(result):
            await result
    except RuntimeError:
        pass
    result = EventsWorker.drain_all()
    if inspect.isawaitable(result):
        await result


@pytest.fixture(scope="session")
def work_root() -> Path:
    """A directory the postgres user can traverse (pytest's own tmp is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="dr-tests-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    for child in root.iterdir():
        pgcluster.stop_all(child)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg(work_root) -> pgcluster.ClusterLayout:
    """A fresh primary with checksums, WAL archiving and a first full backup (no replica)."""
    root = work_root / uuid.uuid4().hex[:8]
    layout = pgcluster.ClusterLayout(root, free_port(), None, "s3cret:pass\\word")
    pgcluster.build(layout, with_replica=False)
    yield layout
    pgcluster.stop_all(root)


@pytest.fixture
def cluster(pg, prefect_api):
    """The PostgresCluster block of ``pg``, saved under a unique name: (name, block, layout)."""
    from blocks import PostgresCluster, PostgresInstance

    block = PostgresCluster(
        primary=PostgresInstance(port=pg.primary_port, data_directory=str(pg.primary_dir)),
        password=pg.password,
        socket_directory=str(pg.socket_dir),
        pgbackrest_config=str(pg.pgbackrest_conf),
        recovery_directory=str(pg.recovery_dir),
        environment="sandbox",
    )
    name = f"test-{uuid.uuid4().hex[:8]}"
    block.save(name)
    return name, block, pg


def sql(layout: pgcluster.ClusterLayout, statement: str) -> str:
    return pgcluster.psql(layout, layout.primary_port, statement)


def seed_before_after(layout: pgcluster.ClusterLayout):
    """Commit 300 rows, take the target time, commit 50 more; returns the target."""
    from datetime import datetime, timezone

    time.sleep(1.1)  # targets within the second the first backup ended are not recoverable
    sql(layout, "CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY, note text NOT NULL)")
    sql(layout, "INSERT INTO ledger SELECT g, 'before' FROM generate_series(1, 300) g")
    time.sleep(0.4)
    target = datetime.now(timezone.utc)
    time.sleep(0.4)
    sql(layout, "INSERT INTO ledger SELECT g, 'after' FROM generate_series(301, 350) g")
    return target


def subprocess_env(api_url: str) -> dict:
    return dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(TESTS.parent))


def start_flow(api_url: str, run_name: str, params: dict,
               flow: str = "flows.db_corruption:db_corruption") -> subprocess.Popen:
    """Run ``flow`` (module:function, by default the database-corruption flow) in another process."""
    import json

    return subprocess.Popen(
        [sys.executable, str(TESTS / "flow_runner.py"), run_name, json.dumps(params, default=str), flow],
        env=subprocess_env(api_url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def dr(api_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``dr`` CLI in another process against the test server."""
    return subprocess.run([str(Path(sys.executable).parent / "dr"), *args], env=subprocess_env(api_url),
                           capture_output=True, text=True, timeout=timeout)


def wait_for_run(run_name: str, predicate, timeout: float = 120):
    """Poll the API until the flow run called ``run_name`` satisfies ``predicate``; return it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    deadline = time.monotonic() + timeout
    last = None
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
            if runs:
                last = runs[0]
                if predicate(last):
                    return last
            time.sleep(0.3)
    raise AssertionError(f"flow run {run_name} did not reach the expected state; last: {last.state if last else None}")
