"""Health endpoints for tests: the sandbox's switchable health server in a thread, reset per test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def health_server():
    """The switchable health-endpoint server for the whole session."""
    from sandbox.health import HealthServer

    server = HealthServer().start()
    yield server
    server.stop()


@pytest.fixture
def health(health_server):
    """The health server with every endpoint healthy again."""
    health_server.board.reset()
    return health_server
