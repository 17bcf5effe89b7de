"""Database-corruption recovery: the flow's wall time against the same operations as a plain shell script.

Builds a pgbench database (scale ``BENCH_SCALE``, default 70: about 1 GB), backs it up, commits
past a recovery target, and snapshots the whole cluster. Each round restores the snapshot and
runs one method from the same state. Prints ``NAME: ratio=X goal<=Y`` and ``NAME: value=X UNIT``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sandbox import pgcluster  # noqa: E402
from sandbox.paths import free_port  # noqa: E402

SCALE = int(os.environ.get("BENCH_SCALE", "70"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def prepare(base: Path) -> tuple[pgcluster.ClusterLayout, datetime, int]:
    layout = pgcluster.ClusterLayout(base / "cluster", free_port(), None, "bench-password")
    pgcluster.build(layout, with_replica=False)
    log(f"loading pgbench scale {SCALE}")
    pgcluster._run([str(pgcluster.PG_BIN / "pgbench"), "-i", "-s", str(SCALE), "-q", "-h", "127.0.0.1",
                    "-p", str(layout.primary_port), "-U", "postgres", "postgres"],
                   env={"PGPASSFILE": str(layout.pgpass)}, timeout=1800)
    size = int(pgcluster.psql(layout, layout.primary_port, "SELECT pg_database_size('postgres')"))
    log(f"database size {size / 1e6:.0f} MB; full backup")
    pgcluster.pgbackrest(layout, "--type=full", "backup", timeout=1800)
    time.sleep(1.2)
    pgcluster.psql(layout, layout.primary_port, "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                   "SELECT 1, 1, g, 1, now() FROM generate_series(1, 1000) g")
    time.sleep(0.5)
    target = datetime.now(timezone.utc)
    time.sleep(0.5)
    pgcluster.psql(layout, layout.primary_port, "DELETE FROM pgbench_history")
    pgcluster.stop(layout.primary_dir)
    return layout, target, size


def reset(layout: pgcluster.ClusterLayout, snapshot: Path) -> None:
    pgcluster.stop_all(layout.root)
    shutil.rmtree(layout.root)
    subprocess.run(["cp", "-a", str(snapshot), str(layout.root)], check=True)
    pgcluster.start(layout.primary_dir)


def run_script(layout: pgcluster.ClusterLayout, target: datetime) -> tuple[float, float]:
    target_text = target.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "+00"
    started = time.perf_counter()
    proc = subprocess.run(
        [str(HERE / "plain_recovery.sh"), str(layout.pgbackrest_conf), str(layout.primary_port),
         str(layout.primary_dir), str(layout.recovery_dir), target_text, str(free_port()), str(layout.pgpass)],
        capture_output=True, text=True, timeout=3600,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"plain script failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    window = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("restore_window")][0]
    return elapsed, float(window[1]) - float(window[0])


def run_flow(layout: pgcluster.ClusterLayout, target: datetime, block_name: str) -> float:
    from flows.db_corruption import db_corruption

    started = time.perf_counter()
    state = db_corruption(
        cluster_block=block_name, recovery_target=target.isoformat(), incident_detected_at=datetime.now(timezone.utc),
        row_count_tables=TABLES, approval_policy="auto", drill=True, take_backup_after=False, return_state=True,
        incident_id=f"bench-{time.time_ns()}",
    )
    elapsed = time.perf_counter() - started
    if state.name != "Recovered":
        raise RuntimeError(f"flow ended {state.name}: {state.message}")
    return elapsed


def main() -> None:
    from prefect.testing.utilities import prefect_test_harness

    from blocks import PostgresCluster, PostgresInstance

    base = Path(tempfile.mkdtemp(prefix="dr-bench-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        layout, target, size = prepare(base)
        snapshot = base / "snapshot"
        subprocess.run(["cp", "-a", str(layout.root), str(snapshot)], check=True)
        with prefect_test_harness(server_startup_timeout=90):
            PostgresCluster(
                primary=PostgresInstance(port=layout.primary_port, data_directory=str(layout.primary_dir)),
                password=layout.password, socket_directory=str(layout.socket_dir),
                pgbackrest_config=str(layout.pgbackrest_conf), recovery_directory=str(layout.recovery_dir),
                environment="sandbox",
            ).save("bench", overwrite=True)
            script_times, flow_times, restores = [], [], []
            for round_no in range(ROUNDS):
                reset(layout, snapshot)
                elapsed, restore = run_script(layout, target)
                script_times.append(elapsed)
                restores.append(restore)
                log(f"round {round_no + 1}: script {elapsed:.2f} s (restore {restore:.2f} s)")
                reset(layout, snapshot)
                flow_times.append(run_flow(layout, target, "bench"))
                log(f"round {round_no + 1}: flow {flow_times[-1]:.2f} s")
        script, flow = statistics.median(script_times), statistics.median(flow_times)
        print(f"db_corruption_flow_vs_plain_script: ratio={flow / script:.2f} goal<=1.05 "
              f"(flow {flow:.1f} s, script {script:.1f} s, {size / 1e6:.0f} MB, median of {ROUNDS})")
        print(f"pitr_restore_throughput: value={size / 1e6 / statistics.median(restores):.0f} MB/s "
              f"(pgbackrest restore of {size / 1e6:.0f} MB in {statistics.median(restores):.1f} s)")
    finally:
        pgcluster.stop_all(base / "cluster")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
