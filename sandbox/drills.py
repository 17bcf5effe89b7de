"""Drills on the sandbox: inject a real fault, run the recovery flow with the drill approval
policy, and check the result against what was committed before the fault.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone

from blocks import PostgresCluster, VerificationQuery
from sandbox import addresses, drill_apps, drill_ml, drill_region, drill_security, drill_storage, pgcluster
from sandbox.drillkit import DrillResult, save_report
from sandbox.drillkit import check as _check
from runbook.evidence import load_report

SEED_SQL = """
DROP SCHEMA IF EXISTS drill CASCADE;
CREATE SCHEMA drill;
CREATE TABLE drill.customers (id bigint PRIMARY KEY, email text NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE drill.orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES drill.customers,
                           amount_cents bigint NOT NULL, status text NOT NULL);
CREATE TABLE drill.payments (id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES drill.orders,
                             paid_cents bigint NOT NULL, reference text NOT NULL);
CREATE TABLE drill.ledger (id bigint PRIMARY KEY, note text NOT NULL, committed_at timestamptz NOT NULL DEFAULT clock_timestamp());
INSERT INTO drill.customers SELECT g, 'customer' || g || '@example.test', now() - (g || ' minutes')::interval
  FROM generate_series(1, {customers}) g;
INSERT INTO drill.orders SELECT g, 1 + (g % {customers}), 100 + (g * 37) % 100000,
  (ARRAY['new','paid','shipped','closed'])[1 + g % 4] FROM generate_series(1, {orders}) g;
