"""Application drills on the sandbox's Kubernetes API, and the Kubernetes and health blocks they use.

Blocks saved by :func:`save_blocks` (fixed names, overwritten on every ``dr up``):

* ``KubernetesTarget`` ``sandbox-primary`` (namespace ``dr-primary``) and ``sandbox-dr``
  (namespace ``dr-secondary``): the two regions, each declaring ``api`` and ``web`` at 2 replicas;
* ``KubernetesTarget`` ``sandbox-apps`` (namespace ``dr-apps``): the application-rollback drill's
  ``storefront`` deployment;
* ``HealthEndpoints`` ``sandbox-primary-health``, ``sandbox-dr-health`` (``api`` and ``web`` of each
  region) and ``sandbox-storefront-health``, on the sandbox health server.

The sandbox health server answers what it is told; in the application-rollback drills a watcher
stands in for the storefront's own ``/health``: it reports healthy while the deployment is fully
rolled out on an image that works and the service behind it works (``service_works``). The drill
``app_rollback_unhealthy_service`` restores the previous image while the service stays broken
(its database, say): the flow must not call that a recovery.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import httpx

from blocks.health import HealthEndpoints
from blocks.kubernetes import KubernetesError, KubernetesTarget, RolloutNotReady
from sandbox import addresses
from sandbox.drillkit import DrillResult, save_report
from sandbox.drillkit import check as _check

PRIMARY_BLOCK, DR_BLOCK, APPS_BLOCK = "sandbox-primary", "sandbox-dr", "sandbox-apps"
PRIMARY_HEALTH, DR_HEALTH, STOREFRONT_HEALTH = "sandbox-primary-health", "sandbox-dr-health", "sandbox-storefront-health"
REGION_DEPLOYMENTS = {"api": 2, "web": 2}
STOREFRONT = "storefront"
GOOD_IMAGE = "registry.sandbox.local/storefront:1.4.2"
BROKEN_IMAGE = "registry.sandbox.local/storefront:1.5.0:broken"


def save_blocks(ep) -> None:
    """Save the sandbox's Kubernetes targets and health endpoint sets (overwriting earlier ones)."""
    common = dict(api_server=ep.kube_url, verify_tls=False, environment="sandbox", rollout_timeout_seconds=120,
                  poll_interval_seconds=0.5)
    KubernetesTarget(namespace="dr-primary", region="primary", deployments=dict(REGION_DEPLOYMENTS),
                     **common).save(PRIMARY_BLOCK, overwrite=True)
    KubernetesTarget(namespace="dr-secondary", region="dr", deployments=dict(REGION_DEPLOYMENTS),
                     **common).save(DR_BLOCK, overwrite=True)
    KubernetesTarget(namespace="dr-apps", region="primary", deployments={STOREFRONT: 2},
                     **common).save(APPS_BLOCK, overwrite=True)
    for name, region in ((PRIMARY_HEALTH, "primary"), (DR_HEALTH, "dr")):
        HealthEndpoints(endpoints={svc: f"{ep.health_url}/{region}/{svc}/health" for svc in REGION_DEPLOYMENTS},
                        timeout_seconds=2, region=region).save(name, overwrite=True)
    HealthEndpoints(endpoints={STOREFRONT: f"{ep.health_url}/apps/{STOREFRONT}/health"}, timeout_seconds=2,
                    region="apps").save(STOREFRONT_HEALTH, overwrite=True)


def storefront_manifest(image: str, replicas: int = 2) -> dict:
    labels = {"app": STOREFRONT, "tier": "frontend"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": STOREFRONT, "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": STOREFRONT}},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": image,
                                                           "ports": [{"containerPort": 8080}]}]}}}}


def _set_health(health_url: str, healthy: bool) -> None:
    httpx.post(f"{health_url}/apps/{STOREFRONT}/state", json={"healthy": healthy}, timeout=5).raise_for_status()


class HealthFollowsRollout:
    """Keeps the storefront's health endpoint in step with its deployment until stopped."""

    def __init__(self, target: KubernetesTarget, health_url: str, interval: float = 0.2, service_works: bool = True):
        self.target, self.health_url, self.interval, self.service_works = target, health_url, interval, service_works
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storefront-health", daemon=True)
        self.last: bool | None = None
        self.errors: list[str] = []

    def healthy_now(self) -> bool:
        status = self.target.rollout_status(STOREFRONT)
        return self.service_works and status.complete and not any(":broken" in image for image in status.images)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                healthy = self.healthy_now()
                if healthy != self.last:
                    _set_health(self.health_url, healthy)
                    self.last = healthy
            except (httpx.HTTPError, KubernetesError) as exc:  # the API or the health server restarting
                self.last = None
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            self._stop.wait(self.interval)

    def __enter__(self) -> HealthFollowsRollout:
        _set_health(self.health_url, self.healthy_now())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _seed_good_storefront(target: KubernetesTarget) -> None:
    """A storefront running the good image, whatever an earlier drill left behind."""
    if target.deployment_exists(STOREFRONT):
        target.scale(STOREFRONT, 2)
        target.set_image(STOREFRONT, "app", GOOD_IMAGE)
    else:
        target.create_object(storefront_manifest(GOOD_IMAGE))
    target.wait_ready(STOREFRONT, timeout=30)


