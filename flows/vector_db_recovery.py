"""Vector database failure: rebuild the collection beside the broken one, verify, approve, switch the alias.

Runbook (continuity plans: "Vector Database (Qdrant)", "Recovery Validation Checklist"):
  1. preflight: the alias, the source (PostgreSQL table, export or snapshot in the bucket) and the settings
  2. build a NEW collection from the chosen source:
     - reindex:  stream the stored embeddings from the PostgreSQL source of truth
     - import:   a portable export from the bucket, its sha256 checked first
     - snapshot: the Qdrant server recovers a snapshot from the bucket (server only)
  3. verify: point count equals the source; sampled queries return the source's exact top-10 (recall@10)
  4. a named approver approves, seeing the checks
  5. move the alias applications query to the new collection (one atomic alias operation);
     the old collection is kept
  6. post-checks through the alias ("collections are populated and searchable") and the report

A second flow, ``vector-db-backup``, writes the exports and snapshots the first one restores.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from prefect import get_run_logger
from prefect.states import State

from blocks.errors import InvalidInput
from blocks.loading import load_block
from blocks.qdrant import DISTANCES, EmbeddingTable, QdrantCluster, check_name
from blocks.results import CheckResult
from runbook.evidence import utcnow
from runbook.parameters import check_parameters, recovery_flow
from runbook.run import Approval, ApprovalPolicy, Recovery
from runbook.vector_db import Rebuild, Source, check_source, verify_against_source
from tasks.qdrant import (
    create_collection,
    describe_collection,
    export_collection,
    import_collection,
    list_collections,
    recover_snapshot,
    reindex_from_postgres,
    require_replaceable,
    snapshot_collection,
    switch_alias,
)

SCENARIO = "vector-db"
Strategy = Literal["reindex", "snapshot", "import"]


@recovery_flow(name="vector-db-recovery",
      description="Rebuild a Qdrant collection beside the broken one (re-index, import or snapshot), verify, switch the alias.")
def vector_db_recovery(
    qdrant_block: str,
    alias: str,
    strategy: Strategy = "reindex",
    postgres_block: str | None = None,
    source_table: EmbeddingTable | None = None,
    backup_key: str | None = None,
    distance: str | None = None,
    sample_queries: int = 50,
    min_recall: float = 0.99,
    k: int = 10,
    batch_size: int = 2000,
    incident_detected_at: datetime | None = None,
    incident_id: str | None = None,
    approval_policy: ApprovalPolicy = "required",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 3600,
    approval_poll_seconds: float = 5,
    severity: str | None = None,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "vector-db",
    lock_wait_seconds: int = 30,
) -> State:
    """Recover the collection behind a Qdrant alias.

    Args:
        qdrant_block: name of the QdrantCluster block.
        alias: the alias applications query; it is moved to the rebuilt collection.
        strategy: 'reindex' (from PostgreSQL), 'import' (a portable export) or 'snapshot' (server only).
        postgres_block: PostgresCluster block of the source of truth (reindex; snapshot verification).
        source_table: the table of stored embeddings in that cluster.
        backup_key: key of the export or snapshot in the backup bucket; the newest one of ``alias`` when empty.
        distance: distance of the rebuilt collection ('Cosine', 'Dot', 'Euclid'); the current one's when empty.
        sample_queries: how many sampled vectors are queried to measure recall.
        min_recall: lowest acceptable mean recall@k against the source's exact neighbours.
        k: neighbours compared per query.
        batch_size: points per upsert batch when re-indexing.
        incident_detected_at: when the failure was detected (tz-aware); RTO counts from it. Now when empty.
        incident_id: identifies the incident and names the rebuilt collection; derived when empty.
        approval_policy: 'required' (a named approver) or 'auto' (drills only, recorded as such).
        allowed_approvers: who may approve the alias switch.
        approval_timeout_seconds: how long to wait for approval before giving up without switching.
        approval_poll_seconds: how often a paused run checks for an answer.
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same alias to finish.
    """
    run = Recovery(
        SCENARIO, target=f"{qdrant_block}/{alias}", severity=severity, detected_at=incident_detected_at or utcnow(),
        recovery_target=strategy,
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
        incident_id=incident_id,
    )
    report = run.report
    report.facts["strategy"] = strategy
    with run:
        # 1. Preflight: the settings, then the alias and the source.
        with run.preflight() as step:
            check_name("alias", alias)
            if strategy not in ("reindex", "snapshot", "import"):
                raise InvalidInput(f"strategy {strategy!r} is not 'reindex', 'snapshot' or 'import'")
            if not 0 < min_recall <= 1:
                raise InvalidInput(f"min_recall {min_recall} must be in (0, 1]")
            if distance is not None and distance not in DISTANCES:
                raise InvalidInput(f"distance {distance!r} is not one of {', '.join(DISTANCES)}")
            qdrant = load_block(QdrantCluster, qdrant_block)
            run.refuse_unsafe_policy(qdrant_block, qdrant.environment)
            run.assign_incident(incident_id, alias)
            check_name("collection", f"{run.incident_id}-r")
            step.detail = f"{strategy} into a new collection for alias {alias}; incident {run.incident_id}"

        with run.step("Preflight: alias and source") as step:
            if alias in list_collections(qdrant):
                raise InvalidInput(f"{alias!r} is a collection in {qdrant.location}, not an alias; applications must "
                                   "read through an alias so a recovery can replace what they read")
            current = describe_collection(qdrant, alias)
            source = check_source(run, qdrant, alias, strategy, postgres_block, source_table, backup_key)
            vector_size = source.vector_size or (current.vector_size if current else None)
            if not vector_size:
                raise InvalidInput("the vector size of the rebuilt collection is unknown: the source gives none")
            rebuild = Rebuild(f"{run.incident_id}-r", int(vector_size),
                              distance or (current.distance if current else None) or source.distance or "Cosine",
                              batch_size, sample_queries, min_recall, k)
            leftover = (current is None or current.name != rebuild.collection) and require_replaceable(
                qdrant, rebuild.collection, run.incident_id)
            if leftover:
                report.facts["leftover replaced"] = f"{rebuild.collection}: an earlier attempt at incident {run.incident_id}"
            report.facts.update({"alias": alias, "collection before": current.name if current else "none",
                                 "points before": current.points if current else 0})
            step.detail = (f"alias {alias} -> {current.name + f' ({current.points} points)' if current else 'nothing'}; "
                           f"source {report.recovery_target}: {source.points} points of {vector_size} dims")

        with run.locks(f"qdrant-{qdrant_block}-{alias}", wait_seconds=lock_wait_seconds):
            collection = rebuild.collection
            if current is not None and current.name == collection:
                with run.step("Resume: alias already switched") as step:
                    step.detail = f"{alias} points to {collection} since an earlier run of this incident"
                if dry_run:
                    return run.planned(
                        [f"alias {alias} already points to {collection}, switched by an earlier run of incident "
                         f"{run.incident_id}: a real run would rebuild and switch nothing",
                         f"post-checks through {alias}: it serves {collection} and holds as many points as the source"],
                        f"Dry run: {alias} was already switched to {collection} for {run.incident_id}; a real run "
                        "would only confirm it. Nothing was changed.")
                report.promotion = {"alias": alias, "previous": None, "current": collection, "already": True}
            else:
                # 2-5. Rebuild beside the live collection, verify, approve, switch the alias.
                stopped = _rebuild_and_switch(run, qdrant, alias, current.name if current else None, source, rebuild)
                if stopped is not None:
                    return stopped

            # 6. Post-checks through the alias: the collection is populated and searchable.
            with run.step("Post-checks through the alias") as step:
                served = describe_collection(qdrant, alias)
                expected = source.expected_points()[0]
                checks = [
                    CheckResult("alias serves the rebuilt collection", served is not None and served.name == collection,
                                f"{alias} -> {served.name if served else 'nothing'}"),
                    CheckResult("populated", served is not None and served.points == expected,
                                f"{served.points if served else 0} points through {alias}, source {expected}"),
                ]
                report.add_checks("alias", checks)
                step.outcome = "ok" if not report.failed_critical("alias") else "failed"
                step.detail = "; ".join(c.detail for c in checks)
            if report.failed_critical("alias"):
                return run.finish("PostCheckFailed", f"The alias {alias} was switched but post-checks failed; see "
                                  "Verification Results.")
            run.mark_restored()
            if source.backup is not None:
                report.last_restored_commit = datetime.fromisoformat(source.backup.stored_at)
                report.rpo_seconds = max(0.0, (run.detected_at - report.last_restored_commit).total_seconds())
            else:
                report.rpo_seconds = 0.0  # re-indexed from the source of truth as it is now
            return run.finish("Recovered", f"Alias {alias} serves {collection}, rebuilt by {strategy} from "
                              f"{report.recovery_target} and verified against it.")


def _rebuild_and_switch(run: Recovery, qdrant: QdrantCluster, alias: str, current: str | None, source: Source,
                        rebuild: Rebuild) -> State | None:
    """Steps 2-5; the state the run ends in when it stops before the switch (dry run, verification, approval)."""
    report, collection = run.report, rebuild.collection
    plan = [
        f"create collection {collection} ({rebuild.vector_size} dims, {rebuild.distance}) beside "
        f"{current or 'the lost collection'}",
        {"reindex": f"re-index {source.points} rows of {report.recovery_target} in batches of {rebuild.batch_size}",
         "import": f"import the export {report.recovery_target} after checking its sha256",
         "snapshot": f"recover the snapshot {report.recovery_target} on the server, checksum verified"}[source.strategy],
        f"verify: point count equals the source; recall@{rebuild.k} of {rebuild.sample_queries} sampled queries >= "
        f"{rebuild.min_recall}",
        run.approval.describe(),
        f"alias {alias}: {current or 'none'} -> {collection} (atomic); keep {current or 'nothing'}",
    ]
    if run.dry_run:
        return run.planned(plan)
    report.plan = plan

    # 2. Build a NEW collection from the chosen source.
    with run.step("Rebuild beside the live collection") as step:
        if source.strategy == "reindex":
            create_collection(qdrant, collection, rebuild.vector_size, rebuild.distance, run.incident_id)
            written = reindex_from_postgres(qdrant, collection, source.cluster, source.table, rebuild.batch_size)
        elif source.strategy == "import":
            written = import_collection(qdrant, collection, source.backup, run.incident_id)
        else:
            recover_snapshot(qdrant, collection, source.backup, run.incident_id)
            written = None
        rebuilt = describe_collection(qdrant, collection)
        report.candidate = {"collection": collection, "points": rebuilt.points, "written": written}
        step.detail = f"{collection}: {rebuilt.points} points"

    # 3. Verify: the point count equals the source; sampled queries return the source's exact top-k.
    with run.step("Verify against the source") as step:
        checks = verify_against_source(run, qdrant, source, rebuild, rebuilt.distance)
        report.add_checks("rebuilt", checks)
        step.outcome = "ok" if not report.failed_critical("rebuilt") else "failed"
        step.detail = "; ".join(f"{c.name}: {c.detail}" for c in checks)
    inspect = f"inspect or delete collection {collection}"
    if report.failed_critical("rebuilt"):
        return run.finish("VerificationFailed", f"The rebuilt collection {collection} failed verification; the alias "
                          f"{alias} was not moved and still points to {current or 'nothing'}.", action_items=[inspect])

    # 4. A named approver approves, seeing the checks.
    decision = run.approve(_preview(run, alias, current, collection))
    if decision is None or not decision.approved:
        return run.declined(decision, "The alias switch", f"{alias} still points to {current or 'nothing'}; "
                            f"{collection} is kept for inspection", action_items=[inspect])

    # 5. Move the alias in one atomic operation; the old collection is kept.
    with run.step("Switch the alias") as step:
        previous = switch_alias(qdrant, alias, collection)
        report.promotion = {"alias": alias, "previous": previous, "current": collection,
                            "already": previous == collection}
        step.detail = f"{alias}: {previous or 'none'} -> {collection}"
    if current:
        report.action_items.append(f"delete the replaced collection {current} once the rebuilt one is trusted")
    return None


def _preview(run: Recovery, alias: str, current: str | None, collection: str) -> str:
    report = run.report
    failed = report.failed_critical()
    lines = [
        f"## Switch alias `{alias}` to the rebuilt collection `{collection}`?",
        "",
        f"- **Strategy**: {report.facts.get('strategy')}; source: {report.recovery_target}",
        f"- **Alias now points to**: {current or 'nothing (collection lost)'}",
        f"- **Rebuilt collection**: {report.candidate.get('points') if report.candidate else '-'} points",
        "",
        *report.checks_markdown(),
        "",
        f"Approving moves `{alias}` to `{collection}` in one alias operation; "
        f"`{current or '-'}` is kept, not deleted. Rejecting keeps the rebuilt collection for inspection.",
        "" if not failed else f"**{len(failed)} critical check(s) failed.**",
    ]
    return "\n".join(lines)


@recovery_flow(name="vector-db-backup", description="Export (or snapshot) a Qdrant collection to the backup bucket with its checksum.")
def vector_db_backup(qdrant_block: str, collection: str, kind: Literal["export", "snapshot"] = "export") -> dict:
    """Write a portable export, or a server snapshot, of a collection or alias to the backup bucket.

    Args:
        qdrant_block: name of the QdrantCluster block (it names the backup bucket).
        collection: collection or alias to back up; backups are filed under this name.
        kind: 'export' (portable, works with embedded Qdrant) or 'snapshot' (Qdrant server only).
    """
    check_parameters()
    if kind not in ("export", "snapshot"):
        raise InvalidInput(f"kind {kind!r} is not 'export' or 'snapshot'")
    check_name("collection", collection)
    qdrant = load_block(QdrantCluster, qdrant_block)
    if describe_collection(qdrant, collection) is None:
        raise InvalidInput(f"collection {collection!r} not found in Qdrant at {qdrant.location}")
    if kind == "snapshot":
        if qdrant.embedded:
            raise InvalidInput(f"kind 'snapshot' needs a Qdrant server; {qdrant.location} is embedded. Use 'export'")
        backup = snapshot_collection(qdrant, collection)
    else:
        backup = export_collection(qdrant, collection)
    get_run_logger().info("Backed up %s (%s points) to %s, sha256 %s", collection, backup.points, backup.key, backup.sha256)
    return backup.as_dict()
