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

from datetime import datetime, timezone
from typing import Literal

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State

from blocks import PostgresCluster, RecoveryObjectives
from blocks.errors import InvalidInput
from blocks.postgres import CheckResult
from blocks.qdrant import DISTANCES, EmbeddingTable, QdrantCluster, StoredBackup, check_name
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import ApprovalPolicy, approval_step, check_approval_settings
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from runbook.locks import recovery_lock
from tasks.qdrant import (
    check_export,
    list_collections,
    snapshot_collection,
    count_source_rows,
    create_collection,
    describe_collection,
    exact_neighbours_in_export,
    exact_neighbours_in_postgres,
    export_collection,
    find_backup,
    import_collection,
    recover_snapshot,
    reindex_from_postgres,
    require_replaceable,
    sample_recall,
    switch_alias,
)

SCENARIO = "vector-db"
Strategy = Literal["reindex", "snapshot", "import"]


def _preview(report: RecoveryReport, alias: str, current: str | None, collection: str) -> str:
    failed = report.failed_critical()
    lines = [
        f"## Switch alias `{alias}` to the rebuilt collection `{collection}`?",
        "",
        f"- **Strategy**: {report.facts.get('strategy')}; source: {report.recovery_target}",
        f"- **Alias now points to**: {current or 'nothing (collection lost)'}",
        f"- **Rebuilt collection**: {report.candidate.get('points') if report.candidate else '-'} points",
        "",
        "| Check | Result | Detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in report.checks]
    lines += [
        "",
        f"Approving moves `{alias}` to `{collection}` in one alias operation; "
        f"`{current or '-'}` is kept, not deleted. Rejecting keeps the rebuilt collection for inspection.",
        "" if not failed else f"**{len(failed)} critical check(s) failed.**",
    ]
    return "\n".join(lines)


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
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same alias to finish.
    """
    logger = get_run_logger()
    approvers = list(allowed_approvers or [])
    started = utcnow()
    detected = incident_detected_at or started
    report = RecoveryReport(
        scenario=SCENARIO, incident_id=incident_id or "unassigned", target=f"{qdrant_block}/{alias}",
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None,
        drill=drill, dry_run=dry_run, incident_detected_at=detected, started_at=started,
        recovery_target=strategy, rto_objective_seconds=0, rpo_objective_seconds=0,
        facts={"strategy": strategy},
    )
    try:
        with report.step("Preflight: validate inputs") as step:
            check_parameters()
            if detected.tzinfo is None:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} has no time zone; give a UTC offset")
            if detected > started:
                raise InvalidInput(f"incident_detected_at {detected.isoformat()} is in the future")
            check_name("alias", alias)
            if strategy not in ("reindex", "snapshot", "import"):
                raise InvalidInput(f"strategy {strategy!r} is not 'reindex', 'snapshot' or 'import'")
            if not 0 < min_recall <= 1:
                raise InvalidInput(f"min_recall {min_recall} must be in (0, 1]")
            if k < 1 or sample_queries < 1 or batch_size < 1:
                raise InvalidInput(f"k={k}, sample_queries={sample_queries}, batch_size={batch_size} must all be >= 1")
            if distance is not None and distance not in DISTANCES:
                raise InvalidInput(f"distance {distance!r} is not one of {', '.join(DISTANCES)}")
            check_approval_settings(approval_policy, approvers, approval_timeout_seconds, drill)
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            qdrant = load_block(QdrantCluster, qdrant_block)
            if approval_policy == "auto" and qdrant.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused for {qdrant_block!r}: its environment is production")
            if incident_id:
                check_name("incident id", incident_id)
            report.incident_id = incident_id or f"{alias}-{detected.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"
            check_name("collection", f"{report.incident_id}-r")
            step.detail = f"{strategy} into a new collection for alias {alias}; incident {report.incident_id}"

        with report.step("Preflight: alias and source") as step:
            if alias in list_collections(qdrant):
                raise InvalidInput(f"{alias!r} is a collection in {qdrant.location}, not an alias; applications must "
                                   "read through an alias so a recovery can replace what they read")
            current = describe_collection(qdrant, alias)
            source = _preflight_source(report, qdrant, alias, strategy, postgres_block, source_table, backup_key)
            vector_size = source["vector_size"] or (current.vector_size if current else None)
            chosen_distance = distance or (current.distance if current else None) or source.get("distance") or "Cosine"
            if not vector_size:
                raise InvalidInput("the vector size of the rebuilt collection is unknown: the source gives none")
            rebuild = f"{report.incident_id}-r"
            leftover = (current is None or current.name != rebuild) and require_replaceable(
                qdrant, rebuild, report.incident_id)
            if leftover:
                report.facts["leftover replaced"] = f"{rebuild}: an earlier attempt at incident {report.incident_id}"
            report.facts.update({"alias": alias, "collection before": current.name if current else "none",
                                 "points before": current.points if current else 0})
            step.detail = (f"alias {alias} -> {current.name + f' ({current.points} points)' if current else 'nothing'}; "
                           f"source {report.recovery_target}: {source['points']} points of {vector_size} dims")

        lock_target = f"qdrant-{qdrant_block}-{alias}"
        with recovery_lock(lock_target, lock_wait_seconds, runtime.flow_run.id) as lock:
            logger.info("Holding %s for incident %s", lock, report.incident_id)
            return _recover(report, qdrant, alias, strategy, current.name if current else None, source,
                            int(vector_size), chosen_distance, sample_queries, min_recall, k, batch_size,
                            approval_policy, approvers, approval_timeout_seconds, approval_poll_seconds, dry_run)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The recovery stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        publish_evidence(report)


def _preflight_source(report: RecoveryReport, qdrant: QdrantCluster, alias: str, strategy: str,
                      postgres_block: str | None, source_table: EmbeddingTable | None,
                      backup_key: str | None) -> dict:
    """Check the chosen source exists and is usable; returns what it holds."""
    source: dict = {"vector_size": None, "backup": None, "cluster": None, "table": source_table}
    if strategy in ("reindex", "snapshot"):
        if not postgres_block or source_table is None:
            raise InvalidInput(f"strategy {strategy!r} needs postgres_block and source_table "
                               "(the source of truth the result is verified against)")
        cluster = load_block(PostgresCluster, postgres_block)
        rows, dims = count_source_rows(cluster, source_table)
        if rows == 0:
            raise InvalidInput(f"source table {source_table.table!r} in {postgres_block!r} holds no embeddings")
        source.update(cluster=cluster, points=rows, vector_size=dims)
        report.recovery_target = f"{postgres_block}:{source_table.table}"
    if strategy in ("import", "snapshot"):
        if strategy == "snapshot" and qdrant.embedded:
            raise InvalidInput(f"strategy 'snapshot' needs a Qdrant server; {qdrant.location} is embedded. "
                               "Use 'reindex' or 'import'")
        backup: StoredBackup = find_backup(qdrant, alias, "export" if strategy == "import" else "snapshot", backup_key)
        if not backup.sha256:
            raise InvalidInput(f"backup {backup.key} has no recorded sha256; it cannot be verified")
        if backup.points is None:
            raise InvalidInput(f"backup {backup.key} has no recorded point count; it cannot be verified")
        source["backup"] = backup
        source["expected_points"] = backup.points
        if strategy == "import":
            source.update(points=backup.points)
            header = check_export(qdrant, backup)
            source.update(vector_size=header["vector_size"], distance=header["distance"])
        report.recovery_target = f"s3://{qdrant.backup_bucket.bucket_name}/{backup.key}"
        report.facts["backup"] = {"key": backup.key, "stored_at": backup.stored_at, "sha256": backup.sha256,
                                  "points": backup.points}
    return source


def _recover(report: RecoveryReport, qdrant: QdrantCluster, alias: str, strategy: str, current: str | None,
             source: dict, vector_size: int, distance: str, sample_queries: int, min_recall: float, k: int,
             batch_size: int, approval_policy: str, approvers: list[str], approval_timeout_seconds: int,
             approval_poll_seconds: float, dry_run: bool) -> State:
    collection = f"{report.incident_id}-r"
    backup: StoredBackup | None = source["backup"]
    if current == collection:
        with report.step("Resume: alias already switched") as step:
            step.detail = f"{alias} points to {collection} since an earlier run of this incident"
        if dry_run:
            report.plan = [f"alias {alias} already points to {collection}, switched by an earlier run of incident "
                           f"{report.incident_id}: a real run would rebuild and switch nothing",
                           f"post-checks through {alias}: it serves {collection} and holds as many points as the source"]
            report.outcome = "DryRun"
            report.summary = (f"Dry run: {alias} was already switched to {collection} for {report.incident_id}; "
                              "a real run would only confirm it. Nothing was changed.")
            return Completed(name="DryRun", message=report.summary)
        report.promotion = {"alias": alias, "previous": None, "current": collection, "already": True}
    else:
        report.plan = [
            f"create collection {collection} ({vector_size} dims, {distance}) beside {current or 'the lost collection'}",
            {"reindex": f"re-index {source['points']} rows of {report.recovery_target} in batches of {batch_size}",
             "import": f"import the export {report.recovery_target} after checking its sha256",
             "snapshot": f"recover the snapshot {report.recovery_target} on the server, checksum verified"}[strategy],
            f"verify: point count equals the source; recall@{k} of {sample_queries} sampled queries >= {min_recall}",
            "ask " + (", ".join(approvers) if approval_policy == "required" else "nobody (auto, drill)") + " to approve",
            f"alias {alias}: {current or 'none'} -> {collection} (atomic); keep {current or 'nothing'}",
        ]
        if dry_run:
            report.outcome = "DryRun"
            report.summary = "Dry run: the plan was recorded and nothing was changed."
            return Completed(name="DryRun", message=report.summary)

        with report.step("Rebuild beside the live collection") as step:
            if strategy == "reindex":
                create_collection(qdrant, collection, vector_size, distance, report.incident_id)
                written = reindex_from_postgres(qdrant, collection, source["cluster"], source["table"], batch_size)
            elif strategy == "import":
                written = import_collection(qdrant, collection, backup, report.incident_id)
            else:
                recover_snapshot(qdrant, collection, backup, report.incident_id)
                written = None
            rebuilt = describe_collection(qdrant, collection)
            report.candidate = {"collection": collection, "points": rebuilt.points, "written": written}
            step.detail = f"{collection}: {rebuilt.points} points"

        with report.step("Verify against the source") as step:
            checks = _verify(report, qdrant, collection, strategy, source, rebuilt.distance, sample_queries, min_recall, k)
            report.add_checks("rebuilt", checks)
            failed = report.failed_critical("rebuilt")
            step.outcome = "ok" if not failed else "failed"
            step.detail = "; ".join(f"{c.name}: {c.detail}" for c in checks)

        if report.failed_critical("rebuilt"):
            report.outcome = "VerificationFailed"
            report.summary = (f"The rebuilt collection {collection} failed verification; the alias {alias} was not "
                              f"moved and still points to {current or 'nothing'}.")
            report.action_items.append(f"inspect or delete collection {collection}")
            return Failed(name="VerificationFailed", message=report.summary)

        decision = approval_step(report, approval_policy, _preview(report, alias, current, collection), approvers,
                                 approval_timeout_seconds, approval_poll_seconds)
        if decision is None or not decision.approved:
            name = "ApprovalTimedOut" if decision is None else "Rejected"
            report.outcome = name
            report.summary = (f"The alias switch was {'not approved in time' if decision is None else 'rejected'}; "
                              f"{alias} still points to {current or 'nothing'}. {collection} is kept for inspection.")
            report.action_items.append(f"inspect or delete collection {collection}")
            return Failed(name=name, message=report.summary) if decision is None else Cancelled(name=name, message=report.summary)

        with report.step("Switch the alias") as step:
            previous = switch_alias(qdrant, alias, collection)
            report.promotion = {"alias": alias, "previous": previous, "current": collection,
                                "already": previous == collection}
            step.detail = f"{alias}: {previous or 'none'} -> {collection}"
        if current:
            report.action_items.append(f"delete the replaced collection {current} once the rebuilt one is trusted")

    with report.step("Post-checks through the alias") as step:
        served = describe_collection(qdrant, alias)
        if strategy == "reindex":
            expected = count_source_rows(source["cluster"], source["table"])[0]
        else:
            expected = source["expected_points"]
        checks = [
            CheckResult("alias serves the rebuilt collection", served is not None and served.name == collection,
                        f"{alias} -> {served.name if served else 'nothing'}"),
            CheckResult("populated", served is not None and served.points == expected,
                        f"{served.points if served else 0} points through {alias}, source {expected}"),
        ]
        report.add_checks("alias", checks)
        failed = report.failed_critical("alias")
        step.outcome = "ok" if not failed else "failed"
        step.detail = "; ".join(c.detail for c in checks)
    if report.failed_critical("alias"):
        report.outcome = "PostCheckFailed"
        report.summary = f"The alias {alias} was switched but post-checks failed; see Verification Results."
        return Failed(name="PostCheckFailed", message=report.summary)

    report.service_restored_at = utcnow()
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    if backup is not None:
        stored = datetime.fromisoformat(backup.stored_at)
        report.last_restored_commit = stored
        report.rpo_seconds = max(0.0, (report.incident_detected_at - stored).total_seconds())
    else:
        report.rpo_seconds = 0.0  # re-indexed from the source of truth as it is now
    report.outcome = "Recovered"
    report.summary = (f"Alias {alias} serves {collection}, rebuilt by {strategy} from {report.recovery_target} "
                      f"and verified against it.")
    return Completed(name="Recovered", message=report.summary)


def _verify(report: RecoveryReport, qdrant: QdrantCluster, collection: str, strategy: str, source: dict,
            distance: str, sample_queries: int, min_recall: float, k: int) -> list[CheckResult]:
    """Point count equals the source; sampled queries find the source's exact top-k."""
    rebuilt = describe_collection(qdrant, collection)
    if strategy == "reindex":
        expected, origin = count_source_rows(source["cluster"], source["table"])[0], "source table"
    else:
        expected, origin = source["expected_points"], "backup"
    checks = [CheckResult("point count", rebuilt.points == expected,
                          f"{rebuilt.points} points, {origin} holds {expected}")]
    if strategy == "import":
        queries, truth = exact_neighbours_in_export(qdrant, source["backup"], sample_queries, k, distance)
    else:
        queries, truth = exact_neighbours_in_postgres(source["cluster"], source["table"], sample_queries, k, distance)
    recall = sample_recall(qdrant, collection, queries, truth, k)
    report.facts[f"recall@{k}"] = round(recall.recall, 4)
    checks.append(CheckResult(
        f"recall@{k}", recall.recall >= min_recall,
        f"{recall.recall:.4f} over {recall.queries} sampled queries (worst {recall.worst:.2f}; minimum {min_recall})",
    ))
    return checks


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
