"""Smoke tests after a failover: health endpoints over HTTP, the database over SQL."""

from __future__ import annotations

import time

from prefect import task

from blocks.errors import InvalidInput, PostgresError
from blocks.health import HealthEndpoints
from blocks.postgres import PostgresCluster
from blocks.results import CheckResult
from tasks._policy import policy


@task(name="smoke-test-http", **policy(timeout_seconds=300, retries=0))
def smoke_test_http(endpoints: HealthEndpoints, attempts: int = 3, interval_seconds: float = 0.5) -> list[CheckResult]:
    """Probe every health endpoint; each passes on an expected status within ``attempts`` tries."""
    if attempts < 1:
        raise InvalidInput(f"attempts {attempts!r} must be at least 1")
    results: dict[str, CheckResult] = {}
    pending = list(endpoints.endpoints)
    for attempt in range(attempts):
        for name, probe in endpoints.probe_once(pending).items():
            detail = (f"HTTP {probe.status} in {probe.latency_ms:.0f} ms" if probe.ok
                      else (probe.error or f"HTTP {probe.status}")[:200])
            results[name] = CheckResult(f"health {endpoints.endpoints[name]}", probe.ok, detail)
        pending = [name for name in pending if not results[name].passed]
        if not pending:
            break
        if attempt + 1 < attempts:
            time.sleep(interval_seconds)
    return [results[name] for name in endpoints.endpoints]


@task(name="smoke-test-sql", **policy(timeout_seconds=120, retries=0))
def smoke_test_sql(cluster: PostgresCluster, port: int, queries: list[str] | None = None) -> list[CheckResult]:
    """The instance on ``port`` answers, is the primary, accepts writes, and answers each query."""
    inst = cluster.instance_at(port)
    results = [CheckResult("database accepts writes", cluster.accepts_writes(port),
                           f"{inst.address} role {cluster.role(port)}")]
    for sql in queries or []:
        try:
            # One statement in a read-only transaction, bounded by the cluster's query timeout.
            value = cluster.read_only_value(sql, port=port)
            results.append(CheckResult(f"query: {sql[:60]}", True, f"returned {value}"))
        except (PostgresError, InvalidInput) as exc:
            results.append(CheckResult(f"query: {sql[:60]}", False, str(exc)[:300]))
    return results
