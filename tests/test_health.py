"""Health probes against real HTTP servers on loopback whose answers a test scripts."""

from __future__ import annotations

import inspect
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.logging import disable_run_logger

from blocks.errors import InvalidInput
from blocks.health import HealthEndpoints, percentile
from sandbox.paths import free_port
from tasks.health import probe_health


class ScriptedServer:
    """Answers GET with the next status of ``script`` (the last one repeats); ``delay`` seconds late."""

    def __init__(self, script: list[int], delay: float = 0.0):
        self.script, self.delay, self.hits = list(script), delay, 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return

            def do_GET(self):  # noqa: N802 - http.server's naming
                with lock:
                    status = outer.script[min(outer.hits, len(outer.script) - 1)]
                    outer.hits += 1
                time.sleep(outer.delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers():
    started = []

    def start(script, delay=0.0):
        server = ScriptedServer(script, delay)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def test_two_consecutive_failures_within_window_confirm_an_outage(servers):
    down = servers([503])
    up = servers([200])
    block = HealthEndpoints(endpoints={"api": down.url, "web": up.url}, timeout_seconds=1, region="primary")
    started = time.monotonic()
    evidence = block.probe(failures_required=2, window_seconds=3, interval_seconds=0.2)
    assert time.monotonic() - started < 1.5  # stops once both endpoints are decided
    api, web = evidence.endpoints
    assert api.outage_confirmed and [p.status for p in api.probes] == [503, 503]
    assert not web.outage_confirmed and web.healthy
    assert evidence.down == ["api"] and not evidence.outage_confirmed
    assert all(p.at for p in api.probes) and evidence.as_dict()["endpoints"][0]["probes"][0]["status"] == 503


def test_a_single_blip_is_not_an_outage(servers):
    flaky = servers([200, 503, 200, 200])
    block = HealthEndpoints(endpoints={"api": flaky.url}, timeout_seconds=1)
    evidence = block.probe(failures_required=2, window_seconds=2, interval_seconds=0.1)
    api = evidence.endpoints[0]
    assert [p.ok for p in api.probes] == [True, False, True, True]
    assert not api.outage_confirmed and api.longest_failure_run == 1 and evidence.all_healthy


def test_the_required_failures_must_fit_in_the_window(servers):
    failing = servers([503])
    block = HealthEndpoints(endpoints={"api": failing.url}, timeout_seconds=1)
    evidence = block.probe(failures_required=3, window_seconds=0.5, interval_seconds=0.25)
    assert len(evidence.endpoints[0].probes) == 3 and evidence.outage_confirmed
    with pytest.raises(InvalidInput, match="do not fit"):
        block.probe(failures_required=3, window_seconds=0.3, interval_seconds=0.2)


def test_failures_that_do_not_stay_consecutive_until_the_window_closes(servers):
    flapping = servers([503, 200, 503, 200, 503])
    block = HealthEndpoints(endpoints={"api": flapping.url}, timeout_seconds=1)
    evidence = block.probe(failures_required=2, window_seconds=2, interval_seconds=0.5)
    api = evidence.endpoints[0]
    assert [p.ok for p in api.probes] == [False, True, False, True, False]
    assert not api.outage_confirmed and not api.healthy and not evidence.all_healthy


def test_each_probe_is_bounded_by_the_timeout(servers):
    slow = servers([200], delay=2.0)
    block = HealthEndpoints(endpoints={"slow": slow.url, "closed": f"http://127.0.0.1:{free_port()}/health"},
                            timeout_seconds=0.3)
    started = time.monotonic()
    evidence = block.probe(failures_required=2, window_seconds=1, interval_seconds=0.4)
    elapsed = time.monotonic() - started
    assert elapsed < 1.8
    slow_ev, closed_ev = evidence.endpoints
    assert slow_ev.outage_confirmed and "Timeout" in slow_ev.probes[0].error
    assert all(p.latency_ms < 600 for p in slow_ev.probes)
    assert closed_ev.outage_confirmed and "Connect" in closed_ev.probes[0].error
    assert evidence.outage_confirmed


def test_latency_percentiles_and_refusals(servers):
    up = servers([200])
    block = HealthEndpoints(endpoints={"api": up.url}, timeout_seconds=1)
    result = block.latency("api", samples=15)
    assert result.samples == 15 and result.failures == 0
    assert 0 < result.p50_ms <= result.p95_ms <= result.max_ms
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95) == 10 and percentile([], 95) is None
    with pytest.raises(InvalidInput, match="unknown health endpoints"):
        block.latency("nope")
    with pytest.raises(InvalidInput, match="failures_required"):
        block.probe(failures_required=0)
    with pytest.raises(InvalidInput, match="empty"):
        HealthEndpoints(endpoints={}).probe_once()


