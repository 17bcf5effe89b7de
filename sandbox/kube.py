"""A Kubernetes API for the sandbox and the tests: kmock's emulator plus a small controller.

``python -m sandbox.kube --port PORT`` serves the API on ``127.0.0.1:PORT``; the official
``kubernetes`` client talks to it like to any API server (``Configuration(host=url)``).
``serve_in_thread()`` runs the same in a background thread for tests.

kmock's ``KubernetesEmulator`` is an in-memory object store behind the Kubernetes REST paths.
It runs no controllers, so :class:`Controller` below stands in for the kube-controller-manager:

* a Deployment gets ``metadata.generation`` (bumped on every spec change), a ReplicaSet per
  distinct pod template (``pod-template-hash`` label, ``deployment.kubernetes.io/revision``
  annotation, ``ownerReferences``), and ``spec.replicas`` pods per active ReplicaSet carrying the
  template's labels;
* a rollout whose pod template uses an image containing ``:broken``, or an image listed in the
  Deployment annotation ``sandbox.dr/broken-images`` (comma separated), never becomes ready: the
  new ReplicaSet stops at ``maxSurge`` pods (default 25%, at least 1) that stay ``Pending``
  (``ImagePullBackOff``), the previous ReplicaSet keeps serving at full count, and after
  ``spec.progressDeadlineSeconds`` the ``Progressing`` condition turns ``ProgressDeadlineExceeded``;
* a healthy rollout completes at once: the new ReplicaSet runs ``spec.replicas`` ready pods, older
  ReplicaSets are scaled to zero, and the status reports ``observedGeneration`` and
  ``replicas == updatedReplicas == readyReplicas == availableReplicas == spec.replicas``;
* a Job runs ``spec.parallelism`` (default 1) pods until it is suspended or deleted; its status
  reports ``active`` and a ``Suspended`` condition;
* objects whose owner is gone are garbage collected;
* :meth:`Controller.delay_observation` makes the controller see a Deployment's spec changes late:
  for that many seconds after each change ``metadata.generation`` is ahead of
  ``status.observedGeneration`` and the status (conditions included) still describes the rollout
  before the change, as on a busy cluster.

The emulator also answers list requests with ``labelSelector`` / ``fieldSelector=metadata.name=``
filtered, as a real API server does.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import attrs
from kmock import KubernetesEmulator, Server, resource
from kmock._internal import rendering

from blocks.kubernetes import labels_match

DEPLOYMENTS = resource("apps", "v1", "deployments")
REPLICASETS = resource("apps", "v1", "replicasets")
PODS = resource("", "v1", "pods")
JOBS = resource("batch", "v1", "jobs")

REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
BROKEN_IMAGES = "sandbox.dr/broken-images"
BROKEN_TAG = ":broken"

# The resource kinds served (and listable while still empty): (group/version/plural, kind, namespaced).
KINDS: list[tuple[str, str, bool]] = [
    ("v1/pods", "Pod", True),
    ("v1/services", "Service", True),
    ("v1/secrets", "Secret", True),
    ("v1/configmaps", "ConfigMap", True),
    ("v1/serviceaccounts", "ServiceAccount", True),
    ("v1/events", "Event", True),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", True),
    ("apps/v1/deployments", "Deployment", True),
    ("apps/v1/replicasets", "ReplicaSet", True),
    ("apps/v1/statefulsets", "StatefulSet", True),
    ("apps/v1/daemonsets", "DaemonSet", True),
    ("batch/v1/jobs", "Job", True),
    ("batch/v1/cronjobs", "CronJob", True),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True),
    ("networking.k8s.io/v1/ingresses", "Ingress", True),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True),
]
VERBS = ["get", "list", "watch", "create", "patch", "delete"]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------- the controller


def template_hash(template: dict) -> str:
    """A stable short hash of a pod template, ignoring the pod-template-hash label itself."""
    clean = copy.deepcopy(template or {})
    labels = (clean.get("metadata") or {}).get("labels") or {}
    labels.pop(HASH_LABEL, None)
    digest = hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return digest[:10]


def template_images(template: dict) -> list[str]:
    spec = (template or {}).get("spec") or {}
    return [c.get("image", "") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])]


@dataclass
class Controller:
    """The stand-in for the kube-controller-manager: Deployments, ReplicaSets, Jobs, pods, garbage.

    Every pass is synchronous (no ``await``), so within the emulator's event loop it is atomic with
    respect to API requests. It runs after every write to a Deployment, ReplicaSet, Job or pod and
    every ``interval`` seconds.
    """

    emulator: KubernetesEmulator
    interval: float = 1.0
    _seen_specs: dict[tuple, str] = field(default_factory=dict)
    _rollout_started: dict[tuple, float] = field(default_factory=dict)
    _index: dict[tuple, list[tuple]] = field(default_factory=dict)
    _observation_delays: dict[tuple[str, str], float] = field(default_factory=dict)
    _changed_at: dict[tuple, float] = field(default_factory=dict)

    def delay_observation(self, namespace: str, name: str, seconds: float) -> None:
        """Observe every later spec change of Deployment ``namespace/name`` only ``seconds`` after it (0: at once)."""
        if seconds > 0:
            self._observation_delays[namespace, name] = float(seconds)
        else:
            self._observation_delays.pop((namespace, name), None)

    # -------------------------------------------------------------- store access

    def _build_index(self) -> None:
        """Object keys by (group, version, plural, namespace), rebuilt at the start of every pass."""
        self._index = {}
        for key in list(self.emulator.objects.keys()):
            res, ns, _ = key
            self._index.setdefault((res.group, res.version, res.plural, ns), []).append(key)

    def _live(self, kind: resource, namespace: str | None = None) -> list[tuple[tuple, dict]]:
        want = (kind.group, kind.version, kind.plural)
        if namespace is not None:
            buckets = [self._index.get((*want, namespace), [])]
        else:
            buckets = [keys for index_key, keys in self._index.items() if index_key[:3] == want]
        rows = []
        for keys in buckets:
            for key in keys:
                if key in self.emulator.objects and not self.emulator.objects[key].deleted:
                    rows.append((key, self.emulator.objects[key].raw))
        return rows

    def _patch(self, key: tuple, changes: dict) -> None:
        self.emulator.objects[key].patch(changes)

    def _create(self, kind: resource, namespace: str, body: dict) -> None:
        key = (kind, namespace, body["metadata"]["name"])
        if key in self.emulator.objects:
            del self.emulator.objects[key]
        self.emulator.objects[key] = body
        bucket = self._index.setdefault((kind.group, kind.version, kind.plural, namespace), [])
        if key not in bucket:
            bucket.append(key)

    def _remove(self, key: tuple) -> None:
        if key in self.emulator.objects:
            del self.emulator.objects[key]

    @staticmethod
    def _owned_by(obj: dict, uid: str) -> bool:
        return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])

    def _ensure_identity(self, key: tuple, obj: dict) -> dict:
        meta = obj.get("metadata") or {}
        changes = {}
        if not meta.get("uid"):
            changes["uid"] = str(uuid.uuid4())
        if not meta.get("creationTimestamp"):
            changes["creationTimestamp"] = _now()
        if meta.get("namespace") != key[1] and key[1]:
            changes["namespace"] = key[1]
        if changes:
            self._patch(key, {"metadata": changes})
            obj = self.emulator.objects[key].raw
        return obj

    # -------------------------------------------------------------- passes

    def reconcile(self, namespace: str | None = None) -> None:
        """One pass over every object the controllers manage (in ``namespace``, or everywhere)."""
        self._build_index()
        for key, dep in self._live(DEPLOYMENTS, namespace):
            self.reconcile_deployment(key, dep)
        for key, job in self._live(JOBS, namespace):
            self.reconcile_job(key, job)
        self.collect_garbage(namespace)

    def reconcile_deployment(self, key: tuple, dep: dict) -> None:
        dep = self._ensure_identity(key, dep)
        namespace, name = key[1], key[2]
        meta, spec = dep["metadata"], dep.get("spec") or {}
        uid = meta["uid"]
        spec_digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        generation = int(meta.get("generation") or 0)
        if self._seen_specs.get(key) != spec_digest or generation == 0:
            generation += 1
            self._seen_specs[key] = spec_digest
            self._changed_at[key] = time.monotonic()
            self._patch(key, {"metadata": {"generation": generation}})
        delay = self._observation_delays.get((namespace, name), 0.0)
        if delay and time.monotonic() - self._changed_at.get(key, 0.0) < delay:
            return  # not observed yet: the API server bumped the generation, the controller has not acted
        desired = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        want_hash = template_hash(template)
        owned = [(k, rs) for k, rs in self._live(REPLICASETS, namespace) if self._owned_by(rs, uid)]
        revisions = [int(((rs["metadata"].get("annotations") or {}).get(REVISION)) or 0) for _, rs in owned]
        top = max(revisions, default=0)
        current = next(((k, rs) for k, rs in owned
                        if template_hash((rs.get("spec") or {}).get("template") or {}) == want_hash), None)
        if spec.get("paused"):
            self._set_deployment_status(key, dep, generation, owned, current, desired)
            return
        if current is None:
            rs_name = f"{name}-{want_hash}"
            labels = dict((template.get("metadata") or {}).get("labels") or {})
            labels[HASH_LABEL] = want_hash
            rs_template = copy.deepcopy(template)
            rs_template.setdefault("metadata", {})["labels"] = labels
            selector = copy.deepcopy(spec.get("selector") or {"matchLabels": {}})
            selector.setdefault("matchLabels", {})[HASH_LABEL] = want_hash
            annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                           if not k.startswith("deployment.kubernetes.io/")
                           and k != "kubectl.kubernetes.io/last-applied-configuration"}
            annotations[REVISION] = str(top + 1)
            self._create(REPLICASETS, namespace, {
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": rs_name, "namespace": namespace, "labels": labels, "annotations": annotations,
                             "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                                  "uid": uid, "controller": True, "blockOwnerDeletion": True}]},
                "spec": {"replicas": 0, "selector": selector, "template": rs_template},
                "status": {"replicas": 0},
            })
            current = ((REPLICASETS, namespace, rs_name), self.emulator.objects[REPLICASETS, namespace, rs_name].raw)
            owned.append(current)
            self._rollout_started[key] = time.monotonic()
        else:
            rev = int(((current[1]["metadata"].get("annotations") or {}).get(REVISION)) or 0)
            if rev < top:  # a rollback: the old template becomes the newest revision, as in Kubernetes
                self._patch(current[0], {"metadata": {"annotations": {REVISION: str(top + 1)}}})
                current = (current[0], self.emulator.objects[current[0]].raw)
                self._rollout_started[key] = time.monotonic()
        if (current[1]["metadata"].get("annotations") or {}).get(REVISION) != (meta.get("annotations") or {}).get(REVISION):
            self._patch(key, {"metadata": {"annotations": {REVISION: current[1]["metadata"]["annotations"][REVISION]}}})

        broken = self.is_broken(dep, template)
        olds = [(k, rs) for k, rs in owned if k != current[0]]
        serving_before = any(int((rs.get("spec") or {}).get("replicas") or 0) > 0 for _, rs in olds)
        # A failing rollout stops at the surge: the new ReplicaSet gets maxSurge pods, the old one keeps serving.
        self._scale_rs(current[0], min(desired, self.max_surge(spec, desired)) if broken and serving_before else desired)
        if broken:
            # The newest older ReplicaSet that still serves keeps serving the full count.
            serving = sorted((rs for rs in olds if int((rs[1].get("spec") or {}).get("replicas") or 0) > 0),
                             key=lambda r: int((r[1]["metadata"].get("annotations") or {}).get(REVISION) or 0))
            for i, (k, _) in enumerate(serving):
                self._scale_rs(k, desired if i == len(serving) - 1 else 0)
        else:
            for k, _ in olds:
                self._scale_rs(k, 0)
        for k, rs in [(k, self.emulator.objects[k].raw) for k, _ in owned]:
            self._sync_pods(k, rs, ready=not (k == current[0] and broken))
        owned = [(k, self.emulator.objects[k].raw) for k, _ in owned]
        current = (current[0], self.emulator.objects[current[0]].raw)
        self._set_deployment_status(key, self.emulator.objects[key].raw, generation, owned, current, desired, broken)

    @staticmethod
    def max_surge(spec: dict, desired: int) -> int:
        """The rolling update's maxSurge as a pod count (default 25%, rounded up, at least 1)."""
        surge = (((spec.get("strategy") or {}).get("rollingUpdate")) or {}).get("maxSurge", "25%")
        if isinstance(surge, str) and surge.endswith("%"):
            return max(1, -(-desired * int(surge[:-1]) // 100))
        return max(1, int(surge))

    def is_broken(self, dep: dict, template: dict) -> bool:
        """Whether the sandbox treats this pod template as a failing rollout."""
        listed = {i.strip() for i in ((dep["metadata"].get("annotations") or {}).get(BROKEN_IMAGES) or "").split(",")
                  if i.strip()}
        return any(BROKEN_TAG in image or image in listed for image in template_images(template))

    def _scale_rs(self, key: tuple, replicas: int) -> None:
        rs = self.emulator.objects[key].raw
        if int((rs.get("spec") or {}).get("replicas") or 0) != replicas:
            self._patch(key, {"spec": {"replicas": replicas},
                              "metadata": {"annotations": {"deployment.kubernetes.io/desired-replicas": str(replicas)}}})

    def _pod_body(self, owner_kind: str, owner: dict, template: dict, ready: bool, extra_labels: dict) -> dict:
        meta = owner["metadata"]
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update(extra_labels)
        containers = ((template.get("spec") or {}).get("containers")) or [{"name": "main", "image": ""}]
        if ready:
            status = {"phase": "Running", "startTime": _now(),
                      "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
                      "containerStatuses": [{"name": c.get("name", "main"), "image": c.get("image", ""), "ready": True,
                                             "imageID": "sha256:" + hashlib.sha256(c.get("image", "").encode()).hexdigest(),
                                             "restartCount": 0, "started": True,
                                             "state": {"running": {"startedAt": _now()}}} for c in containers]}
        else:
            status = {"phase": "Pending", "startTime": _now(),
                      "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
                      "containerStatuses": [{"name": c.get("name", "main"), "image": c.get("image", ""), "ready": False, "imageID": "",
                                             "restartCount": 0, "started": False,
                                             "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                   "message": f"Back-off pulling image {c.get('image', '')!r}"}}}
                                            for c in containers]}
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{meta['name']}-{secrets.token_hex(3)[:5]}", "namespace": meta.get("namespace"),
                         "labels": labels, "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                         "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                         "ownerReferences": [{"apiVersion": owner.get("apiVersion", "apps/v1"), "kind": owner_kind,
                                              "name": meta["name"], "uid": meta["uid"], "controller": True}]},
            "spec": copy.deepcopy(template.get("spec") or {"containers": containers}),
            "status": status,
        }

    def _sync_pods(self, key: tuple, owner: dict, ready: bool, owner_kind: str = "ReplicaSet",
                   count: int | None = None, extra_labels: dict | None = None) -> list[dict]:
        namespace, uid = key[1], owner["metadata"]["uid"]
        want = int((owner.get("spec") or {}).get("replicas") or 0) if count is None else count
        pods = [(k, p) for k, p in self._live(PODS, namespace) if self._owned_by(p, uid)]
        phase = "Running" if ready else "Pending"
        for k, p in pods:
            if (p.get("status") or {}).get("phase") != phase:
                self._remove(k)
        pods = [(k, p) for k, p in pods if (p.get("status") or {}).get("phase") == phase]
        for k, _ in pods[want:]:
            self._remove(k)
        template = (owner.get("spec") or {}).get("template") or {}
        for _ in range(max(0, want - len(pods))):
            self._create(PODS, namespace, self._pod_body(owner_kind, owner, template, ready, extra_labels or {}))
        rs_ready = min(want, len(pods) + max(0, want - len(pods))) if ready else 0
        status = {"replicas": want, "readyReplicas": rs_ready, "availableReplicas": rs_ready,
                  "fullyLabeledReplicas": want, "observedGeneration": 1}
        if owner_kind == "ReplicaSet" and (owner.get("status") or {}) != {**(owner.get("status") or {}), **status}:
            self._patch(key, {"status": status})
        return [p for _, p in pods]

    def _set_deployment_status(self, key: tuple, dep: dict, generation: int, owned: list, current, desired: int,
                               broken: bool = False) -> None:
        def count(rs: dict, field_name: str) -> int:
            return int((rs.get("status") or {}).get(field_name) or 0)

        total = sum(count(rs, "replicas") for _, rs in owned)
        updated = count(current[1], "replicas") if current else 0
        ready = sum(count(rs, "readyReplicas") for _, rs in owned)
        available = sum(count(rs, "availableReplicas") for _, rs in owned)
        spec = dep.get("spec") or {}
        deadline = int(spec.get("progressDeadlineSeconds", 600))
        started = self._rollout_started.get(key, time.monotonic())
        complete = not broken and updated == desired and total == desired and available == desired
        if complete:
            progressing = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                           "message": f'ReplicaSet "{current[1]["metadata"]["name"]}" has successfully progressed.'}
        elif broken and time.monotonic() - started > deadline:
            progressing = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                           "message": f'ReplicaSet "{current[1]["metadata"]["name"]}" has timed out progressing.'}
        else:
            progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                           "message": f'ReplicaSet "{current[1]["metadata"]["name"]}" is progressing.' if current else ""}
        available_cond = {"type": "Available", "status": "True" if available >= desired else "False",
                          "reason": "MinimumReplicasAvailable" if available >= desired else "MinimumReplicasUnavailable"}
        status = {"observedGeneration": generation, "replicas": total, "updatedReplicas": updated,
                  "readyReplicas": ready, "availableReplicas": available,
                  "unavailableReplicas": max(0, total - available),
                  "conditions": [available_cond, progressing]}
        old = dep.get("status") or {}
        comparable = {k: v for k, v in old.items() if k in status}
        if comparable != status:
            self._patch(key, {"status": status})

    def reconcile_job(self, key: tuple, job: dict) -> None:
        job = self._ensure_identity(key, job)
        spec = job.get("spec") or {}
        suspended = bool(spec.get("suspend"))
        parallelism = 0 if suspended else int(spec.get("parallelism", 1))
        uid = job["metadata"]["uid"]
        self._sync_pods(key, job, ready=True, owner_kind="Job", count=parallelism,
                        extra_labels={"job-name": key[2], "controller-uid": uid,
                                      "batch.kubernetes.io/job-name": key[2]})
        status: dict[str, Any] = {"active": parallelism, "startTime": (job.get("status") or {}).get("startTime") or _now()}
        status["conditions"] = ([{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                                  "message": "Job suspended"}] if suspended else [])
        old = job.get("status") or {}
        if {k: old.get(k) for k in ("active", "conditions")} != {k: status[k] for k in ("active", "conditions")}:
            self._patch(key, {"status": status})

    def collect_garbage(self, namespace: str | None = None) -> None:
        """Delete ReplicaSets and pods whose owner no longer exists."""
        for kind in (REPLICASETS, PODS):
            live_uids = {obj["metadata"].get("uid") for kk in (DEPLOYMENTS, REPLICASETS, JOBS)
                         for _, obj in self._live(kk, namespace)}
            for key, obj in self._live(kind, namespace):
                refs = (obj.get("metadata") or {}).get("ownerReferences") or []
                if refs and not any(ref.get("uid") in live_uids for ref in refs):
                    self._remove(key)

    async def run(self) -> None:
        """Reconcile every ``interval`` seconds until cancelled; trims the emulator's request log."""
        while True:
            try:
                self.reconcile()
            except Exception:  # one bad object must not stop the controller: report it and go on
                traceback.print_exc(file=sys.stderr)
            del self.emulator._requests[:]
            if self.emulator._errors:
                del self.emulator._errors[-1][:]
            await asyncio.sleep(self.interval)


