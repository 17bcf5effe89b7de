"""Health endpoints of a service or region, and probes whose results are evidence.

An outage is declared only on consecutive failures inside a window (the continuity plan's
failover trigger: the health check fails for 2 consecutive periods, 60 s in total); a single
failed probe between successes is a blip, recorded but not an outage. Every probe is bounded
by the block's timeout (the whole answer, not each read: a server trickling bytes does not hold a
probe longer), and every probing session by its window plus one timeout: rounds start inside the
window, and the endpoints of a round are probed concurrently.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Literal

import httpx
from prefect.blocks.core import Block
from pydantic import Field

from blocks.errors import InvalidInput, RecoveryError


class HealthError(RecoveryError):
    """A health probe could not be run as asked."""


@dataclass(frozen=True)
class Probe:
    """One request to one endpoint."""

    at: str
    ok: bool
    status: int | None
    latency_ms: float
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EndpointEvidence:
    """Every probe of one endpoint in a session, and what they add up to."""

    name: str
    url: str
    probes: list[Probe] = field(default_factory=list)
    failures_required: int = 2

    @property
    def longest_failure_run(self) -> int:
        run = best = 0
        for probe in self.probes:
            run = 0 if probe.ok else run + 1
            best = max(best, run)
        return best

    @property
    def trailing(self) -> tuple[bool | None, int]:
        """The outcome of the latest probes and how many in a row share it."""
        if not self.probes:
            return None, 0
        last, count = self.probes[-1].ok, 0
        for probe in reversed(self.probes):
            if probe.ok != last:
                break
            count += 1
        return last, count

    @property
    def outage_confirmed(self) -> bool:
        """``failures_required`` consecutive failures were seen."""
        return self.longest_failure_run >= self.failures_required

    @property
    def healthy(self) -> bool:
        """The latest ``failures_required`` probes (at least one) all succeeded."""
        last, count = self.trailing
        return bool(last) and count >= min(self.failures_required, len(self.probes))

    @property
    def decided(self) -> bool:
        last, count = self.trailing
        return last is not None and count >= self.failures_required

    def as_dict(self) -> dict:
        return {"name": self.name, "url": self.url, "probes": [p.as_dict() for p in self.probes],
                "outage_confirmed": self.outage_confirmed, "healthy": self.healthy,
                "longest_failure_run": self.longest_failure_run}


@dataclass
class HealthEvidence:
    """A probing session over a set of endpoints, as data for the incident report."""

    target: str
    failures_required: int
    window_seconds: float
    interval_seconds: float
    started_at: str
    ended_at: str = ""
    endpoints: list[EndpointEvidence] = field(default_factory=list)

    @property
    def down(self) -> list[str]:
        return [e.name for e in self.endpoints if e.outage_confirmed]

    @property
    def outage_confirmed(self) -> bool:
        """Every endpoint had ``failures_required`` consecutive failures within the window."""
        return bool(self.endpoints) and all(e.outage_confirmed for e in self.endpoints)

    @property
    def all_healthy(self) -> bool:
        return bool(self.endpoints) and all(e.healthy for e in self.endpoints)

    def summary(self) -> str:
        parts = []
        for e in self.endpoints:
            fails = sum(1 for p in e.probes if not p.ok)
            state = "DOWN" if e.outage_confirmed else ("healthy" if e.healthy else "unsettled")
            parts.append(f"{e.name}: {state} ({len(e.probes)} probes, {fails} failed, "
                         f"longest failure run {e.longest_failure_run})")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"target": self.target, "failures_required": self.failures_required,
                "window_seconds": self.window_seconds, "interval_seconds": self.interval_seconds,
                "started_at": self.started_at, "ended_at": self.ended_at,
                "outage_confirmed": self.outage_confirmed, "all_healthy": self.all_healthy, "down": self.down,
                "endpoints": [e.as_dict() for e in self.endpoints]}


@dataclass(frozen=True)
class LatencyResult:
    """Latency of ``samples`` sequential requests to one endpoint."""

    name: str
    url: str
    samples: int
    failures: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], pct: float) -> float | None:
    """The ``pct`` percentile of ``values`` by the nearest-rank method (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class HealthEndpoints(Block):
    """A named set of health URLs (one service, or every public endpoint of a region).

    Example:
        ```python
        from blocks.health import HealthEndpoints
        region = HealthEndpoints.load("primary-region")
        evidence = region.probe(failures_required=2, window_seconds=60)
        evidence.outage_confirmed
        ```
    """

    _block_type_name = "Health Endpoints"
    _block_type_slug = "health-endpoints"
    _description = "Health-check URLs of a service or region, the status they answer when healthy, and a timeout."

    endpoints: dict[str, str] = Field(description="Endpoint name -> health URL.")
    expected_status: list[int] = Field(default_factory=lambda: [200], description="HTTP statuses counted as healthy.")
    timeout_seconds: float = Field(default=5, gt=0, description="Upper bound of one probe (connect and read).")
    verify_tls: bool = Field(default=True, description="Verify TLS certificates of https URLs.")
    region: str | None = Field(default=None, description="Region or service these endpoints belong to, for evidence.")

    def _select(self, names: list[str] | None) -> dict[str, str]:
        if not self.endpoints:
            raise InvalidInput("the health endpoint set is empty")
        if not names:
            return dict(self.endpoints)
        unknown = [n for n in names if n not in self.endpoints]
        if unknown:
            raise InvalidInput(f"unknown health endpoints {unknown}; known: {', '.join(sorted(self.endpoints))}")
        return {n: self.endpoints[n] for n in names}

    def _client(self) -> httpx.Client:
        return httpx.Client(timeout=httpx.Timeout(self.timeout_seconds), verify=self.verify_tls, follow_redirects=False)

    def _probe(self, url: str, http: httpx.Client | None = None) -> Probe:
        """One GET of ``url``; the whole answer (headers and body) must arrive within ``timeout_seconds``."""
        at, started = _now(), time.monotonic()
        deadline = started + self.timeout_seconds

        def elapsed_ms() -> float:
            return round((time.monotonic() - started) * 1000, 2)

        own = http is None
        http = http or self._client()
        try:
            with http.stream("GET", url) as response:
                for _ in response.iter_raw():
                    if time.monotonic() > deadline:
                        return Probe(at, False, response.status_code, elapsed_ms(),
                                     f"ReadTimeout: the answer was not complete within {self.timeout_seconds:g} s")
        except httpx.HTTPError as exc:
            return Probe(at, False, None, elapsed_ms(), f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            if own:
                http.close()
        latency = elapsed_ms()
        if latency > self.timeout_seconds * 1000:
            return Probe(at, False, response.status_code, latency,
                         f"ReadTimeout: the answer was not complete within {self.timeout_seconds:g} s")
        ok = response.status_code in self.expected_status
        return Probe(at, ok, response.status_code, latency,
                     None if ok else f"HTTP {response.status_code}, expected {self.expected_status}")

    def _probe_round(self, pool: ThreadPoolExecutor, urls: list[str]) -> list[Probe]:
        """Probe ``urls`` concurrently; one whose probe has not returned a little after the timeout is failed."""
        at = _now()
        futures = [pool.submit(self._probe, url) for url in urls]
        wait(futures, timeout=self.timeout_seconds + 0.5)
        late = f"Timeout: no answer within {self.timeout_seconds:g} s"
        return [f.result() if f.done() else Probe(at, False, None, round(self.timeout_seconds * 1000, 2), late)
                for f in futures]

    def probe_once(self, names: list[str] | None = None) -> dict[str, Probe]:
        """One probe of each endpoint (concurrently)."""
        selected = self._select(names)
        pool = ThreadPoolExecutor(max_workers=min(16, len(selected)), thread_name_prefix="health-probe")
        try:
            return dict(zip(selected, self._probe_round(pool, list(selected.values())), strict=True))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def check_settings(self, failures_required: int, window_seconds: float, interval_seconds: float | None = None,
                       names: list[str] | None = None) -> dict[str, str]:
        """Refuse (InvalidInput) probe settings that cannot work, before anything is probed or changed.

        Returns:
            The selected endpoints (name -> URL).
        """
        if not isinstance(failures_required, int) or failures_required < 1:
            raise InvalidInput(f"failures_required {failures_required!r} must be a whole number >= 1")
        if window_seconds <= 0:
            raise InvalidInput(f"window_seconds {window_seconds!r} must be positive")
        interval = interval_seconds if interval_seconds is not None else window_seconds / failures_required
        if interval <= 0:
            raise InvalidInput(f"interval_seconds {interval_seconds!r} must be positive")
        if (failures_required - 1) * interval > window_seconds:
            raise InvalidInput(
                f"{failures_required} consecutive failures {interval:g} s apart do not fit in a {window_seconds:g} s window"
            )
        selected = self._select(names)
        empty = [n for n, url in selected.items() if not str(url or "").strip()]
        if empty:
            raise InvalidInput(f"health endpoints {empty} have no URL")
        return selected

    def probe(self, failures_required: int = 2, window_seconds: float = 60, interval_seconds: float | None = None,
              names: list[str] | None = None, until: Literal["decided", "healthy", "window"] = "decided"
              ) -> HealthEvidence:
        """Probe every endpoint every ``interval_seconds`` for at most ``window_seconds``.

        An endpoint's outage is confirmed by ``failures_required`` consecutive failures inside the
        window; it is healthy when its latest ``failures_required`` probes succeeded. The endpoints
        of a round are probed concurrently and rounds start only inside the window, so the session
        lasts at most the window plus one probe timeout. It ends when the window closes, or earlier: with ``until="decided"`` (detecting an outage) as
        soon as every endpoint has ``failures_required`` agreeing probes in a row (down or up); with
        ``until="healthy"`` (verifying a recovery) as soon as every endpoint is healthy.

        Args:
            failures_required: consecutive failures that make an outage (>= 1).
            window_seconds: the longest the session lasts.
            interval_seconds: time between rounds; default spreads ``failures_required`` rounds over the window.
            names: a subset of the endpoints; all by default.
            until: 'decided', 'healthy' or 'window' (probe for the whole window).
        """
        if until not in ("decided", "healthy", "window"):
            raise InvalidInput(f"until {until!r} is not 'decided', 'healthy' or 'window'")
        selected = self.check_settings(failures_required, window_seconds, interval_seconds, names)
        interval = interval_seconds if interval_seconds is not None else window_seconds / failures_required
        evidence = HealthEvidence(target=self.region or ", ".join(sorted(selected)), failures_required=failures_required,
                                  window_seconds=window_seconds, interval_seconds=interval, started_at=_now(),
                                  endpoints=[EndpointEvidence(n, u, failures_required=failures_required)
                                             for n, u in selected.items()])
        started = time.monotonic()
        window_end = started + window_seconds + 1e-6
        rounds = int(window_seconds / interval + 1e-6) + 1  # rounds at 0, interval, ... up to the window's end
        pool = ThreadPoolExecutor(max_workers=min(32, 2 * len(selected)), thread_name_prefix="health-probe")
        try:
            for number in range(rounds):
                start = max(started + number * interval, time.monotonic())
                if number and start > window_end:
                    break  # slow rounds used the window up
                time.sleep(max(0.0, start - time.monotonic()))
                probes = self._probe_round(pool, [e.url for e in evidence.endpoints])
                for endpoint, probe in zip(evidence.endpoints, probes, strict=True):
                    endpoint.probes.append(probe)
                if until == "decided" and all(e.decided for e in evidence.endpoints):
                    break
                if until == "healthy" and all(e.healthy and e.decided for e in evidence.endpoints):
                    break
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        evidence.ended_at = _now()
        return evidence

    def latency(self, name: str | None = None, samples: int = 20) -> LatencyResult:
        """Send ``samples`` sequential requests to one endpoint (the first by default) and report p50/p95."""
        if not isinstance(samples, int) or samples < 1 or samples > 10_000:
            raise InvalidInput(f"samples {samples!r} must be between 1 and 10000")
        chosen = self._select([name] if name else None)
        endpoint, url = next(iter(chosen.items()))
        with self._client() as http:
            probes = [self._probe(url, http) for _ in range(samples)]
        good = [p.latency_ms for p in probes if p.ok]
        return LatencyResult(endpoint, url, samples, sum(1 for p in probes if not p.ok), percentile(good, 50),
                             percentile(good, 95), max(good) if good else None)
