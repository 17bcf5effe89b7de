"""Smoke tests after a failover: health endpoints over HTTP, the database over SQL."""

from __future__ import annotations

import time

import httpx
from prefect import task

from blocks.postgres import CheckResult, PostgresCluster
from blocks.errors import PostgresError
from tasks._policy import policy


@task(name="smoke-test-http", **policy(timeout_seconds=300, retries=0))
def smoke_test_http(urls: list[str], timeout_seconds: float = 5, attempts: int = 3, interval_seconds: float = 0.5) -> list[CheckResult]:
    """GET every URL; each passes on a 2xx answer within ``attempts`` tries."""
    results = []
    with httpx.Client(timeout=timeout_seconds) as client:
        for url in urls:
            detail = ""
            passed = False
            for attempt in range(attempts):
                started = time.monotonic()
                try:
                    answer = client.get(url)
                    passed = answer.is_success
                    detail = f"HTTP {answer.status_code} in {1000 * (time.monotonic() - started):.0f} ms"
                except httpx.HTTPError as exc:
                    detail = f"{type(exc).__name__}: {exc}"[:200]
                if passed:
                    break
                if attempt + 1 < attempts:
                    time.sleep(interval_seconds)
            results.append(CheckResult(f"health {url}", passed, detail))
    return results


@task(name="smoke-test-sql", **policy(timeout_seconds=120, retries=0))
def smoke_test_sql(cluster: PostgresCluster, port: int, queries: list[str] | None = None) -> list[CheckResult]:
    """The instance on ``port`` answers, is the primary, accepts writes, and answers each query."""
    inst = cluster.instance_at(port)
    results = [CheckResult("database accepts writes", cluster.accepts_writes(port),
                           f"{inst.address} role {cluster.role(port)}")]
    for sql in queries or []:
        try:
            value = cluster.query_one(sql, port=port)
            results.append(CheckResult(f"query: {sql[:60]}", True, f"returned {value}"))
        except PostgresError as exc:
            results.append(CheckResult(f"query: {sql[:60]}", False, str(exc)[:300]))
    return results
