"""Health probes as tasks: evidence as data, every session bounded by its window."""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task

from blocks.health import HealthEndpoints, HealthEvidence, LatencyResult, Probe
from tasks._policy import policy


@task(name="probe-health", **policy(timeout_seconds=3600, retries=0))
def probe_health(endpoints: HealthEndpoints, failures_required: int = 2, window_seconds: float = 60,
                 interval_seconds: float | None = None, names: list[str] | None = None,
                 until: Literal["decided", "healthy", "window"] = "decided") -> HealthEvidence:
    """Probe the endpoints over a window; an outage needs ``failures_required`` consecutive failures.

    Default: 2 consecutive failures over 60 s (the continuity plan's failover trigger). ``until``
    ends the session early: 'decided' (every endpoint settled up or down, for outage detection),
    'healthy' (every endpoint healthy, for verifying a recovery) or 'window' (never).
    """
    evidence = endpoints.probe(failures_required, window_seconds, interval_seconds, names, until)
    get_run_logger().info("Health of %s: %s", evidence.target, evidence.summary())
    return evidence


@task(name="probe-health-once", **policy(timeout_seconds=120))
def probe_health_once(endpoints: HealthEndpoints, names: list[str] | None = None) -> dict[str, Probe]:
    """One probe of each endpoint."""
    return endpoints.probe_once(names)


@task(name="measure-latency", **policy(timeout_seconds=600))
def measure_latency(endpoints: HealthEndpoints, name: str | None = None, samples: int = 20) -> LatencyResult:
    """p50/p95 latency of ``samples`` sequential requests to one endpoint."""
    return endpoints.latency(name, samples)
