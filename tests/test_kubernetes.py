"""KubernetesTarget verbs against the sandbox API server (kmock emulator + controller) on loopback."""

from __future__ import annotations

import time

import pytest
from fixtures_kube import seed_deployment, seed_job

from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesUnavailable, RolloutNotReady, labels_match


def test_scale_is_idempotent_and_reaches_ready(kube):
    seed_deployment(kube, "web", replicas=2)
    first = kube.scale("web", 4)
    again = kube.scale("web", 4)
    assert (first.previous, first.replicas, first.changed) == (2, 4, True)
    assert again.changed is False
    status = kube.wait_ready("web", timeout=5)
    assert (status.replicas, status.ready, status.available, status.updated) == (4, 4, 4, 4)
    assert kube.pods_running({"app": "web"}, expected=4)
    assert len(kube.deployment_pods("web")) == 4


def test_rollout_restart_stamps_template_and_makes_a_new_revision(kube):
    seed_deployment(kube, "api")
    before = kube.rollout_status("api").revision
    stamp = kube.rollout_restart("api")
    dep = kube.get_deployment("api")
    assert dep["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] == stamp
    status = kube.wait_ready("api", timeout=5)
    assert status.revision == before + 1


def test_undo_returns_to_previous_image_like_kubectl(kube):
    seed_deployment(kube, "web", image="registry.local/web:1.0", images=["registry.local/web:2.0"])
    kube.set_image("web", "app", "registry.local/web:3.0:broken")
    with pytest.raises(RolloutNotReady, match="was not ready within"):
        kube.wait_ready("web", timeout=0.5)
    history = kube.rollout_history("web")
    assert [r.revision for r in history] == [1, 2, 3]
    assert history[-1].current and history[-1].images == ["registry.local/web:3.0:broken"]

    plan = kube.rollout_undo("web")
    assert (plan.from_revision, plan.to_revision) == (3, 2)
    assert plan.to_images == ["registry.local/web:2.0"]
    status = kube.wait_ready("web", timeout=5)
    assert status.images == ["registry.local/web:2.0"] and status.complete
    # As in Kubernetes, the restored ReplicaSet becomes the newest revision.
    assert [(r.revision, r.images[0]) for r in kube.rollout_history("web")] == [
        (1, "registry.local/web:1.0"), (3, "registry.local/web:3.0:broken"), (4, "registry.local/web:2.0")]
    pods = kube.deployment_pods("web")
    assert len(pods) == 2 and all(p["phase"] == "Running" and p["images"] == ["registry.local/web:2.0"] for p in pods)


def test_undo_to_explicit_revision_and_refusals(kube):
    seed_deployment(kube, "web", image="registry.local/web:1.0", images=["registry.local/web:2.0"])
    plan = kube.rollout_undo("web", to_revision=1)
    assert plan.to_images == ["registry.local/web:1.0"]
    kube.wait_ready("web", timeout=5)
    with pytest.raises(InvalidInput, match="has no revision 9"):
        kube.plan_rollback("web", to_revision=9)
    seed_deployment(kube, "single")
    with pytest.raises(InvalidInput, match="no previous revision"):
        kube.rollout_undo("single")
    assert kube.rollout_status("single").revision == 1


def test_wait_ready_reports_progress_deadline_exceeded(kube):
    seed_deployment(kube, "web", progress_deadline_seconds=0)
    kube.set_image("web", "app", "registry.local/web:9:broken")
    started = time.monotonic()
    with pytest.raises(RolloutNotReady, match="progress deadline") as info:
        kube.wait_ready("web", timeout=5)
    assert time.monotonic() - started < 3
    assert info.value.status.failed and info.value.status.available == 2


def test_sandbox_can_mark_any_image_as_broken(kube):
    seed_deployment(kube, "web", image="registry.local/web:1.0")
    kube.annotate_deployment("web", {"sandbox.dr/broken-images": "registry.local/web:2.0"})
    kube.set_image("web", "app", "registry.local/web:2.0")
    with pytest.raises(RolloutNotReady, match="1 of 2 new replicas"):
        kube.wait_ready("web", timeout=0.3)
    pods = kube.deployment_pods("web")
    assert sorted((p["phase"], p["images"][0]) for p in pods) == [
        ("Pending", "registry.local/web:2.0"), ("Running", "registry.local/web:1.0"), ("Running", "registry.local/web:1.0")]


def test_unknown_deployment_refused(kube):
    with pytest.raises(InvalidInput, match="'ghost' does not exist"):
        kube.scale("ghost", 1)
    kube.deployments = {"web": 2}
    seed_deployment(kube, "other")
    with pytest.raises(InvalidInput, match="'other' is not one of this target's deployments"):
        kube.rollout_undo("other")
    with pytest.raises(InvalidInput, match="not a valid Kubernetes object name"):
        kube.get_replicas("Bad_Name")
    with pytest.raises(InvalidInput, match="must be a whole number"):
        kube.scale("web", -1)


def test_scale_to_declared(kube):
    kube.deployments = {"web": 3, "worker": 1}
    seed_deployment(kube, "web", replicas=0, wait=False)
    seed_deployment(kube, "worker", replicas=0, wait=False)
    results = kube.scale_to_declared()
    assert {(r.name, r.replicas, r.changed) for r in results} == {("web", 3, True), ("worker", 1, True)}
    assert kube.wait_ready("web", timeout=5).ready == 3


def test_jobs_suspend_and_delete_by_label(kube):
    seed_job(kube, "train-a", labels={"role": "training"})
    seed_job(kube, "train-b", labels={"role": "training"})
    seed_job(kube, "report", labels={"role": "batch"})
    jobs = kube.list_jobs("role=training")
    assert [j["name"] for j in jobs] == ["train-a", "train-b"]
    assert kube.list_pods("job-name=train-a")
    assert kube.suspend_job("train-a") is True
    assert kube.suspend_job("train-a") is False
    assert kube.list_jobs({"role": "training"})[0] == {
        "name": "train-a", "labels": {"app": "train-a", "role": "training"}, "suspended": True, "active": 0,
        "finished": False}
    assert kube.list_pods("job-name=train-a") == []
    assert kube.delete_job("train-b") is True and kube.delete_job("train-b") is False
    assert [j["name"] for j in kube.list_jobs()] == ["report", "train-a"]


def test_deny_all_policy_is_created_and_replaced(kube):
    assert kube.get_network_policy("isolate") is None
    kube.apply_deny_all("isolate", {"app": "web"})
    again = kube.apply_deny_all("isolate", {"app": "web"})
    assert again["spec"]["policyTypes"] == ["Ingress", "Egress"] and again["spec"]["ingress"] == []
    kube.apply_deny_all("isolate", {})
    assert kube.get_network_policy("isolate")["spec"]["podSelector"] == {"matchLabels": {}}


def test_secrets_config_and_dump_never_show_values(kube, caplog):
    assert kube.set_secret_value("db-creds", "password", "hunter2-secret") is True
    assert kube.set_secret_value("db-creds", "user", "app") is False
    assert kube.read_secret_keys("db-creds") == ["password", "user"]
    assert kube.read_secret_value("db-creds", "password").get_secret_value() == "hunter2-secret"
    assert kube.set_config("app-config", "DB_HOST", "primary") is None
    assert kube.set_config("app-config", "DB_HOST", "replica") == "primary"
    assert kube.read_config("app-config") == {"DB_HOST": "replica"}
    seed_deployment(kube, "web", wait=False)
    dump = kube.dump_objects(["secrets", "deployments", "pods", "configmaps"])
    assert "hunter2" not in str(dump) and "hunter2" not in caplog.text
    kinds = {o["kind"] for o in dump}
    assert {"Secret", "Deployment", "Pod", "ConfigMap"} <= kinds
    assert [o["metadata"]["name"] for o in kube.dump_objects(["deployments", "pods"], "app=nothing")] == []
    with pytest.raises(InvalidInput, match="cannot dump kinds"):
        kube.dump_objects(["widgets"])


def test_unreachable_api_server_is_transient(kube):
    from sandbox.paths import free_port

    dead = kube.model_copy(update={"api_server": f"http://127.0.0.1:{free_port()}", "connect_timeout_seconds": 1})
    with pytest.raises(KubernetesUnavailable) as info:
        dead.get_replicas("web")
    assert info.value.transient


@pytest.mark.parametrize("labels,selector,expected", [
    ({"app": "web", "tier": "fe"}, "app=web", True),
    ({"app": "web"}, "app=web,tier=fe", False),
    ({"app": "web"}, "app!=api", True),
    ({"app": "web"}, "app in (web,api)", True),
    ({"app": "db"}, "app notin (web,api)", True),
    ({"app": "web"}, "!tier", True),
    ({"app": "web"}, "tier", False),
    ({}, "", True),
])
def test_label_selector_matching(labels, selector, expected):
    assert labels_match(labels, selector) is expected


def test_bearer_token_is_sent_and_never_shown(kube):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    from blocks.kubernetes import KubernetesError, KubernetesTarget
    from sandbox.paths import free_port

    seen = []

    class Refuse(BaseHTTPRequestHandler):
        def log_message(self, *args):
            return

        def do_GET(self):  # noqa: N802 - http.server's naming
            seen.append(self.headers.get("Authorization"))
            body = b'{"kind":"Status","code":401,"message":"Unauthorized"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Refuse)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        target = KubernetesTarget(api_server=f"http://127.0.0.1:{server.server_address[1]}", token="tok-very-secret",
                                  namespace="prod")
        with pytest.raises(KubernetesError, match="HTTP 401") as info:
            target.get_replicas("web")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer tok-very-secret"]
    assert not info.value.transient
    assert "tok-very-secret" not in str(info.value) and "tok-very-secret" not in repr(target)