def test_probe_health_task_defaults_follow_the_plan(servers):
    up = servers([200])
    block = HealthEndpoints(endpoints={"api": up.url}, timeout_seconds=1)
    defaults = inspect.signature(probe_health.fn).parameters
    assert (defaults["failures_required"].default, defaults["window_seconds"].default) == (2, 60)
    with disable_run_logger():
        evidence = probe_health.fn(block, window_seconds=0.4)
    assert (evidence.failures_required, evidence.interval_seconds) == (2, 0.2)
    assert evidence.all_healthy and len(evidence.endpoints[0].probes) == 2


def test_verifying_a_recovery_waits_for_consecutive_successes(servers):
    recovering = servers([503, 503, 200, 200, 200])
    block = HealthEndpoints(endpoints={"api": recovering.url}, timeout_seconds=1)
    evidence = block.probe(failures_required=2, window_seconds=2, interval_seconds=0.05, until="healthy")
    assert [p.status for p in evidence.endpoints[0].probes] == [503, 503, 200, 200]
    assert evidence.all_healthy and evidence.endpoints[0].outage_confirmed
    with pytest.raises(InvalidInput, match="until"):
        block.probe(until="forever")


class TricklingServer:
    """Answers 200 at once, then sends its body one byte every ``pause`` seconds."""

    def __init__(self, size: int = 200, pause: float = 0.05):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return

            def do_GET(self):  # noqa: N802 - http.server's naming
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    for _ in range(size):
                        self.wfile.write(b".")
                        self.wfile.flush()
                        time.sleep(pause)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_trickling_answer_does_not_hold_a_probe_beyond_its_timeout(servers):
    trickle = TricklingServer(size=200, pause=0.05)  # 10 s for the whole body, each byte well inside the timeout
    up = servers([200])
    try:
        block = HealthEndpoints(endpoints={"trickle": trickle.url, "up": up.url}, timeout_seconds=0.4)
        started = time.monotonic()
        evidence = block.probe(failures_required=2, window_seconds=1, interval_seconds=0.3)
        elapsed = time.monotonic() - started
    finally:
        trickle.close()
    slow, fine = evidence.endpoints
    assert elapsed < 2.0
    assert slow.outage_confirmed and all(p.status == 200 and not p.ok for p in slow.probes)
    assert all(p.latency_ms < 800 for p in slow.probes) and "not complete within 0.4 s" in slow.probes[0].error
    assert fine.healthy and not fine.outage_confirmed


def test_endpoints_are_probed_concurrently_and_rounds_start_inside_the_window(servers):
    slow = [servers([200], delay=0.4) for _ in range(3)]
    block = HealthEndpoints(endpoints={f"s{i}": s.url for i, s in enumerate(slow)}, timeout_seconds=1)
    started = time.monotonic()
    once = block.probe_once()
    assert time.monotonic() - started < 1.1 and all(p.ok for p in once.values())  # one after another: >= 1.2 s
    # Rounds 0.1 s apart, each taking 0.4 s (at 0, 0.4 and 0.8 s; more on a loaded machine): only the
    # rounds that start inside the 1 s window run, so the session ends within the window plus one round.
    started = time.monotonic()
    evidence = block.probe(failures_required=2, window_seconds=1.0, interval_seconds=0.1, until="window")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 1.0 + 0.6, elapsed  # window + probe timeout + scheduling slack
    assert all(2 <= len(e.probes) <= 3 for e in evidence.endpoints) and evidence.all_healthy
    opened = datetime.fromisoformat(evidence.started_at)
    assert all((datetime.fromisoformat(p.at) - opened).total_seconds() <= 1.0 + 0.25 for e in evidence.endpoints
               for p in e.probes)  # every round started inside the window (a loaded thread pool may lag)


def test_settings_are_checked_without_probing(servers):
    up = servers([200])
    block = HealthEndpoints(endpoints={"api": up.url, "blank": ""}, timeout_seconds=1)
    assert block.check_settings(2, 60, 5, names=["api"]) == {"api": up.url}
    with pytest.raises(InvalidInput, match="do not fit"):
        block.check_settings(3, 1, 1, names=["api"])
    with pytest.raises(InvalidInput, match=r"\['blank'\] have no URL"):
        block.check_settings(2, 60, 5)
    assert up.hits == 0
