"""Kubernetes for tests: the sandbox emulator (kmock + controller) on loopback, a fresh namespace per test."""

from __future__ import annotations

import uuid

import pytest

from blocks.kubernetes import KubernetesTarget


@pytest.fixture(scope="session")
def kube_server():
    """The Kubernetes emulator with its controller, for the whole session (a ``sandbox.kube.KubeServer``)."""
    from sandbox.kube import serve_in_thread

    server = serve_in_thread()
    yield server
    server.stop()


@pytest.fixture
def kube(kube_server) -> KubernetesTarget:
    """A ``KubernetesTarget`` on the emulator, in a namespace no other test uses (``environment='sandbox'``).

    Seed what the test needs with :func:`seed_deployment` / ``kube.create_object(...)``;
    set ``kube.deployments`` to declare the deployments of the region.
    """
    return KubernetesTarget(
        api_server=kube_server.url,
        namespace=f"t-{uuid.uuid4().hex[:10]}",
        verify_tls=False,
        environment="sandbox",
        region="test",
        request_timeout_seconds=10,
        rollout_timeout_seconds=10,
        poll_interval_seconds=0.1,
    )


def deployment_manifest(name: str, image: str, replicas: int = 2, labels: dict[str, str] | None = None,
                        container: str = "app", progress_deadline_seconds: int | None = None) -> dict:
    """A Deployment manifest: pods labelled ``app=<name>`` (plus ``labels``) running one container."""
    pod_labels = {"app": name, **(labels or {})}
    spec: dict = {
        "replicas": replicas,
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": pod_labels},
                     "spec": {"containers": [{"name": container, "image": image}]}},
    }
    if progress_deadline_seconds is not None:
        spec["progressDeadlineSeconds"] = progress_deadline_seconds
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": pod_labels}, "spec": spec}


def seed_deployment(target: KubernetesTarget, name: str, image: str = "registry.local/app:1.0", replicas: int = 2,
                    labels: dict[str, str] | None = None, images: list[str] | None = None, wait: bool = True,
                    **kwargs) -> dict:
    """Create deployment ``name`` in ``target``'s namespace; with ``images``, roll out each in turn afterwards.

    Every healthy revision is waited for (``wait``), so the history has one ReplicaSet per image.
    Use an image containing ``:broken`` to make a rollout that never becomes ready.
    Returns the deployment as stored.
    """
    target.create_object(deployment_manifest(name, image, replicas, labels, **kwargs))
    if wait:
        target.wait_ready(name, timeout=10)
    for later in images or []:
        container = kwargs.get("container", "app")
        target.set_image(name, container, later)
        if wait and ":broken" not in later:
            target.wait_ready(name, timeout=10)
    return target.get_deployment(name)


def seed_job(target: KubernetesTarget, name: str, labels: dict[str, str] | None = None,
             image: str = "registry.local/trainer:1.0", parallelism: int = 1) -> dict:
    """Create Job ``name`` (it runs ``parallelism`` pods until suspended or deleted)."""
    job_labels = {"app": name, **(labels or {})}
    return target.create_object({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": job_labels},
        "spec": {"parallelism": parallelism, "backoffLimit": 0,
                 "template": {"metadata": {"labels": job_labels},
                              "spec": {"restartPolicy": "Never",
                                       "containers": [{"name": "main", "image": image}]}}},
    })


class FaultyProxy:
    """A loopback HTTP proxy in front of the API server that loses answers as a flaky network does.

    ``resend_creates``: every POST is forwarded twice and the second answer returned (a client
    library resending a create whose first answer was lost). ``lose_rollback_answers``: the first
    that many JSON patches (``kubectl rollout undo``) are applied, then answered 503.
    """

    def __init__(self, upstream: str, resend_creates: bool = False, lose_rollback_answers: int = 0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        from sandbox.paths import free_port

        outer = self
        self.upstream, self.resend_creates, self.lose = upstream.rstrip("/"), resend_creates, lose_rollback_answers
        self.seen: list[tuple[str, int]] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                return

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization", "accept")}
                with httpx.Client(timeout=10) as http:
                    def send():
                        return http.request(self.command, outer.upstream + self.path, content=body, headers=headers)
                    answer = send()
                    if self.command == "POST" and outer.resend_creates:
                        answer = send()
                lost = False
                if self.command == "PATCH" and "json-patch" in (self.headers.get("Content-Type") or ""):
                    with lock:
                        lost, outer.lose = outer.lose > 0, max(0, outer.lose - 1)
                status, payload = (503, b'{"kind":"Status","code":503,"message":"connection lost"}') if lost \
                    else (answer.status_code, answer.content)
                outer.seen.append((self.command, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward  # noqa: N815 - http.server's naming

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_proxy(kube_server):
    """Start :class:`FaultyProxy` instances in front of the emulator: ``faulty_proxy(resend_creates=True)``."""
    started = []

    def start(**kwargs) -> FaultyProxy:
        proxy = FaultyProxy(kube_server.url, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()
