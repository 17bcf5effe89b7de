"""The recovery validation checklist of the continuity plan, as reusable checks that return results.

Each check is a task that takes the estate's blocks (or an address) and returns a
:class:`~blocks.results.CheckResult` (name, passed, detail, critical); none raises for a failed
check, so a flow can run the whole list and decide on the critical failures:

- all pods are Running                  -> :func:`check_pods_running`
- the API health check returns 200      -> :func:`check_health_200`
- database connectivity                 -> :func:`check_database_connectivity`
- object storage objects are accessible -> :func:`check_objects_accessible`
- Qdrant collections populated, searchable -> :func:`check_qdrant_searchable`
- TLS certificates are valid            -> :func:`check_tls_certificate`
- network policies are applied          -> :func:`check_network_policies`
- performance meets the baseline        -> :func:`check_latency_baseline`
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from contextlib import closing
from datetime import datetime, timezone
from typing import Literal

import httpx
from prefect import task

from blocks.errors import InvalidInput, RecoveryError
from blocks.object_store import ObjectStore
from blocks.postgres import PostgresCluster
from blocks.results import CheckResult
from blocks.qdrant import QdrantCluster
from tasks._policy import policy


@task(name="check-pods-running", **policy(timeout_seconds=120, retries=0))
def check_pods_running(kube, selector: dict[str, str] | str | None = None, expected: int | None = None) -> CheckResult:
    """Every pod matching ``selector`` (on a KubernetesTarget) is Running and ready, and there are at least ``expected``."""
    try:
        pods = kube.list_pods(selector)
    except RecoveryError as exc:
        return CheckResult("pods Running", False, f"cannot list pods: {exc}")
    bad = [f"{p['name']} ({p['phase']}{', not ready' if p['phase'] == 'Running' else ''})"
           for p in pods if p["phase"] != "Running" or not p["ready"]]
    enough = expected is None or len(pods) - len(bad) >= expected
    detail = f"{len(pods) - len(bad)} of {len(pods)} Running" + (f" (expected {expected})" if expected else "")
    return CheckResult("pods Running", bool(pods) and not bad and enough, detail + (f"; {', '.join(bad[:5])}" if bad else ""))


@task(name="check-health-200", **policy(timeout_seconds=60, retries=0))
def check_health_200(url: str, timeout_seconds: float = 5) -> CheckResult:
    """The health endpoint at ``url`` answers 200 OK."""
    try:
        status = httpx.get(url, timeout=timeout_seconds).status_code
    except httpx.HTTPError as exc:
        return CheckResult(f"health 200: {url}", False, f"no answer: {exc}")
    return CheckResult(f"health 200: {url}", status == 200, f"HTTP {status}")


@task(name="check-database-connectivity", **policy(timeout_seconds=120, retries=0))
def check_database_connectivity(cluster: PostgresCluster) -> CheckResult:
    """The primary and every replica of the cluster accept a session and answer ``SELECT 1``."""
    results = []
    for instance in [cluster.primary, *cluster.replicas]:
        try:
            ok = cluster.query_one("SELECT 1", port=instance.port) == 1
        except RecoveryError as exc:
            results.append((instance.address, False, str(exc).split(":", 1)[0]))
            continue
        results.append((instance.address, ok, "ok"))
    failed = [f"{a}: {d}" for a, ok, d in results if not ok]
    return CheckResult("database connectivity", not failed,
                       "; ".join(failed) if failed else f"{len(results)} instances answer")


@task(name="check-objects-accessible", **policy(timeout_seconds=120, retries=0))
def check_objects_accessible(store: ObjectStore, prefix: str = "",
                             which: Literal["primary", "secondary"] = "primary") -> CheckResult:
    """Objects under ``prefix`` of the store's ``which`` bucket can be listed, and the first one read in full."""
    name = f"objects accessible: {which} {prefix or '(all)'}"
    try:
        listing = store.list_objects(prefix, which)
        if not listing:
            return CheckResult(name, False, "no object found")
        first = listing[min(listing)]
        read = store.verify_readable([first.key], which, expected={first.key: (first.size, first.etag)})
    except RecoveryError as exc:
        return CheckResult(name, False, str(exc))
    if not read.passed:
        return CheckResult(name, False, "; ".join(f"{k}: {why}" for k, why in read.unreadable))
    return CheckResult(name, True, f"read {first.size} bytes of {first.key}")


