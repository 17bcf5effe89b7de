"""The application-rollback flow against the Kubernetes emulator, a real health endpoint and a Prefect server."""

from __future__ import annotations

import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fixtures_kube import seed_deployment

from blocks.health import HealthEndpoints
from blocks.kubernetes import KubernetesTarget
from flows.app_rollback import INCIDENT_ANNOTATION, app_rollback
from sandbox.paths import free_port
from runbook.evidence import load_report, render_markdown

GOOD, NEWER, BROKEN = "registry.local/shop:1.0", "registry.local/shop:2.0", "registry.local/shop:3.0:broken"


class AppHealth:
    """The application's /health: 200 while its deployment is rolled out on a working image and its own
    dependencies (``dependencies_up``, e.g. its database) answer; else 503. ``answers`` records each status."""

    def __init__(self, target: KubernetesTarget, deployment: str):
        outer = self
        self.target, self.deployment = target, deployment
        self.dependencies_up, self.answers = True, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return

            def do_GET(self):  # noqa: N802 - http.server's naming
                status = outer.target.rollout_status(outer.deployment)
                ok = status.complete and not any(":broken" in image for image in status.images)
                code = 200 if ok and outer.dependencies_up else 503
                outer.answers.append((code, status.complete, tuple(status.images)))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def broken_app(kube, prefect_api):
    """A deployment whose latest rollout (image ``:broken``) never became ready, its block and health URL."""
    seed_deployment(kube, "shop", image=GOOD, images=[NEWER, BROKEN])
    name = f"k8s-{uuid.uuid4().hex[:8]}"
    kube.save(name)
    health = AppHealth(kube, "shop")
    yield name, kube, health
    health.close()


def run(block: str, health_url: str | None = None, **params):
    params.setdefault("health_urls", [health_url] if health_url else None)
    params.setdefault("health_window_seconds", 3)
    params.setdefault("health_interval_seconds", 0.1)
    params.setdefault("rollout_timeout_seconds", 5)
    return app_rollback(kubernetes_block=block, return_state=True, **params)


def test_broken_rollout_is_rolled_back_and_a_rerun_does_not_roll_forward(broken_app):
    block, kube, health = broken_app
    assert kube.rollout_status("shop").images == [BROKEN]
    health_block = f"health-{uuid.uuid4().hex[:8]}"
    HealthEndpoints(endpoints={"shop": health.url}, timeout_seconds=1).save(health_block)
    state = run(block, deployment="shop", health_block=health_block)
    assert state.name == "RolledBack", state.message
    status = kube.rollout_status("shop")
    assert status.complete and status.images == [NEWER] and status.revision == 4
    assert kube.pods_running({"app": "shop"}, expected=2)
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "RolledBack" and not report.failed_critical()
    assert {c.name for c in report.checks} == {"rollout complete", "pods running", "health endpoints"}
    assert report.rto_seconds is not None and report.rto_met
    assert [a.policy for a in report.approvals] == ["none (reversible)"]
    assert report.facts["image before"] == BROKEN and report.facts["image after"] == NEWER
    assert "revision 3 -> 2" in render_markdown(report)
    incident = report.incident_id
    assert incident.startswith("shop-") and kube.get_deployment("shop")["metadata"]["annotations"][
        INCIDENT_ANNOTATION] == incident

    # The same command again (no incident id, no revision; 'previous' is now the broken release,
    # as kubectl's undo toggles): the run finds the incident's rollback done and only verifies.
    again = run(block, health.url, deployment="shop")
    assert again.name == "RolledBack", again.message
    status = kube.rollout_status("shop")
    assert status.images == [NEWER] and status.revision == 4
    report = load_report(again.state_details.flow_run_id)
    assert report.incident_id == incident
    steps = [s.step for s in report.steps]
    assert "Resume: rollback already done for this incident" in steps and "Roll back (kubectl rollout undo)" not in steps

    # Another incident id without a revision would go 'back' to the failed release: refused.
    other = run(block, health.url, deployment="shop", incident_id="inc-other")
    assert other.is_failed() and "its previous revision is that failed release" in other.message, other.message
    assert kube.rollout_status("shop").images == [NEWER] and kube.rollout_status("shop").revision == 4

    # The same failed release deployed once more is a new failure: rolled back again, not taken as done.
    kube.set_image("shop", "app", BROKEN)
    third = run(block, health.url, deployment="shop")
    assert third.name == "RolledBack", third.message
    assert kube.rollout_status("shop").images == [NEWER] and kube.rollout_status("shop").revision == 6
    assert "Roll back (kubectl rollout undo)" in [s.step for s in load_report(third.state_details.flow_run_id).steps]