# ---------------------------------------------------------------------- the API server


@attrs.define(kw_only=True)
class SandboxKubernetes(KubernetesEmulator):
    """kmock's emulator with the controller run after writes and list selectors honoured."""

    controller: Controller | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for path, kind, namespaced in KINDS:
            self.resources[path] = {"kind": kind, "namespaced": namespaced, "singular": kind.lower(),
                                    "verbs": VERBS, "shortnames": [], "categories": [],
                                    "subresources": ["status", "scale"] if path.startswith("apps/") else ["status"]}
        self.controller = Controller(self)

    def _after_write(self, request: rendering.Request) -> None:
        if request.resource in (DEPLOYMENTS, REPLICASETS, JOBS, PODS):
            namespace = request.namespace or ((request.data or {}).get("metadata") or {}).get("namespace") \
                if isinstance(request.data, dict) else request.namespace
            try:
                self.controller.reconcile(namespace)
            except Exception:  # the write itself succeeded; the periodic pass tries again
                traceback.print_exc(file=sys.stderr)

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        self._after_write(request)
        return await super()._serve_create(request)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        self._after_write(request)
        return await super()._serve_update(request)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_delete(request)
        self._after_write(request)
        return payload

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_list(request)
        labels = request.params.get("labelSelector")
        fields = request.params.get("fieldSelector") or ""
        names = {term.split("=", 1)[1] for term in fields.split(",") if term.startswith("metadata.name=")}
        if labels or names:
            payload["items"] = [
                item for item in payload["items"]
                if labels_match((item.get("metadata") or {}).get("labels"), labels)
                and (not names or (item.get("metadata") or {}).get("name") in names)
            ]
        kind = next((k for p, k, _ in KINDS if resource(p) == request.resource), None)
        if kind:
            payload["kind"] = f"{kind}List"
            payload["apiVersion"] = "v1" if request.resource.group == "" else \
                f"{request.resource.group}/{request.resource.version}"
        return payload


