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


def test_undo_by_replicaset_is_a_noop_once_done_and_writes_its_marker_in_the_same_patch(kube):
    seed_deployment(kube, "web", image="registry.local/web:1.0", images=["registry.local/web:2.0"])
    kube.set_image("web", "app", "registry.local/web:3.0:broken")
    plan = kube.plan_rollback("web")
    assert (plan.from_revision, plan.to_revision, plan.to_images) == (3, 2, ["registry.local/web:2.0"])
    done = kube.rollout_undo("web", replicaset=plan.replicaset, annotations={"example.org/incident": "inc-1"})
    dep = kube.get_deployment("web")
    assert not done.noop and dep["metadata"]["annotations"]["example.org/incident"] == "inc-1"
    kube.wait_ready("web", timeout=5)
    generation = kube.rollout_status("web").generation
    # Repeated (a task retry after the patch landed): the target was renumbered 2 -> 4, yet it is found by name.
    again = kube.rollout_undo("web", replicaset=plan.replicaset, annotations={"example.org/incident": "inc-1"})
    status = kube.rollout_status("web")
    assert again.noop and (again.from_revision, again.to_revision) == (4, 4)
    assert status.generation == generation and status.images == ["registry.local/web:2.0"] and status.revision == 4
    with pytest.raises(InvalidInput, match="has no revision 2"):
        kube.plan_rollback("web", to_revision=2)
    with pytest.raises(InvalidInput, match="owns no ReplicaSet 'web-nope'"):
        kube.plan_rollback("web", replicaset="web-nope")


def test_wait_ready_does_not_trust_a_progress_deadline_the_controller_has_not_reevaluated(kube, kube_server):
    seed_deployment(kube, "web", image="registry.local/web:1.0", images=["registry.local/web:2.0"],
                    progress_deadline_seconds=0)
    kube.set_image("web", "app", "registry.local/web:3.0:broken")
    with pytest.raises(RolloutNotReady, match="progress deadline"):
        kube.wait_ready("web", timeout=5)
    kube_server.call(kube_server.emulator.controller.delay_observation, kube.namespace, "web", 0.5)
    kube.rollout_undo("web")
    stale = kube.rollout_status("web")
    assert stale.observed_generation < stale.generation and not stale.failed and not stale.complete
    assert "waiting for the deployment spec update to be observed" in stale.message
    status = kube.wait_ready("web", timeout=5)
    assert status.complete and status.images == ["registry.local/web:2.0"]


def test_dump_drops_the_last_applied_copy_of_a_secret(kube):
    import base64
    import json

    manifest = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "applied", "labels": {"app": "web"}},
                "data": {"token": base64.b64encode(b"s3cr3t-applied-value").decode()}}
    last_applied = json.dumps({**manifest, "stringData": {"token": "s3cr3t-applied-value"}})
    kube.create_object({**manifest, "metadata": {**manifest["metadata"], "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": last_applied, "owner": "team-web"}}})
    kube.create_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": "{}"}}, "data": {"a": "b"}})
    dump = kube.dump_objects(["secrets", "configmaps"])
    secret = next(o for o in dump if o["kind"] == "Secret")
    assert "s3cr3t-applied-value" not in json.dumps(dump) and "czNjcjN0" not in json.dumps(dump)
    assert secret["data"] == {"token": "<redacted>"} and secret["metadata"]["annotations"] == {"owner": "team-web"}
    config = next(o for o in dump if o["kind"] == "ConfigMap")
    assert "kubectl.kubernetes.io/last-applied-configuration" in config["metadata"]["annotations"]


def test_a_resent_create_is_not_an_error(kube, faulty_proxy):
    from blocks.kubernetes import KubernetesError

    proxy = faulty_proxy(resend_creates=True)
    flaky = kube.model_copy(update={"api_server": proxy.url})
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "np"},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert flaky.create_object(policy)["metadata"]["name"] == "np"
    assert flaky.apply_deny_all("isolate", {"app": "web"})["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert flaky.set_secret_value("creds", "password", "pw-resent") is False
    assert kube.read_secret_value("creds", "password").get_secret_value() == "pw-resent"
    assert flaky.set_config("cfg", "MODE", "dr") in (None, "dr") and kube.read_config("cfg") == {"MODE": "dr"}
    assert ("POST", 409) in proxy.seen
    with pytest.raises(KubernetesError, match="'np' already exists .* differs") as info:
        flaky.create_object({**policy, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}})
    assert info.value.http_status == 409


def test_garbled_answers_and_refused_secret_writes_name_the_status(kube):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from blocks.kubernetes import KubernetesError, KubernetesTarget
    from sandbox.paths import free_port

    class Garbled(BaseHTTPRequestHandler):
        def log_message(self, *args):
            return

        def _answer(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._answer(200, b"<html>login page</html>", "text/html")

        def do_PATCH(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(403, b'{"kind":"Status","code":403,"message":"forbidden: echo cGF5bG9hZC1zZWNyZXQ="}',
                         "application/json")

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Garbled)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        target = KubernetesTarget(api_server=f"http://127.0.0.1:{server.server_address[1]}", namespace="prod")
        with pytest.raises(KubernetesError, match="HTTP 200 with a body that is not JSON") as garbled:
            target.get_replicas("web")
        with pytest.raises(KubernetesError, match="HTTP 403") as refused:
            target.set_secret_value("db", "password", "payload-secret")
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(garbled.value.__cause__, ValueError)
    assert refused.value.http_status == 403 and refused.value.__cause__ is None
    assert "payload-secret" not in str(refused.value) and "cGF5bG9hZC1zZWNyZXQ=" not in str(refused.value)