def test_dry_run_lists_the_change_and_changes_nothing(broken_app):
    block, kube, health = broken_app
    state = run(block, health.url, deployment="shop", dry_run=True)
    assert state.name == "DryRun", state.message
    report = load_report(state.state_details.flow_run_id)
    assert f"image {BROKEN} -> {NEWER}, revision 3 -> 2" in report.plan[0]
    status = kube.rollout_status("shop")
    assert status.revision == 3 and status.images == [BROKEN] and not status.complete


def test_restored_image_running_but_service_unhealthy_is_reported_failed(broken_app):
    block, kube, health = broken_app
    health.dependencies_up = False  # the previous release runs, but the service behind it does not work
    state = run(block, health.url, deployment="shop", health_window_seconds=0.4, health_interval_seconds=0.2)
    assert state.name == "HealthCheckFailed", state.message
    status = kube.rollout_status("shop")
    assert status.complete and status.images == [NEWER] and kube.pods_running({"app": "shop"}, expected=2)
    # The endpoint was asked after the rollback, saw the restored rollout complete, and still said 503.
    assert (503, True, (NEWER,)) in health.answers
    report = load_report(state.state_details.flow_run_id)
    assert [c.name for c in report.failed_critical()] == ["health endpoints"]
    assert next(c for c in report.checks if c.name == "pods running").passed
    assert report.service_restored_at is None and report.rto_seconds is None


def test_a_retry_after_the_rollback_patch_landed_is_a_noop(kube, prefect_api, faulty_proxy):
    seed_deployment(kube, "shop", image=GOOD, images=[NEWER, BROKEN])
    proxy = faulty_proxy(lose_rollback_answers=1)
    name = f"k8s-{uuid.uuid4().hex[:8]}"
    kube.model_copy(update={"api_server": proxy.url}).save(name)
    health = AppHealth(kube, "shop")
    try:
        state = run(name, health.url, deployment="shop", to_revision=2, incident_id="inc-lost")
    finally:
        health.close()
    assert ("PATCH", 503) in proxy.seen  # the rollback landed, its answer was lost, the task retried
    assert state.name == "RolledBack", state.message
    status = kube.rollout_status("shop")
    assert status.images == [NEWER] and status.revision == 4
    assert [(r.revision, r.images[0]) for r in kube.rollout_history("shop")][-1] == (4, NEWER)
    annotations = kube.get_deployment("shop")["metadata"]["annotations"]
    assert annotations[INCIDENT_ANNOTATION] == "inc-lost"


def test_no_previous_revision_is_refused_before_any_change(kube, prefect_api):
    seed_deployment(kube, "solo", image=GOOD)
    name = f"k8s-{uuid.uuid4().hex[:8]}"
    kube.save(name)
    state = run(name, deployment="solo")
    assert state.is_failed() and "no previous revision" in state.message
    assert kube.rollout_status("solo").revision == 1
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Refused" and "Roll back (kubectl rollout undo)" not in [s.step for s in report.steps]


@pytest.mark.parametrize("params,message", [
    ({"deployment": "missing"}, "'missing' does not exist"),
    ({"deployment": "shop", "approval_policy": "auto"}, "allowed only for drills"),
    ({"deployment": "shop", "to_revision": 0}, "to_revision=0 (out of range); expected an integer from 1"),
    ({"deployment": "shop", "to_revision": 7}, "has no revision 7"),
    ({"deployment": "shop", "health_consecutive_required": 3, "health_window_seconds": 1,
      "health_interval_seconds": 1}, "(results - 1) x interval <= window"),
])
def test_bad_inputs_are_refused(broken_app, params, message):
    block, kube, _ = broken_app
    state = run(block, **params)
    assert state.is_failed() and message in state.message, state.message
    assert kube.rollout_status("shop").revision == 3


def test_an_unusable_health_block_is_refused_before_the_rollback(broken_app):
    block, kube, _ = broken_app
    empty = f"health-{uuid.uuid4().hex[:8]}"
    HealthEndpoints(endpoints={}).save(empty)
    state = run(block, deployment="shop", health_block=empty, health_urls=None)
    assert state.is_failed() and "the health endpoint set is empty" in state.message, state.message
    assert kube.rollout_status("shop").revision == 3 and kube.rollout_status("shop").images == [BROKEN]
    assert load_report(state.state_details.flow_run_id).outcome == "Refused"