async def serve(port: int, ready: threading.Event | None = None, stop: asyncio.Event | None = None,
                holder: dict | None = None) -> None:
    """Serve the API on 127.0.0.1:``port`` with the controller running, until ``stop`` is set."""
    stop = stop or asyncio.Event()
    async with SandboxKubernetes() as emulator, Server(emulator, host="127.0.0.1", port=port) as server:
        controller = asyncio.create_task(emulator.controller.run())
        if holder is not None:
            holder.update(emulator=emulator, url=f"http://127.0.0.1:{server.port}", loop=asyncio.get_running_loop(),
                          stop=stop)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            controller.cancel()


@dataclass
class KubeServer:
    """A running emulator in a background thread."""

    url: str
    emulator: SandboxKubernetes
    thread: threading.Thread
    _loop: asyncio.AbstractEventLoop
    _stop: asyncio.Event

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's event loop (to inspect or change the store safely)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except Exception as exc:  # handed back to the caller's thread
                box["error"] = exc
            done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise TimeoutError("the Kubernetes emulator did not answer within 10 s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)


def serve_in_thread(port: int = 0) -> KubeServer:
    """Start the emulator and its controller on 127.0.0.1:``port`` (0: any free port) in a daemon thread."""
    ready, holder = threading.Event(), {}

    def main() -> None:
        asyncio.run(serve(port, ready, holder=holder))

    thread = threading.Thread(target=main, name="kube-emulator", daemon=True)
    thread.start()
    if not ready.wait(20):
        raise RuntimeError("the Kubernetes emulator did not start within 20 s")
    return KubeServer(holder["url"], holder["emulator"], thread, holder["loop"], holder["stop"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.kube", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready = threading.Event()
        task = asyncio.create_task(serve(args.port, ready, stop))
        while not ready.is_set() and not task.done():
            await asyncio.sleep(0.05)
        if task.done():
            task.result()
        print(f"Kubernetes emulator listening on http://127.0.0.1:{args.port}", flush=True)
        await task

    asyncio.run(run())


if __name__ == "__main__":
    main()
