#!/usr/bin/env bash
# The database-corruption recovery as an operator would type it: the baseline the flow is measured against.
# Usage: plain_recovery.sh CONF PORT DATA_DIR RECOVERY_DIR TARGET NEW_PORT PGPASSFILE
set -euo pipefail
CONF=$1 PORT=$2 DATA=$3 RECOVERY=$4 TARGET=$5 NEW_PORT=$6
export PGPASSFILE=$7
BIN=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
q() { as_pg env PGPASSFILE="$PGPASSFILE" psql -X -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"; }
t() { date +%s.%N; }

# preflight: close and archive the current WAL segment, read the backups
q "$PORT" "SELECT pg_current_xact_id()" >/dev/null
SEG=$(q "$PORT" "SELECT pg_walfile_name(pg_switch_wal())")
until [ "$(q "$PORT" "SELECT coalesce(last_archived_wal, '') >= '$SEG' FROM pg_stat_archiver")" = t ]; do sleep 0.2; done
as_pg pgbackrest --config="$CONF" --stanza=main info --output=json >/dev/null
# assess the damage, fence writes
as_pg env PGPASSFILE="$PGPASSFILE" $BIN/pg_amcheck -h 127.0.0.1 -p "$PORT" -U postgres --all --install-missing --heapallindexed >/dev/null || true
q "$PORT" "ALTER SYSTEM SET default_transaction_read_only = on" >/dev/null
q "$PORT" "SELECT pg_reload_conf()" >/dev/null
q "$PORT" "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" >/dev/null
# restore beside, into a new data directory and port
NEW="$RECOVERY/plain/pgdata"
mkdir -p "$NEW" && chmod 700 "$NEW" && chown -R postgres:postgres "$RECOVERY"
R0=$(t)
as_pg pgbackrest --config="$CONF" --stanza=main --pg1-path="$NEW" --type=time "--target=$TARGET" \
  --target-action=promote --recovery-option=archive_mode=off --recovery-option=port="$NEW_PORT" restore
R1=$(t)
as_pg $BIN/pg_ctl start -w -D "$NEW" -l "$RECOVERY/plain/pgdata.log" -o "-p $NEW_PORT" >/dev/null
until [ "$(q "$NEW_PORT" "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ]; do sleep 0.3; done
echo "restore_window $R0 $R1"
# verify
as_pg env PGPASSFILE="$PGPASSFILE" $BIN/pg_amcheck -h 127.0.0.1 -p "$NEW_PORT" -U postgres --all --install-missing --heapallindexed >/dev/null
for table in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do q "$NEW_PORT" "SELECT count(*) FROM $table" >/dev/null; done
q "$NEW_PORT" "SELECT pg_last_xact_replay_timestamp()" >/dev/null
# promote: stop both, move the old primary aside, the restored one into place
as_pg $BIN/pg_ctl stop -w -m fast -D "$NEW" >/dev/null
as_pg $BIN/pg_ctl stop -w -m fast -D "$DATA" >/dev/null
mv "$DATA" "$DATA.replaced-plain"
mv "$NEW" "$DATA"
sed -i "/^port = /d; /^archive_mode = /d" "$DATA/postgresql.auto.conf"
printf "port = '%s'\narchive_mode = 'on'\n" "$PORT" >> "$DATA/postgresql.auto.conf"
as_pg $BIN/pg_ctl start -w -D "$DATA" -l "$DATA.log" >/dev/null
until [ "$(q "$PORT" "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ]; do sleep 0.3; done
# post-checks
q "$PORT" "SHOW default_transaction_read_only" >/dev/null
q "$PORT" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" >/dev/null
# archive the new timeline: its history file and the WAL written while archiving was off
CUR=$(q "$PORT" "SELECT pg_walfile_name(pg_current_wal_lsn())")
TLI=${CUR:0:8}
for f in "$DATA"/pg_wal/"$TLI"*; do
  n=$(basename "$f")
  if [ "$n" = "$TLI.history" ] || { [ ${#n} -eq 24 ] && [[ "$n" < "$CUR" ]]; }; then
    as_pg pgbackrest --config="$CONF" --stanza=main archive-push "$f"
  fi
done
q "$PORT" "SELECT pg_current_xact_id()" >/dev/null
SEG=$(q "$PORT" "SELECT pg_walfile_name(pg_switch_wal())")
until [ "$(q "$PORT" "SELECT coalesce(last_archived_wal, '') >= '$SEG' FROM pg_stat_archiver")" = t ]; do sleep 0.2; done