INSERT INTO drill.payments SELECT g, g, 100 + (g * 37) % 100000, md5(g::text) FROM generate_series(1, {payments}) g;
CREATE INDEX ON drill.orders (customer_id);
CREATE INDEX ON drill.payments (order_id);
ANALYZE;
"""


def damage_page(lay: pgcluster.ClusterLayout, table: str, block: int = 1) -> str:
    """Overwrite part of one on-disk page of ``table`` while the primary is stopped (checksums catch it)."""
    relpath = pgcluster.psql(lay, lay.primary_port, f"CHECKPOINT; SELECT pg_relation_filepath('{table}')").splitlines()[-1]
    pgcluster.stop(lay.primary_dir)
    path = lay.primary_dir / relpath
    with open(path, "r+b") as fh:
        fh.seek(block * 8192 + 512)
        fh.write(os.urandom(256))
    pgcluster.start(lay.primary_dir)
    return str(path)


def _prune_kept_directories(lay: pgcluster.ClusterLayout, keep: int = 2) -> None:
    """Sandbox housekeeping: keep only the newest ``keep`` replaced primaries and candidates."""
    for pattern, base in (("primary.replaced-*", lay.root / "pg"), ("*", lay.recovery_dir)):
        kept = sorted((p for p in base.glob(pattern) if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in kept[:-keep]:
            for pid in old.glob("**/postmaster.pid"):
                pgcluster.stop(pid.parent, "immediate")
            shutil.rmtree(old, ignore_errors=True)


def db_corruption(rows: int = 100_000) -> DrillResult:
    """Seed >= ``rows`` rows, corrupt the database (a destructive transaction and a damaged page), recover."""
    from flows.db_corruption import db_corruption as recovery_flow

    info = addresses.info()
    lay = addresses.layout()
    _prune_kept_directories(lay)
    customers, orders = rows // 5, rows // 2
    payments = rows - customers - orders
    # Replaces whatever an earlier drill left, damaged pages included, before the replica is cloned.
    pgcluster.psql(lay, lay.primary_port, SEED_SQL.format(customers=customers, orders=orders, payments=payments))
    pgcluster.ensure_replica(lay)
    cluster = PostgresCluster.load(addresses.CLUSTER_BLOCK)
    cluster.backup("full")

    # Work that must survive: committed before the recovery target.
    pgcluster.psql(lay, lay.primary_port,
                   "INSERT INTO drill.ledger (id, note) SELECT g, 'before' FROM generate_series(1, 500) g")
    time.sleep(0.5)
    target = datetime.now(timezone.utc)
    time.sleep(0.5)
    # Work committed after the target: a point-in-time restore must not bring it back.
    pgcluster.psql(lay, lay.primary_port,
                   "INSERT INTO drill.ledger (id, note) SELECT g, 'after' FROM generate_series(501, 600) g")
    # The incident: a destructive transaction, then on-disk page damage.
    pgcluster.psql(lay, lay.primary_port,
                   "BEGIN; DELETE FROM drill.payments WHERE id % 3 = 0; UPDATE drill.customers SET email = 'x'; COMMIT")
    damaged = damage_page(lay, "drill.orders")
    detected = datetime.now(timezone.utc)

    queries = [
        VerificationQuery(name="orders intact", sql="SELECT count(*) FROM drill.orders", expected=str(orders)),
        VerificationQuery(name="payments intact", sql="SELECT count(*) FROM drill.payments", expected=str(payments)),
        VerificationQuery(name="no overwritten emails",
                          sql="SELECT count(*) FROM drill.customers WHERE email = 'x'", expected="0"),
    ]
    state = recovery_flow(
        cluster_block=addresses.CLUSTER_BLOCK,
        recovery_target=target.isoformat(),
        incident_detected_at=detected,
        verification_queries=queries,
        row_count_tables=["drill.customers", "drill.orders", "drill.payments", "drill.ledger"],
        approval_policy="auto",
        drill=True,
        return_state=True,
    )
    flow_run_id = str(state.state_details.flow_run_id)
    report = load_report(flow_run_id)
    report_path = save_report(info.root, flow_run_id)

    checks = [_check("flow outcome", report.outcome == "Recovered", f"{state.name}: {report.summary}")]
    if report.outcome == "Recovered":
        before = int(pgcluster.psql(lay, lay.primary_port, "SELECT count(*) FROM drill.ledger WHERE note = 'before'"))
        after = int(pgcluster.psql(lay, lay.primary_port, "SELECT count(*) FROM drill.ledger WHERE note = 'after'"))
        checks += [
            _check("rows committed before the target are back", before == 500, f"{before} of 500"),
            _check("rows committed after the target are absent", after == 0, f"{after} of 100 present"),
        ]
    damage = [c for c in report.checks if c.stage == "primary"]
    caught = bool(damage) and not damage[0].passed and "invalid page" in damage[0].detail
    checks.append(_check("page damage caught by checksums on the old primary", caught,
                         f"{damaged}: {damage[0].detail if damage else 'not assessed'}"))
    critical = [c for c in report.checks if c.critical and c.stage in ("restored", "endpoint")]
    checks.append(_check("restored instance verified", bool(critical) and all(c.passed for c in critical),
                         "; ".join(f"{c.name}: {c.detail}" for c in critical)))
    checks.append(_check("RTO within objective", bool(report.rto_met), f"{report.rto_seconds} s of {report.rto_objective_seconds} s"))
    checks.append(_check("RPO within objective", bool(report.rpo_met), f"{report.rpo_seconds} s of {report.rpo_objective_seconds} s"))
    if report.outcome == "Recovered":
        pgcluster.ensure_replica(lay)  # the old replica followed the corrupted timeline: clone it afresh
    return DrillResult(
        scenario="db-corruption",
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
    )


def vector_db(rows: int = 100_000) -> DrillResult:
    """The vector-DB drill at one point per 50 database rows, 200 to 5,000 points.

    Embedded Qdrant commits every point to disk (about 50 points/s here), so the drill is kept small.
    """
    return drill_ml.vector_db(rows=min(max(rows // 50, 200), 5_000))


def model_corruption(rows: int = 100_000) -> DrillResult:
    """The model-corruption drill; its golden-input count does not grow with the database rows."""
    return drill_ml.model_corruption()


def save_assurance_blocks(ep) -> None:
    """The sandbox's ``BackupSources`` block ``default``, read by the scheduled backup validation."""
    from blocks.backup_sources import BackupSources, ObjectPrefixSource, PgBackRestSource

    BackupSources(
        pgbackrest=[PgBackRestSource(cluster_block=addresses.CLUSTER_BLOCK)],
        object_prefixes=[
            # Qdrant exports keep their sha256 beside the export and model manifests list theirs:
            # neither is in the form the validator reads, so their checksums are checked by their flows.
            ObjectPrefixSource(kind="qdrant", bucket=drill_ml.QDRANT_BUCKET, prefix="qdrant/", critical=False,
                               require_checksum=False),
            ObjectPrefixSource(kind="models", bucket=drill_ml.MODELS_BUCKET, prefix="models/", critical=False,
                               require_checksum=False),
        ],
        aws_credentials=ep.aws_credentials(),
    ).save("default", overwrite=True)


# Every drill `dr drill` knows, in the order `dr drill all` runs them.
DRILLS = {
    "regional-outage": drill_region.regional_outage,
    "db-server-failure": drill_region.db_server_failure,
    "db-corruption": db_corruption,
    "security-breach": drill_security.security_breach,
    "app-rollback": drill_apps.app_rollback,
    "app-rollback-unhealthy-service": drill_apps.app_rollback_unhealthy_service,
    "object-storage": drill_storage.object_storage,
    "cache": drill_storage.cache,
    "model-corruption": model_corruption,
    "vector-db": vector_db,
}

# Called by `dr up` with the sandbox's service endpoints: each saves the blocks its drills and deployments use.
BLOCK_SAVERS = [drill_apps.save_blocks, drill_security.save_blocks, drill_storage.save_blocks, drill_ml.save_blocks, drill_region.save_blocks,
                save_assurance_blocks]
