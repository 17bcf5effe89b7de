"""A Kubernetes namespace of one region, and the verbs recoveries need on it.

The block owns a client of the official ``kubernetes`` package built from its own fields
(no kubeconfig, no process-wide configuration). Every request carries a timeout; responses
are handled as plain JSON dictionaries, so the verbs work on any API server version.
Listings send their label selector to the server and filter again on the client, so a
server that ignores selectors cannot widen what a verb touches.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Literal

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks.errors import InvalidInput, RecoveryError

REVISION = "deployment.kubernetes.io/revision"
CHANGE_CAUSE = "kubernetes.io/change-cause"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
HASH_LABEL = "pod-template-hash"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
# Deployment annotations a rollback keeps from the deployment instead of taking from the ReplicaSet (as kubectl).
ANNOTATIONS_TO_SKIP = {
    LAST_APPLIED,
    REVISION,
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
}
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

# plural kind -> (API class of the kubernetes client, its namespaced list method)
DUMPABLE = {
    "deployments": ("AppsV1Api", "list_namespaced_deployment"),
    "replicasets": ("AppsV1Api", "list_namespaced_replica_set"),
    "statefulsets": ("AppsV1Api", "list_namespaced_stateful_set"),
    "daemonsets": ("AppsV1Api", "list_namespaced_daemon_set"),
    "pods": ("CoreV1Api", "list_namespaced_pod"),
    "services": ("CoreV1Api", "list_namespaced_service"),
    "configmaps": ("CoreV1Api", "list_namespaced_config_map"),
    "secrets": ("CoreV1Api", "list_namespaced_secret"),
    "serviceaccounts": ("CoreV1Api", "list_namespaced_service_account"),
    "events": ("CoreV1Api", "list_namespaced_event"),
    "jobs": ("BatchV1Api", "list_namespaced_job"),
    "cronjobs": ("BatchV1Api", "list_namespaced_cron_job"),
    "networkpolicies": ("NetworkingV1Api", "list_namespaced_network_policy"),
    "ingresses": ("NetworkingV1Api", "list_namespaced_ingress"),
    "roles": ("RbacAuthorizationV1Api", "list_namespaced_role"),
    "rolebindings": ("RbacAuthorizationV1Api", "list_namespaced_role_binding"),
}


class KubernetesError(RecoveryError):
    """The Kubernetes API refused or failed an operation.

    ``http_status`` is the API server's HTTP status, or None when no answer came.
    """

    http_status: int | None = None

    def with_status(self, status: int | None) -> "KubernetesError":
        self.http_status = status
        return self

    @property
    def status_text(self) -> str:
        return f"HTTP {self.http_status}" if self.http_status else "no answer from the API server"


class KubernetesUnavailable(KubernetesError):
    """The API server could not be reached or answered 5xx/429; may succeed on a retry."""

    transient = True


class NotFound(KubernetesError):
    """The object does not exist."""


class Conflict(KubernetesError):
    """HTTP 409: a create met an object of the same name, or an update met a newer version."""


class RolloutNotReady(KubernetesError):
    """A rollout did not become ready within its time bound, or exceeded its progress deadline."""

    def __init__(self, message: str, status: "RolloutStatus"):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------- label selectors

_SET_TERM = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _selector_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def labels_match(labels: dict[str, str] | None, selector: str | None) -> bool:
    """Whether ``labels`` satisfy a label selector string (``a=b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``)."""
    labels = labels or {}
    for term in _selector_terms(selector or ""):
        found = _SET_TERM.match(term)
        if found:
            key, op = found.group(1), found.group(2)
            values = {v.strip() for v in found.group(3).split(",")}
            if (key in labels and labels[key] in values) != (op == "in"):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in re.split(r"==?", term, maxsplit=1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def selector_string(selector: dict[str, str] | str | None) -> str:
    """A label selector string from a ``{label: value}`` mapping (or a string, returned as is)."""
    if selector is None:
        return ""
    if isinstance(selector, str):
        return selector.strip()
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _match_labels_string(label_selector: dict | None) -> str:
    """The selector string of a LabelSelector object (matchLabels and simple matchExpressions)."""
    label_selector = label_selector or {}
    terms = [f"{k}={v}" for k, v in sorted((label_selector.get("matchLabels") or {}).items())]
    for expr in label_selector.get("matchExpressions") or []:
        op, key, values = expr.get("operator"), expr.get("key"), ",".join(expr.get("values") or [])
        terms.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                      "Exists": key, "DoesNotExist": f"!{key}"}.get(op, key))
    return ",".join(terms)


def _images(template: dict) -> list[str]:
    spec = (template or {}).get("spec") or {}
    return [c.get("image", "") for c in spec.get("containers") or []]


def _template_without_hash(template: dict) -> dict:
    clean = json.loads(json.dumps(template or {}))
    labels = (clean.get("metadata") or {}).get("labels")
    if labels is not None:
        labels.pop(HASH_LABEL, None)
    return clean


def template_digest(template: dict) -> str:
    """A stable short digest of a pod template (the pod-template-hash label left out).

    A deployment and the ReplicaSet holding the same template have the same digest, whatever
    revision number the ReplicaSet carries.
    """
    text = json.dumps(_template_without_hash(template), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _contains(stored: Any, wanted: Any) -> bool:
    """Whether ``stored`` holds everything ``wanted`` does (the server may add defaults)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(k in stored and _contains(stored[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(stored, list) and len(stored) == len(wanted) and all(
            _contains(a, b) for a, b in zip(stored, wanted, strict=True))
    return stored == wanted


def _redact_secret(secret: dict) -> dict:
    """A Secret with its values replaced by ``"<redacted>"`` and kubectl's last-applied copy dropped.

    ``kubectl apply`` stores the whole manifest, values included, in an annotation.
    """
    secret = dict(secret)
    for section in ("data", "stringData"):
        if secret.get(section):
            secret[section] = {key: "<redacted>" for key in secret[section]}
    meta = dict(secret.get("metadata") or {})
    if LAST_APPLIED in (meta.get("annotations") or {}):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k != LAST_APPLIED}
    meta.pop("managedFields", None)
    secret["metadata"] = meta
    return secret


# ---------------------------------------------------------------------- results as data


@dataclass(frozen=True)
class Replicas:
    """Replica counts of a deployment: desired (spec) and observed."""

    name: str
    spec: int
    ready: int
    updated: int
    available: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScaleResult:
    """What ``scale`` did: the count before and after; ``changed`` False when it already matched."""

    name: str
    previous: int
    replicas: int
    changed: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Revision:
    """One entry of a deployment's rollout history (one ReplicaSet)."""

    revision: int
    replicaset: str
    images: list[str]
    change_cause: str | None
    created: str | None
    replicas: int
    current: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RollbackPlan:
    """A rollback worked out before anything changes: from which revision and images to which."""

    name: str
    from_revision: int
    to_revision: int
    from_images: list[str]
    to_images: list[str]
    replicaset: str
    template: dict = field(repr=False)
    annotations: dict[str, str] = field(repr=False)
    from_digest: str = ""
    to_digest: str = ""

    @property
    def noop(self) -> bool:
        """The deployment already runs the target template (compared by content, not revision number)."""
        return self.from_digest == self.to_digest if self.from_digest else self.from_revision == self.to_revision

    def describe(self) -> str:
        return (f"deployment {self.name}: image {', '.join(self.from_images)} -> {', '.join(self.to_images)}, "
                f"revision {self.from_revision} -> {self.to_revision} (ReplicaSet {self.replicaset})")

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("template", "annotations")}


@dataclass(frozen=True)
class RolloutStatus:
    """A deployment's rollout state, judged as ``kubectl rollout status`` does."""

    name: str
    generation: int
    observed_generation: int
    replicas: int
    updated: int
    ready: int
    available: int
    total: int
    revision: int | None
    images: list[str]
    complete: bool
    failed: bool
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- the block


class KubernetesTarget(Block):
    """One namespace on one Kubernetes cluster (one region), and the deployments it runs.

    Example:
        ```python
        from blocks.kubernetes import KubernetesTarget
        target = KubernetesTarget.load("dr-primary")
        target.rollout_history("web")
        target.rollout_undo("web")              # back to the previous revision, as kubectl does
        target.wait_ready("web", timeout=300)
        ```
    """

    _block_type_name = "Kubernetes Target"
    _block_type_slug = "kubernetes-target"
    _logo_url = "https://kubernetes.io/images/favicon.png"
    _description = "A namespace on a Kubernetes cluster: API server, credentials, the deployments of this region."

    api_server: str = Field(description="API server URL, e.g. https://k8s.eu-west-1.example.com:6443.")
    token: SecretStr | None = Field(default=None, description="Bearer token of the service account used for recovery.")
    verify_tls: bool = Field(default=True, description="Verify the API server's TLS certificate.")
    ca_file: str | None = Field(default=None, description="CA bundle file for the API server's certificate.")
    namespace: str = Field(default="default", description="Namespace the verbs act in.")
    deployments: dict[str, int] = Field(
        default_factory=dict,
        description="The deployments of this region and the replica count each runs at when serving traffic.",
    )
    region: str | None = Field(default=None, description="Region or cluster name shown in evidence.")
    environment: Literal["production", "staging", "sandbox"] = Field(
        default="production", description="Drills may approve themselves ('auto' policy) only outside production."
    )
    connect_timeout_seconds: float = Field(default=5, gt=0, description="TCP connect timeout of every request.")
    request_timeout_seconds: float = Field(default=30, gt=0, description="Read timeout of every request.")
    rollout_timeout_seconds: int = Field(default=600, ge=1, description="Default upper bound of wait_ready.")
    poll_interval_seconds: float = Field(default=1.0, gt=0, description="How often waits poll the API server.")

    # ------------------------------------------------------------------ plumbing

    def _configuration(self) -> k8s.Configuration:
        cfg = k8s.Configuration(host=self.api_server.rstrip("/"))
        cfg.verify_ssl = self.verify_tls
        if self.ca_file:
            cfg.ssl_ca_cert = self.ca_file
        if self.token is not None:
            cfg.api_key = {"authorization": self.token.get_secret_value()}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        # Reads may be resent once; a write never is (a resent create would answer 409 for an object it made),
        # except when the connection could not be opened and so nothing was sent.
        cfg.retries = urllib3.Retry(total=1, connect=1, read=1, status=0, other=0, redirect=0,
                                    allowed_methods=frozenset({"GET", "HEAD"}))
        return cfg

    @contextmanager
    def client(self) -> Iterator[k8s.ApiClient]:
        """A new API client for this target, closed afterwards."""
        api = k8s.ApiClient(self._configuration())
        try:
            yield api
        finally:
            api.close()

    def _call(self, api: k8s.ApiClient, group: str, method: str, *args: Any, what: str, **kwargs: Any) -> dict:
        """Call ``group.method`` and return the decoded JSON; errors become KubernetesError subclasses."""
        fn: Callable = getattr(getattr(k8s, group)(api), method)
        try:
            response = fn(*args, _preload_content=False,
                          _request_timeout=(self.connect_timeout_seconds, self.request_timeout_seconds), **kwargs)
        except ApiException as exc:
            reason = self._reason(exc)
            if exc.status == 404:
                raise NotFound(f"{what}: not found in namespace {self.namespace!r} on {self.api_server}"
                               ).with_status(404) from exc
            if exc.status == 409:
                raise Conflict(f"{what}: HTTP 409 from {self.api_server}: {reason}").with_status(409) from exc
            if exc.status in (429,) or (exc.status or 0) >= 500:
                raise KubernetesUnavailable(f"{what}: HTTP {exc.status} from {self.api_server}: {reason}"
                                            ).with_status(exc.status) from exc
            raise KubernetesError(f"{what}: HTTP {exc.status} from {self.api_server}: {reason}"
                                  ).with_status(exc.status) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubernetesUnavailable(f"{what}: {self.api_server} unreachable: {type(exc).__name__}") from exc
        data = response.data
        if not data:
            return {}
        try:
            return json.loads(data)
        except ValueError as exc:
            raise KubernetesError(
                f"{what}: {self.api_server} answered HTTP {response.status} with a body that is not JSON "
                f"({len(data)} bytes); is api_server the Kubernetes API?").with_status(response.status) from exc

    @staticmethod
    def _reason(exc: ApiException) -> str:
        try:
            return str(json.loads(exc.body).get("message") or exc.reason)[:300]
        except (TypeError, ValueError, AttributeError):
            return str(exc.reason)

    def _check_name(self, kind: str, name: str) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidInput(f"{kind} name {name!r} is not a valid Kubernetes object name")

    def _managed(self, name: str) -> None:
        """Refuse a deployment outside this target's declared ``deployments`` (when any are declared)."""
        self._check_name("deployment", name)
        if self.deployments and name not in self.deployments:
            known = ", ".join(sorted(self.deployments))
            raise InvalidInput(f"deployment {name!r} is not one of this target's deployments ({known})")

    # ------------------------------------------------------------------ deployments

    def get_deployment(self, name: str) -> dict:
        """The deployment object; an absent one is refused with InvalidInput naming it."""
        self._check_name("deployment", name)
        with self.client() as api:
            try:
                return self._call(api, "AppsV1Api", "read_namespaced_deployment", name, self.namespace,
                                  what=f"deployment {name}")
            except NotFound as exc:
                raise InvalidInput(
                    f"deployment {name!r} does not exist in namespace {self.namespace!r} on {self.api_server}"
                ) from exc

    def deployment_exists(self, name: str) -> bool:
        try:
            self.get_deployment(name)
        except InvalidInput:
            return False
        return True

    def get_replicas(self, name: str) -> Replicas:
        """Desired and observed replica counts of ``name``."""
        dep = self.get_deployment(name)
        status = dep.get("status") or {}
        return Replicas(name, int((dep.get("spec") or {}).get("replicas", 1)), int(status.get("readyReplicas") or 0),
                        int(status.get("updatedReplicas") or 0), int(status.get("availableReplicas") or 0))

    def scale(self, name: str, replicas: int) -> ScaleResult:
        """Set ``name`` to ``replicas``. Idempotent: nothing is sent when it already has that count."""
        self._managed(name)
        if not isinstance(replicas, int) or replicas < 0:
            raise InvalidInput(f"replica count {replicas!r} for {name!r} must be a whole number >= 0")
        current = self.get_replicas(name).spec
        if current == replicas:
            return ScaleResult(name, current, replicas, False)
        with self.client() as api:
            self._call(api, "AppsV1Api", "patch_namespaced_deployment", name, self.namespace,
                       {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH, what=f"scale deployment {name}")
        return ScaleResult(name, current, replicas, True)

    def scale_to_declared(self, factor: float = 1.0) -> list[ScaleResult]:
        """Scale every declared deployment to its declared count (times ``factor``; 0 scales all down)."""
        if factor < 0:
            raise InvalidInput(f"scale factor {factor!r} must be >= 0")
        return [self.scale(name, int(round(count * factor))) for name, count in sorted(self.deployments.items())]

    def rollout_restart(self, name: str) -> str:
        """Restart every pod of ``name`` by stamping the pod template, as ``kubectl rollout restart``.

        Returns:
            The restartedAt timestamp written.
        """
        self._managed(name)
        dep = self.get_deployment(name)
        if (dep.get("spec") or {}).get("paused"):
            raise KubernetesError(f"deployment {name!r} is paused; resume it before restarting")
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
        with self.client() as api:
            self._call(api, "AppsV1Api", "patch_namespaced_deployment", name, self.namespace, patch,
                       _content_type=MERGE_PATCH, what=f"restart deployment {name}")
        return stamp

    def _owned_replicasets(self, dep: dict) -> list[dict]:
        uid = dep["metadata"].get("uid")
        selector = _match_labels_string((dep.get("spec") or {}).get("selector"))
        with self.client() as api:
            listing = self._call(api, "AppsV1Api", "list_namespaced_replica_set", self.namespace,
                                 label_selector=selector or None, what=f"ReplicaSets of {dep['metadata']['name']}")
        owned = []
        for rs in listing.get("items") or []:
            meta = rs.get("metadata") or {}
            refs = meta.get("ownerReferences") or []
            if any(r.get("uid") == uid and r.get("controller", True) for r in refs) and labels_match(meta.get("labels"), selector):
                owned.append(rs)
        return owned

    @staticmethod
    def _revision_of(obj: dict) -> int:
        try:
            return int(((obj.get("metadata") or {}).get("annotations") or {}).get(REVISION) or 0)
        except ValueError:
            return 0

    def rollout_history(self, name: str) -> list[Revision]:
        """Revisions of ``name``, oldest first, from the ReplicaSets it owns (as ``kubectl rollout history``)."""
        dep = self.get_deployment(name)
        current = self._revision_of(dep)
        history = []
        for rs in self._owned_replicasets(dep):
            meta = rs.get("metadata") or {}
            revision = self._revision_of(rs)
            if revision <= 0:
                continue
            history.append(Revision(
                revision=revision, replicaset=meta.get("name", ""),
                images=_images((rs.get("spec") or {}).get("template") or {}),
                change_cause=(meta.get("annotations") or {}).get(CHANGE_CAUSE),
                created=meta.get("creationTimestamp"),
                replicas=int((rs.get("spec") or {}).get("replicas") or 0),
                current=revision == current,
            ))
        return sorted(history, key=lambda r: r.revision)

    def plan_rollback(self, name: str, to_revision: int | None = None, replicaset: str | None = None) -> RollbackPlan:
        """Work out ``rollout undo`` without changing anything; refuses when there is nothing to go back to.

        ``to_revision`` None (or 0) means the previous revision, as kubectl. ``replicaset`` names the
        target by its ReplicaSet instead: the name stays when a rollback renumbers the revision, so
        a repeated call finds the same target (and ``plan.noop`` once the deployment runs it).
        """
        self._managed(name)
        if to_revision is not None and (not isinstance(to_revision, int) or to_revision < 0):
            raise InvalidInput(f"to_revision {to_revision!r} must be a positive revision number")
        if to_revision and replicaset:
            raise InvalidInput(f"give to_revision ({to_revision}) or replicaset ({replicaset!r}), not both")
        dep = self.get_deployment(name)
        spec = dep.get("spec") or {}
        if spec.get("paused"):
            raise InvalidInput(f"deployment {name!r} is paused; kubectl refuses to roll back a paused deployment")
        replicasets = self._owned_replicasets(dep)
        by_revision = {self._revision_of(rs): rs for rs in replicasets if self._revision_of(rs) > 0}
        current = self._revision_of(dep) or max(by_revision, default=0)
        current_digest = template_digest(spec.get("template") or {})
        if replicaset:
            rs = next((r for r in replicasets if (r.get("metadata") or {}).get("name") == replicaset), None)
            if rs is None:
                known = ", ".join(sorted((r.get("metadata") or {}).get("name", "") for r in replicasets)) or "none"
                raise InvalidInput(f"deployment {name!r} owns no ReplicaSet {replicaset!r}; ReplicaSets: {known}")
            target = self._revision_of(rs)
        elif to_revision:
            if to_revision not in by_revision:
                known = ", ".join(str(r) for r in sorted(by_revision)) or "none"
                raise InvalidInput(f"deployment {name!r} has no revision {to_revision}; revisions: {known}")
            target, rs = to_revision, by_revision[to_revision]
        else:
            previous = [r for r in by_revision if r < current]
            if not previous:
                raise InvalidInput(
                    f"deployment {name!r} has no previous revision to roll back to (current revision {current or 'none'})"
                )
            target = max(previous)
            rs = by_revision[target]
        template = _template_without_hash((rs.get("spec") or {}).get("template") or {})
        annotations = {k: v for k, v in ((dep["metadata"].get("annotations") or {}).items()) if k in ANNOTATIONS_TO_SKIP}
        annotations.update({k: v for k, v in ((rs["metadata"].get("annotations") or {}).items())
                            if k not in ANNOTATIONS_TO_SKIP})
        to_digest = template_digest(template)
        return RollbackPlan(
            name=name, from_revision=current, to_revision=current if to_digest == current_digest else target,
            from_images=_images(spec.get("template") or {}), to_images=_images(template),
            replicaset=rs["metadata"].get("name", ""), template=template, annotations=annotations,
            from_digest=current_digest, to_digest=to_digest,
        )

    def rollout_undo(self, name: str, to_revision: int | None = None, replicaset: str | None = None,
                     annotations: dict[str, str] | None = None) -> RollbackPlan:
        """Roll ``name`` back to ``to_revision`` (default: the previous one) as ``kubectl rollout undo`` does.

        The ReplicaSet of that revision (or the one named ``replicaset``) is found; its pod template
        (without the pod-template-hash label) replaces the deployment's, and its annotations
        replace the deployment's, in one JSON patch. ``annotations`` are written in the same patch,
        so a marker of the rollback lands together with it or not at all. When the deployment
        already runs that template (same content, whatever its revision number) nothing is sent
        but missing ``annotations`` (``plan.noop``): repeating the call is safe.
        """
        extra = {str(k): str(v) for k, v in (annotations or {}).items()}
        plan = self.plan_rollback(name, to_revision, replicaset)
        if plan.noop:
            present = (self.get_deployment(name).get("metadata") or {}).get("annotations") or {}
            missing = {k: v for k, v in extra.items() if present.get(k) != v}
            if missing:
                self.annotate_deployment(name, missing)
            return plan
        patch = [{"op": "replace", "path": "/spec/template", "value": plan.template},
                 {"op": "replace", "path": "/metadata/annotations", "value": {**plan.annotations, **extra}}]
        with self.client() as api:
            self._call(api, "AppsV1Api", "patch_namespaced_deployment", name, self.namespace, patch,
                       _content_type=JSON_PATCH, what=f"roll back deployment {name}")
        return plan

    def annotate_deployment(self, name: str, annotations: dict[str, str | None]) -> dict:
        """Set (or, with None, remove) annotations on deployment ``name`` itself; the pod template is untouched."""
        self._managed(name)
        self.get_deployment(name)
        with self.client() as api:
            return self._call(api, "AppsV1Api", "patch_namespaced_deployment", name, self.namespace,
                              {"metadata": {"annotations": annotations}}, _content_type=MERGE_PATCH,
                              what=f"annotate deployment {name}")

    def rollout_status(self, name: str) -> RolloutStatus:
        """The rollout state of ``name`` now, judged as ``kubectl rollout status``."""
        dep = self.get_deployment(name)
        meta, spec, status = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
        generation, observed = int(meta.get("generation") or 0), int(status.get("observedGeneration") or 0)
        want = int(spec.get("replicas", 1))
        updated, ready = int(status.get("updatedReplicas") or 0), int(status.get("readyReplicas") or 0)
        available, total = int(status.get("availableReplicas") or 0), int(status.get("replicas") or 0)
        progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
        # As kubectl: the progress deadline counts only once the controller has seen the latest spec;
        # right after a change the condition still describes the rollout before it.
        failed = observed >= generation and progressing.get("reason") == "ProgressDeadlineExceeded"
        if observed < generation:
            message = f"waiting for the deployment spec update to be observed (generation {generation}, observed {observed})"
        elif failed:
            message = f"deployment {name!r} exceeded its progress deadline: {progressing.get('message', '')}".strip()
        elif updated < want:
            message = f"{updated} of {want} new replicas have been updated"
        elif total > updated:
            message = f"{total - updated} old replicas are pending termination"
        elif available < updated or ready < want:
            message = f"{min(available, ready)} of {want} updated replicas are available"
        else:
            message = f"deployment {name!r} successfully rolled out"
        complete = observed >= generation and not failed and updated == want and total == updated \
            and available >= want and ready >= want
        return RolloutStatus(name=name, generation=generation, observed_generation=observed, replicas=want,
                             updated=updated, ready=ready, available=available, total=total,
                             revision=self._revision_of(dep) or None, images=_images(spec.get("template") or {}),
                             complete=complete, failed=failed, message=message)

    def wait_ready(self, name: str, timeout: float | None = None) -> RolloutStatus:
        """Wait, at most ``timeout`` seconds (default: the block's rollout timeout), until ``name`` is rolled out.

        Raises:
            RolloutNotReady: the deadline passed, or the deployment exceeded its progress deadline;
                the error carries the last status and names what was still missing.
        """
        limit = self.rollout_timeout_seconds if timeout is None else timeout
        if limit <= 0:
            raise InvalidInput(f"rollout timeout {limit!r} must be a positive number of seconds")
        deadline = time.monotonic() + limit
        while True:
            status = self.rollout_status(name)
            if status.complete:
                return status
            if status.failed:
                raise RolloutNotReady(status.message, status)
            if time.monotonic() >= deadline:
                raise RolloutNotReady(
                    f"deployment {name!r} was not ready within {limit:g} s: {status.message} "
                    f"(images {', '.join(status.images)}, revision {status.revision})", status)
            time.sleep(min(self.poll_interval_seconds, max(0.05, deadline - time.monotonic())))

    # ------------------------------------------------------------------ pods

    def list_pods(self, selector: dict[str, str] | str | None = None) -> list[dict]:
        """Pods matching ``selector`` (label mapping or selector string): name, phase, ready, labels, images."""
        text = selector_string(selector)
        with self.client() as api:
            listing = self._call(api, "CoreV1Api", "list_namespaced_pod", self.namespace,
                                 label_selector=text or None, what="pods")
        pods = []
        for pod in listing.get("items") or []:
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            if not labels_match(meta.get("labels"), text) or meta.get("deletionTimestamp"):
                continue
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            pods.append({"name": meta.get("name"), "phase": status.get("phase"), "ready": ready,
                         "labels": meta.get("labels") or {}, "images": _images(pod)})
        return sorted(pods, key=lambda p: p["name"] or "")

    def pods_running(self, selector: dict[str, str] | str | None = None, expected: int | None = None) -> bool:
        """True when at least one pod (at least ``expected``) matches and every match is Running and ready."""
        pods = self.list_pods(selector)
        running = [p for p in pods if p["phase"] == "Running" and p["ready"]]
        return bool(pods) and len(running) == len(pods) and (expected is None or len(running) >= expected)

    def deployment_pods(self, name: str) -> list[dict]:
        """The pods selected by deployment ``name``'s selector."""
        dep = self.get_deployment(name)
        return self.list_pods(_match_labels_string((dep.get("spec") or {}).get("selector")))

    # ------------------------------------------------------------------ jobs

    def list_jobs(self, label_selector: dict[str, str] | str | None = None) -> list[dict]:
        """Jobs matching the selector: name, labels, suspended, active pods, completion."""
        text = selector_string(label_selector)
        with self.client() as api:
            listing = self._call(api, "BatchV1Api", "list_namespaced_job", self.namespace,
                                 label_selector=text or None, what="jobs")
        jobs = []
        for job in listing.get("items") or []:
            meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
            if not labels_match(meta.get("labels"), text):
                continue
            done = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                       for c in status.get("conditions") or [])
            jobs.append({"name": meta.get("name"), "labels": meta.get("labels") or {},
                         "suspended": bool(spec.get("suspend")), "active": int(status.get("active") or 0),
                         "finished": done})
        return sorted(jobs, key=lambda j: j["name"] or "")

    def suspend_job(self, name: str) -> bool:
        """Suspend Job ``name`` (its pods are stopped, the Job is kept). Returns False when already suspended."""
        self._check_name("job", name)
        with self.client() as api:
            try:
                job = self._call(api, "BatchV1Api", "read_namespaced_job", name, self.namespace, what=f"job {name}")
            except NotFound as exc:
                raise InvalidInput(f"job {name!r} does not exist in namespace {self.namespace!r}") from exc
            if (job.get("spec") or {}).get("suspend"):
                return False
            self._call(api, "BatchV1Api", "patch_namespaced_job", name, self.namespace, {"spec": {"suspend": True}},
                       _content_type=MERGE_PATCH, what=f"suspend job {name}")
        return True

    def delete_job(self, name: str) -> bool:
        """Delete Job ``name`` with its pods. Returns False when it was already gone."""
        self._check_name("job", name)
        with self.client() as api:
            try:
                self._call(api, "BatchV1Api", "delete_namespaced_job", name, self.namespace,
                           propagation_policy="Background", what=f"delete job {name}")
            except NotFound:
                return False
        return True

    # ------------------------------------------------------------------ network policies

    def apply_deny_all(self, name: str, pod_selector: dict[str, str] | None = None,
                       labels: dict[str, str] | None = None) -> dict:
        """Create or replace NetworkPolicy ``name`` denying all ingress and egress of the selected pods.

        ``pod_selector`` None or empty selects every pod of the namespace. Idempotent.

        Returns:
            The policy as stored.
        """
        self._check_name("network policy", name)
        spec = {"podSelector": {"matchLabels": dict(pod_selector or {})}, "policyTypes": ["Ingress", "Egress"],
                "ingress": [], "egress": []}
        meta_labels = {"app.kubernetes.io/managed-by": "dr-pipelines", **(labels or {})}
        body = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": self.namespace, "labels": meta_labels}, "spec": spec}
        with self.client() as api:
            existing = self.get_network_policy(name)
            if existing is None:
                try:
                    return self._call(api, "NetworkingV1Api", "create_namespaced_network_policy", self.namespace,
                                      body, what=f"create network policy {name}")
                except Conflict:
                    existing = self.get_network_policy(name)  # created meanwhile: compare and replace below
                    if existing is None:
                        raise
            if existing.get("spec") == spec and (existing.get("metadata") or {}).get("labels") == meta_labels:
                return existing
            patch = [{"op": "replace" if "spec" in existing else "add", "path": "/spec", "value": spec},
                     {"op": "replace" if (existing.get("metadata") or {}).get("labels") is not None else "add",
                      "path": "/metadata/labels", "value": meta_labels}]
            return self._call(api, "NetworkingV1Api", "patch_namespaced_network_policy", name, self.namespace, patch,
                              _content_type=JSON_PATCH, what=f"replace network policy {name}")

    def get_network_policy(self, name: str) -> dict | None:
        """NetworkPolicy ``name``, or None when absent."""
        self._check_name("network policy", name)
        with self.client() as api:
            try:
                return self._call(api, "NetworkingV1Api", "read_namespaced_network_policy", name, self.namespace,
                                  what=f"network policy {name}")
            except NotFound:
                return None

    def delete_network_policy(self, name: str) -> bool:
        """Remove NetworkPolicy ``name``. Returns False when it was already gone."""
        self._check_name("network policy", name)
        with self.client() as api:
            try:
                self._call(api, "NetworkingV1Api", "delete_namespaced_network_policy", name, self.namespace,
                           what=f"delete network policy {name}")
            except NotFound:
                return False
        return True

    # ------------------------------------------------------------------ forensics

    def dump_objects(self, kinds: list[str], selector: dict[str, str] | str | None = None) -> list[dict]:
        """Every object of ``kinds`` (plural names, e.g. ``["pods", "deployments"]``) matching ``selector``.

        Secrets are dumped with their data keys only (values replaced by ``"<redacted>"``).
        Objects come back sorted by kind and name, with ``kind`` and ``apiVersion`` set.
        """
        unknown = [k for k in kinds if k not in DUMPABLE]
        if unknown:
            raise InvalidInput(f"cannot dump kinds {unknown}; known: {', '.join(sorted(DUMPABLE))}")
        text = selector_string(selector)
        objects = []
        with self.client() as api:
            for kind in kinds:
                group, method = DUMPABLE[kind]
                listing = self._call(api, group, method, self.namespace, label_selector=text or None, what=kind)
                singular = (listing.get("kind") or "").removesuffix("List") or kind
                for obj in listing.get("items") or []:
                    if not labels_match((obj.get("metadata") or {}).get("labels"), text):
                        continue
                    obj = dict(obj)
                    obj.setdefault("kind", singular)
                    obj.setdefault("apiVersion", listing.get("apiVersion"))
                    if kind == "secrets":
                        obj = _redact_secret(obj)
                    objects.append(obj)
        return sorted(objects, key=lambda o: (o.get("kind") or "", (o.get("metadata") or {}).get("name") or ""))

    # ------------------------------------------------------------------ secrets and configuration

    def read_secret_keys(self, name: str) -> list[str]:
        """The data keys of Secret ``name`` (never the values)."""
        self._check_name("secret", name)
        with self.client() as api:
            try:
                secret = self._call(api, "CoreV1Api", "read_namespaced_secret", name, self.namespace,
                                    what=f"secret {name}")
            except NotFound as exc:
                raise InvalidInput(f"secret {name!r} does not exist in namespace {self.namespace!r}") from exc
        return sorted(set(secret.get("data") or {}) | set(secret.get("stringData") or {}))

    def read_secret_value(self, name: str, key: str) -> SecretStr:
        """One value of Secret ``name``, wrapped so it never prints."""
        self._check_name("secret", name)
        with self.client() as api:
            try:
                secret = self._call(api, "CoreV1Api", "read_namespaced_secret", name, self.namespace,
                                    what=f"secret {name}")
            except NotFound as exc:
                raise InvalidInput(f"secret {name!r} does not exist in namespace {self.namespace!r}") from exc
        data = secret.get("data") or {}
        if key not in data:
            raise InvalidInput(f"secret {name!r} has no key {key!r}; keys: {', '.join(sorted(data)) or 'none'}")
        return SecretStr(base64.b64decode(data[key]).decode())

    def set_secret_value(self, name: str, key: str, value: str | SecretStr) -> bool:
        """Set ``key`` of Secret ``name`` (created when absent). The value is never logged or put in errors.

        Returns:
            True when the secret was created, False when it was updated.
        """
        self._check_name("secret", name)
        if not key or not re.match(r"^[-._a-zA-Z0-9]+$", key):
            raise InvalidInput(f"secret key {key!r} is not a valid data key")
        plain = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        encoded = base64.b64encode(plain.encode()).decode()
        # Errors are raised again without their cause: the API server's answer may echo the request body.
        def update() -> None:
            try:
                self._call(api, "CoreV1Api", "patch_namespaced_secret", name, self.namespace,
                           {"data": {key: encoded}}, _content_type=MERGE_PATCH, what=f"update secret {name}")
            except NotFound:
                raise
            except KubernetesError as exc:
                raise type(exc)(f"updating key {key!r} of secret {name!r} in namespace {self.namespace!r} failed: "
                                f"{exc.status_text}").with_status(exc.http_status) from None

        with self.client() as api:
            try:
                update()
                return False
            except NotFound:
                pass
            body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": name, "namespace": self.namespace}, "data": {key: encoded}}
            try:
                self._call(api, "CoreV1Api", "create_namespaced_secret", self.namespace, body,
                           what=f"create secret {name}")
            except Conflict:
                update()  # created meanwhile (or by a first attempt whose answer was lost): set the key
                return False
            except KubernetesError as exc:
                raise type(exc)(f"creating secret {name!r} in namespace {self.namespace!r} failed: "
                                f"{exc.status_text}").with_status(exc.http_status) from None
        return True

    def read_config(self, name: str) -> dict[str, str]:
        """The data of ConfigMap ``name``."""
        self._check_name("config map", name)
        with self.client() as api:
            try:
                cm = self._call(api, "CoreV1Api", "read_namespaced_config_map", name, self.namespace,
                                what=f"config map {name}")
            except NotFound as exc:
                raise InvalidInput(f"config map {name!r} does not exist in namespace {self.namespace!r}") from exc
        return dict(cm.get("data") or {})

    def set_config(self, name: str, key: str, value: str) -> str | None:
        """Set ``key`` of ConfigMap ``name`` (created when absent). Returns the previous value (None if unset)."""
        self._check_name("config map", name)
        if not key or not re.match(r"^[-._a-zA-Z0-9]+$", key):
            raise InvalidInput(f"config map key {key!r} is not a valid data key")
        try:
            previous = self.read_config(name).get(key)
        except InvalidInput:
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": self.namespace},
                    "data": {key: str(value)}}
            try:
                with self.client() as api:
                    self._call(api, "CoreV1Api", "create_namespaced_config_map", self.namespace, body,
                               what=f"create config map {name}")
                return None
            except Conflict:
                previous = self.read_config(name).get(key)
        if previous != value:
            with self.client() as api:
                self._call(api, "CoreV1Api", "patch_namespaced_config_map", name, self.namespace,
                           {"data": {key: str(value)}}, _content_type=MERGE_PATCH, what=f"update config map {name}")
        return previous

    # ------------------------------------------------------------------ generic

    def create_object(self, body: dict) -> dict:
        """Create a Deployment, Job, Service, ConfigMap, Secret or NetworkPolicy from its manifest.

        An object of that name that already holds everything the manifest says (the server may
        have added defaults) is returned as it is, so a repeated create is not an error; one that
        differs is refused with KubernetesError (HTTP 409), naming it.
        """
        kind = body.get("kind")
        verbs = {"Deployment": ("AppsV1Api", "deployment"), "Job": ("BatchV1Api", "job"),
                 "Service": ("CoreV1Api", "service"), "ConfigMap": ("CoreV1Api", "config_map"),
                 "Secret": ("CoreV1Api", "secret"), "NetworkPolicy": ("NetworkingV1Api", "network_policy")}
        if kind not in verbs:
            raise InvalidInput(f"cannot create kind {kind!r}; known: {', '.join(sorted(verbs))}")
        group, noun = verbs[kind]
        name = (body.get("metadata") or {}).get("name")
        self._check_name(kind, name)
        with self.client() as api:
            try:
                return self._call(api, group, f"create_namespaced_{noun}", self.namespace, body,
                                  what=f"create {kind} {name}")
            except Conflict as exc:
                stored = self._call(api, group, f"read_namespaced_{noun}", name, self.namespace,
                                    what=f"{kind} {name}")
                wanted = {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata", "status")}
                wanted["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items()
                                      if k in ("labels", "annotations")}
                if _contains(stored, wanted):
                    return stored
                raise KubernetesError(f"{kind} {name!r} already exists in namespace {self.namespace!r} "
                                      "and differs from the manifest").with_status(409) from exc

    def patch_deployment(self, name: str, patch: dict) -> dict:
        """Apply a JSON merge patch to deployment ``name`` (e.g. a new image on its template)."""
        self._check_name("deployment", name)
        self.get_deployment(name)
        with self.client() as api:
            return self._call(api, "AppsV1Api", "patch_namespaced_deployment", name, self.namespace, patch,
                              _content_type=MERGE_PATCH, what=f"patch deployment {name}")

    def set_image(self, name: str, container: str, image: str) -> dict:
        """Set ``container``'s image in deployment ``name`` (``kubectl set image``), keeping the other containers."""
        self._managed(name)
        dep = self.get_deployment(name)
        containers = json.loads(json.dumps(((dep.get("spec") or {}).get("template") or {}).get("spec", {})
                                           .get("containers") or []))
        if container not in [c.get("name") for c in containers]:
            raise InvalidInput(f"deployment {name!r} has no container {container!r}")
        for c in containers:
            if c.get("name") == container:
                c["image"] = image
        return self.patch_deployment(name, {"spec": {"template": {"spec": {"containers": containers}}}})
