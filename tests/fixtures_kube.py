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
