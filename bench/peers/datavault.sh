#!/usr/bin/env bash
# bench-caps: encrypted fsync drill
# datavault: this project's binary, configured like the pipeline peer it is compared with:
#   same zstd level ($BENCH_ZSTD_LEVEL, default 3), zstd threads $DATAVAULT_THREADS (default 1),
#   age to $BENCH_AGE_RECIPIENT, identity $BENCH_AGE_IDENTITY (must be mode 0600, ours).
#   backup:  datavault backup                 (one read transaction via sqlite_dbpage, tar ->
#            zstd -> age -> SHA-256 in one pass; fsyncs the archive, the manifest, the folder)
#   restore: datavault restore --to RESTOREDIR (verifies the archive SHA-256, age MAC, every
#            file against the inner manifest, integrity_check), then db/app.db -> app.db
#   drill:   datavault drill                   (extract into SCRATCHDIR, integrity_check, every
#            hash, the [drill] checks below; cleans up)
# The target is OUTDIR itself (require_mountpoint/require_luks off: it is a plain folder on the
# bench's loop filesystem). The state folder (catalog, lock, metrics) is
# $DATAVAULT_STATE_DIR, default $TMPDIR/datavault-state: the harness gives backup, restore and
# drill of one run the same TMPDIR, so they share a catalog like on the Pi.
# Binary: $DATAVAULT_BIN, default <repo>/target/release/datavault (run.sh builds it if missing).
# Snapshots (#9): DATAVAULT_SNAPSHOTS=1 appends $DATAVAULT_SNAPSHOT_TOML to the config (the
#   key that selects deduplicated snapshots; set the default below once the command has it);
#   DATAVAULT_EXTRA_TOML is appended in any case. In the second-day scenario the state folder
#   (catalog, chunk cache) lives in $BENCH_PEER_STATE, kept between the two backups, and
#   `prune` keeps the newest backup only (keep_last = 1).
# shellcheck disable=SC2034 # read by check_args in _common.sh
PEER_DRILL=1
. "$(dirname "$0")/_common.sh"
check_args "$@"
need_env BENCH_AGE_RECIPIENT BENCH_AGE_IDENTITY
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DV=${DATAVAULT_BIN:-$REPO/target/release/datavault}
[ -x "$DV" ] || die "$DV not found: build it with 'cargo build --release' in $REPO (bench/run.sh does) or set DATAVAULT_BIN"
IDENTITY=$(realpath "$BENCH_AGE_IDENTITY")
STATE=${DATAVAULT_STATE_DIR:-${BENCH_PEER_STATE:-${TMPDIR:-/tmp}}/datavault-state}
mkdir -p "$STATE"
STATE=$(realpath "$STATE")

# The config lives in the peer's state folder, which the second-day scenario keeps between
# the two backups: chunk.key (the snapshots' dedup key) is created beside it, and a new key
# would make the second backup a full copy.
CONFIG_DIR=$CACHES/datavault-config
mkdir -p "$CONFIG_DIR"

# config TARGET DATABASE UPLOADS [SCRATCH]: write $CONFIG_DIR/datavault.toml
config() {
	local drill_scratch=""
	[ -n "${4:-}" ] && drill_scratch="scratch_dir = \"$4\""
	cat >"$CONFIG_DIR/datavault.toml" <<EOF
# written by bench/peers/datavault.sh
[source]
database = "$2"
uploads = "$3"

[target]
path = "$1"
require_mountpoint = false
require_luks = false

[encryption]
recipients = ["$BENCH_AGE_RECIPIENT"]
identity = "$IDENTITY"

[compression]
level = ${BENCH_ZSTD_LEVEL:-3}
threads = ${DATAVAULT_THREADS:-1}

[drill]
# the writer's invariant (bench/writer.py): every transaction all-or-nothing
checks = ["SELECT CAST((SELECT value FROM settings WHERE key = 'writer_tx') AS INTEGER) = (SELECT count(*) FROM audit_log WHERE actor = 'bench-writer')"]
$drill_scratch

[state]
dir = "$STATE"
${RETENTION:-}
${DATAVAULT_EXTRA_TOML:-}
EOF
	if [ "${DATAVAULT_SNAPSHOTS:-0}" = 1 ]; then
		printf '%s\n' "${DATAVAULT_SNAPSHOT_TOML:-[store]
format = \"snapshots\"}" >>"$CONFIG_DIR/datavault.toml"
	fi
}
dv() { "$DV" --config "$CONFIG_DIR/datavault.toml" "$@"; }

case $CMD in
backup)
	config "$DST" "$SRC/app.db" "$SRC/uploads"
	phase backup dv --json backup --comment bench >"$SCRATCH/backup.json"
	cat "$SCRATCH/backup.json"
	;;
restore)
	# source.* are required keys but restore --to never reads them
	config "$SRC" "/nonexistent/bench-source/app.db" "/nonexistent/bench-source/uploads"
	phase restore dv --json restore --to "$DST" >"$SCRATCH/restore.json"
	cat "$SCRATCH/restore.json"
	# datavault restore --to gives db/<name> (+ uploads/); the contract wants app.db at the top
	shopt -s nullglob
	dbs=("$DST"/db/*.db)
	[ ${#dbs[@]} -eq 1 ] || die "expected exactly one database under $DST/db, found: $(ls -A "$DST/db" 2>&1)"
	name=$(basename "${dbs[0]}")
	for f in "$DST/db/$name" "$DST/db/$name-wal" "$DST/db/$name-shm"; do
		[ -e "$f" ] && mv "$f" "$DST/app.db${f#"$DST/db/$name"}"
	done
	rmdir "$DST/db" || die "unexpected files left in $DST/db: $(ls -A "$DST/db")"
	;;
drill)
	config "$SRC" "/nonexistent/bench-source/app.db" "/nonexistent/bench-source/uploads" "$DST"
	rc=0
	phase drill dv --json drill >"$SCRATCH/drill.json" || rc=$?
	cat "$SCRATCH/drill.json"
	secs=$(sed -n 's/.*"recovery_seconds": *\([0-9.eE+-]*\).*/\1/p' "$SCRATCH/drill.json" | head -1)
	[ -n "$secs" ] && note drill_recovery_seconds "$secs"
	[ $rc -eq 0 ] || die "datavault drill exited $rc"
	grep -q '"passed": *true' "$SCRATCH/drill.json" || die "drill did not report passed"
	;;
prune)
	RETENTION=$'[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0'
	config "$SRC" "/nonexistent/bench-source/app.db" "/nonexistent/bench-source/uploads"
	phase prune dv --json prune >"$SCRATCH/prune.json"
	cat "$SCRATCH/prune.json"
	;;
esac
