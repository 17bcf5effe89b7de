"""Redis for tests: one real redis-server for the session on a free port, flushed before every test."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from sandbox.paths import free_port


@pytest.fixture(scope="session")
def redis_url() -> str:
    """``redis://127.0.0.1:PORT`` of a redis-server without persistence, stopped at the end of the session."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt package redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="dr-redis-", dir="/tmp")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_server(redis_url):
    """The session's server with every database flushed: returns its URL without a database."""
    import redis

    redis.Redis.from_url(redis_url).flushall()
    return redis_url


@pytest.fixture
def redis_cache(redis_server, prefect_api):
    """A RedisCache block on database 3 of the test server, saved under a unique name: (name, block)."""
    from blocks.redis_cache import RedisCache

    block = RedisCache.from_url(f"{redis_server}/3", environment="sandbox")
    name = f"cache-{uuid.uuid4().hex[:8]}"
    block.save(name)
    return name, block
