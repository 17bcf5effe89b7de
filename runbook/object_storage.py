"""Object storage recovery: the replica comparison in the report, the applications a failover repoints, the previews.

A failover repoints applications, not buckets: the Secret they read the endpoint (and bucket) from
is set to the replica and the Deployments that read it are restarted. Everything a failover needs
is checked before anything changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.loading import load_block
from blocks.object_store import ObjectStore, ReplicaComparison, RestorePlan
from blocks.results import CheckResult
from runbook.run import Recovery
from tasks.object_store import find_missing_deployments

LISTED = 50  # keys listed by name in the report's facts; the counts are always complete


def listed(items: list[str]) -> list[str]:
    """At most LISTED items, and how many more there are."""
    return items[:LISTED] + ([f"... and {len(items) - LISTED} more"] if len(items) > LISTED else [])


def sample_keys(keys: list[str], size: int, seed: str) -> list[str]:
    """A sample of ``keys`` that a re-run of the same incident draws again."""
    return sorted(random.Random(seed).sample(keys, min(size, len(keys))))


def record_comparison(run: Recovery, comparison: ReplicaComparison) -> None:
    """What the replica lacks, as facts and checks; the data-loss window is the oldest write not replicated."""
    report = run.report
    report.facts["Replica"] = comparison.summary()
    report.facts["Missing in the replica"] = listed(comparison.missing) or "none"
    report.facts["Stale in the replica"] = listed([
        f"{s.key} (primary {s.primary_size} B {s.primary_etag}, replica {s.replica_size} B {s.replica_etag})"
        for s in comparison.stale]) or "none"
    report.add_checks("replica", [
        CheckResult("no object missing in the replica", not comparison.missing,
                    f"{len(comparison.missing)} of {comparison.checked} missing"),
        CheckResult("no stale object in the replica", not comparison.stale,
                    f"{len(comparison.stale)} of {comparison.checked} differ in size or etag"),
    ])
    lag = (run.detected_at - comparison.oldest_unreplicated).total_seconds() \
        if comparison.oldest_unreplicated else 0.0
    report.rpo_seconds = max(0.0, lag)


@dataclass(frozen=True)
class Applications:
    """The applications a failover repoints: the Secret they read the endpoint from, the Deployments that read it."""

    kube: KubernetesTarget
    secret_name: str
    secret_key: str
    bucket_key: str | None
    deployments: tuple[str, ...]
    rollout_timeout: float

    @classmethod
    def to_fail_over(cls, store: ObjectStore, kube_block: str | None, secret_name: str | None, secret_key: str,
                     bucket_key: str | None, deployments: list[str] | None, rollout_timeout: float) -> "Applications":
        """Refuse a failover that could not complete, before anything changes."""
        if rollout_timeout <= 0:
            raise InvalidInput(f"rollout_timeout_seconds {rollout_timeout} must be positive")
        if store.replica_endpoint is None:
            raise InvalidInput(f"object store {store.bucket_name!r}: the replica has no endpoint to fail over to")
        if not kube_block:
            raise InvalidInput("kube_block is required for mode 'failover': the applications' KubernetesTarget")
        if not secret_name or not secret_name.strip():
            raise InvalidInput("secret_name is required for mode 'failover': the Secret applications read the "
                               "endpoint from")
        if not secret_key or not secret_key.strip():
            raise InvalidInput("secret_key is empty; name the Secret key holding the object-storage endpoint")
        kube = load_block(KubernetesTarget, kube_block)
        names = list(deployments or [])
        missing = find_missing_deployments(kube, names)
        if missing:
            raise InvalidInput(f"deployments {missing} do not exist in namespace {kube.namespace!r} of {kube_block!r}")
        return cls(kube, secret_name, secret_key, bucket_key, tuple(names), rollout_timeout)

    @property
    def secret(self) -> str:
        return f"{self.kube.namespace}/{self.secret_name}"


def restore_preview(run: Recovery, plan: RestorePlan) -> str:
    report, counts = run.report, plan.counts()
    lines = [
        f"## Restore `{plan.prefix}` of `{plan.bucket}` to {plan.as_of.isoformat()}?",
        "",
        f"- **Keys examined**: {plan.keys_examined}",
        f"- **Changes**: {counts['restore']} restore, {counts['undelete']} undelete, {counts['hide']} hide",
        f"- **Writes after T that are superseded**: {report.rpo_seconds:.0f} s (objective {report.rpo_objective_seconds} s)",
        "",
        "Every change adds a new version or delete marker; no version is deleted, so this can itself be undone.",
        "",
    ]
    lines += [f"- {c.describe()}" for c in plan.changes[:20]]
    if len(plan.changes) > 20:
        lines.append(f"- ... and {len(plan.changes) - 20} more (all listed in the report's plan)")
    return "\n".join(lines)


def failover_preview(run: Recovery, apps: Applications, endpoint: str, bucket: str | None, plan: list[str]) -> str:
    report = run.report
    lines = [
        f"## Fail applications in `{apps.kube.namespace}` over to the replica `{bucket}`?",
        "",
        f"- **Replica**: {report.facts.get('Replica', '-')}",
        f"- **Missing in the replica**: {report.facts.get('Missing in the replica', '-')}",
        f"- **Data not yet replicated**: {'unknown' if report.rpo_seconds is None else f'{report.rpo_seconds:.0f} s'} "
        f"(objective {report.rpo_objective_seconds} s)",
        f"- **Secret**: `{apps.secret_name}` will point at {endpoint}",
        "",
        *report.checks_markdown(),
    ]
    lines += ["", "Approving makes these changes:", ""] + [f"1. {item}" for item in plan]
    lines += ["", "Rejecting changes nothing."]
    return "\n".join(lines)