def app_rollback(rows: int = 0) -> DrillResult:
    """Roll a broken storefront release out on the sandbox, then let the rollback flow restore the service."""
    return _rollback_drill(service_works=True)


def app_rollback_unhealthy_service(rows: int = 0) -> DrillResult:
    """A broken release whose rollback restores the previous image but not the service: the flow must
    end ``HealthCheckFailed`` (pods up on the previous image, health endpoint failing), not RolledBack."""
    return _rollback_drill(service_works=False)


def _rollback_drill(service_works: bool) -> DrillResult:
    from flows.app_rollback import app_rollback as rollback_flow
    from sandbox.services import endpoints
    from runbook.evidence import load_report

    ep = endpoints()
    info = addresses.info()
    target = KubernetesTarget.load(APPS_BLOCK)
    health = HealthEndpoints.load(STOREFRONT_HEALTH)
    _seed_good_storefront(target)
    checks = []
    with HealthFollowsRollout(target, ep.health_url, service_works=service_works) as follower:
        # The fault: a release whose pods never become ready.
        target.set_image(STOREFRONT, "app", BROKEN_IMAGE)
        try:
            target.wait_ready(STOREFRONT, timeout=3)
            stuck = "the broken release became ready"
        except RolloutNotReady as exc:
            stuck = str(exc)
        detected = datetime.now(timezone.utc)
        time.sleep(2 * follower.interval)
        down = health.probe_once()[STOREFRONT]
        checks.append(_check("fault injected: rollout stuck and service unhealthy",
                             "not ready" in stuck and not down.ok, f"{stuck}; health {down.status}"))

        state = rollback_flow(
            kubernetes_block=APPS_BLOCK, deployment=STOREFRONT, incident_detected_at=detected,
            health_block=STOREFRONT_HEALTH, health_window_seconds=30 if service_works else 6,
            health_interval_seconds=1, rollout_timeout_seconds=60, approval_policy="auto", drill=True,
            return_state=True,
        )
        flow_run_id = str(state.state_details.flow_run_id)
        report = load_report(flow_run_id)
        report_path = save_report(info.root, flow_run_id)
        status = target.rollout_status(STOREFRONT)
        pods = target.deployment_pods(STOREFRONT)
        time.sleep(2 * follower.interval)
        after = health.probe_once()[STOREFRONT]

    checks += [
        _check("flow outcome", report.outcome == ("RolledBack" if service_works else "HealthCheckFailed"),
               f"{state.name}: {report.summary}"),
        _check("previous image restored", status.complete and status.images == [GOOD_IMAGE],
               f"revision {status.revision}, images {status.images}: {status.message}"),
        _check("pods running the previous image",
               len(pods) == 2 and all(p["phase"] == "Running" and p["ready"] and p["images"] == [GOOD_IMAGE] for p in pods),
               ", ".join(f"{p['name']} {p['phase']} {p['images']}" for p in pods)),
    ]
    if service_works:
        checks += [
            _check("health endpoint 200", after.ok, f"{after.status} in {after.latency_ms} ms"),
            _check("RTO within objective", bool(report.rto_met),
                   f"{report.rto_seconds} s of {report.rto_objective_seconds} s"),
        ]
    else:
        checks += [
            _check("health endpoint still failing, and reported", not after.ok and any(
                c.name == "health endpoints" and not c.passed for c in report.checks), f"{after.status}"),
            _check("no recovery claimed", report.service_restored_at is None and report.rto_seconds is None,
                   f"service restored at {report.service_restored_at}"),
        ]
    return DrillResult(
        scenario="app-rollback" if service_works else "app-rollback-unhealthy-service",
        passed=all(c["passed"] for c in checks),
        rto_seconds=report.rto_seconds,
        rto_objective_seconds=report.rto_objective_seconds,
        rpo_seconds=report.rpo_seconds,
        rpo_objective_seconds=report.rpo_objective_seconds,
        flow_run_id=flow_run_id,
        outcome=report.outcome,
        report=str(report_path),
        ui_url=f"{info.ui_url}/runs/flow-run/{flow_run_id}",
        checks=checks,
        extra={"from_image": BROKEN_IMAGE, "to_image": GOOD_IMAGE, "revision": status.revision,
               "health_watcher_errors": len(follower.errors), "health_watcher_last_error": follower.errors[-1:]},
    )