@task(name="check-qdrant-searchable", **policy(timeout_seconds=120, retries=0))
def check_qdrant_searchable(qdrant: QdrantCluster, collection: str, min_points: int = 1) -> CheckResult:
    """A Qdrant collection (or alias) holds at least ``min_points`` points, and a search for a stored vector finds it."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    name = f"qdrant searchable: {collection}"
    try:
        info = qdrant.collection_info(collection)
        if info.points < min_points:
            return CheckResult(name, False, f"{info.points} points, expected at least {min_points}")
        with closing(qdrant.scroll_batches(info.name, batch_size=1)) as batches:
            sample = next(batches, None)
        if sample is None:
            return CheckResult(name, False, f"{info.points} points counted, but none could be read back")
        ids, vectors, _ = sample
        recall = qdrant.sample_recall(info.name, vectors[:1], [[ids[0]]], k=10)
    except (RecoveryError, ResponseHandlingException, UnexpectedResponse) as exc:
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}")
    found = recall.queries == 1 and recall.recall == 1.0
    return CheckResult(name, found, f"{info.points} points; a search for a stored vector "
                       + ("found it" if found else "did not find it"))


@task(name="check-tls-certificate", **policy(timeout_seconds=60, retries=0))
def check_tls_certificate(host: str, port: int = 443, min_days: int = 14, timeout_seconds: float = 5) -> CheckResult:
    """The certificate served at ``host:port`` is currently valid and expires in at least ``min_days`` days."""
    from cryptography import x509

    name = f"TLS certificate: {host}:{port}"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # expiry is judged here; chain trust is the client's concern
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        return CheckResult(name, False, f"no TLS handshake: {exc}")
    cert = x509.load_der_x509_certificate(der)
    now = datetime.now(timezone.utc)
    days = (cert.not_valid_after_utc - now).total_seconds() / 86400
    valid = cert.not_valid_before_utc <= now and days >= min_days
    return CheckResult(name, valid, f"{math.floor(days)} days to expiry (minimum {min_days}); "
                                    f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")


@task(name="check-network-policies", **policy(timeout_seconds=120, retries=0))
def check_network_policies(kube, names: list[str]) -> CheckResult:
    """Every NetworkPolicy in ``names`` exists in the KubernetesTarget's namespace."""
    if not names:
        raise InvalidInput("check_network_policies needs at least one policy name")
    try:
        missing = [n for n in names if kube.get_network_policy(n) is None]
    except RecoveryError as exc:
        return CheckResult("network policies applied", False, f"cannot read network policies: {exc}")
    return CheckResult("network policies applied", not missing,
                       f"missing: {', '.join(missing)}" if missing else f"{len(names)} policies present")


def p95(samples_ms: list[float]) -> float:
    """The 95th percentile (nearest rank) of ``samples_ms``."""
    ordered = sorted(samples_ms)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@task(name="check-latency-baseline", **policy(timeout_seconds=300, retries=0))
def check_latency_baseline(url: str, baseline_p95_ms: float, samples: int = 20, timeout_seconds: float = 5) -> CheckResult:
    """The p95 latency of ``samples`` GETs of ``url`` is within ``baseline_p95_ms``; any error fails the check."""
    if samples < 1 or baseline_p95_ms <= 0:
        raise InvalidInput(f"latency check needs samples >= 1 and a positive baseline, got {samples} and {baseline_p95_ms}")
    name = f"p95 latency: {url}"
    timings, errors = [], 0
    with httpx.Client(timeout=timeout_seconds) as client:
        for _ in range(samples):
            start = time.perf_counter()
            try:
                ok = client.get(url).status_code < 400
            except httpx.HTTPError:
                ok = False
            timings.append((time.perf_counter() - start) * 1000)
            errors += not ok
    value = p95(timings)
    passed = errors == 0 and value <= baseline_p95_ms
    return CheckResult(name, passed, f"p95 {value:.1f} ms over {samples} requests (baseline {baseline_p95_ms:.0f} ms)"
                                     + (f"; {errors} errors" if errors else ""))
