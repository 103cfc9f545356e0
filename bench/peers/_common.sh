# Sourced by every peer script (files starting with "_" are not peers).
# Contract (see ../README.md):
#   NAME.sh backup  WORKDIR OUTDIR     back up WORKDIR/app.db (live, WAL mode) and
#                                      WORKDIR/uploads/ into OUTDIR (created empty)
#   NAME.sh restore OUTDIR  RESTOREDIR restore into RESTOREDIR/app.db + RESTOREDIR/uploads/
#   NAME.sh prune   OUTDIR             second-day scenario (BENCH_SCENARIO=day2): keep only the
#                                      newest backup in OUTDIR and give the space back
#   NAME.sh drill   OUTDIR  SCRATCHDIR only for peers that set PEER_DRILL=1 before sourcing
#                                      this file (and declare "drill" in their bench-caps line):
#                                      prove the backup restores, using SCRATCHDIR (created
#                                      empty) for anything extracted; leave the live data alone
# Exit 0 on success, non-zero on any failure (a restore must fail on a bad archive).
# BENCH_INCREMENTAL=1 (the second-day scenario): `backup` may find OUTDIR holding the first
# backup (add to it, like a nightly run), and $BENCH_PEER_STATE is a folder that survives
# between the runs of one peer (tool caches: what a real machine keeps between nights).
# A peer declares what it does in one comment line the harness reads (see ../README.md):
#   # bench-caps: encrypted fsync drill
set -euo pipefail
export LC_ALL=C
PEER=$(basename "$0" .sh)

die() { echo "$PEER: $*" >&2; exit 1; }
need_env() { for v in "$@"; do [ -n "${!v:-}" ] || die "environment variable $v is not set"; done; }
need_cmd() { for c in "$@"; do command -v "$c" >/dev/null || die "$c not found (run bench/setup.sh)"; done; }

# Scratch space for tool caches/config (restic cache, BORG_BASE_DIR); removed on exit.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/peer-$PEER.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
# Tool caches: per invocation, or kept between the two backups of the second-day scenario.
CACHES=${BENCH_PEER_STATE:-$SCRATCH}
mkdir -p "$CACHES"

# phase NAME CMD...: run CMD and, if BENCH_PHASE_LOG is set, append "NAME<TAB>seconds".
phase() {
	local name=$1 t0 t1
	shift
	t0=$EPOCHREALTIME
	"$@"
	t1=$EPOCHREALTIME
	if [ -n "${BENCH_PHASE_LOG:-}" ]; then
		awk -v a="$t0" -v b="$t1" -v n="$name" 'BEGIN { printf "%s\t%.4f\n", n, b - a }' >>"$BENCH_PHASE_LOG"
	fi
}
# note KEY VALUE: free-form observation for the harness (kept in the results JSON).
note() { if [ -n "${BENCH_PHASE_LOG:-}" ]; then printf 'note:%s\t%s\n' "$1" "$2" >>"$BENCH_PHASE_LOG"; fi; }

# db_snapshot SRC DST: consistent copy of a live SQLite database with the sqlite3 CLI.
#   BENCH_DB_SNAPSHOT=backup (default): ".backup" (online backup API, 100 pages per step)
#   BENCH_DB_SNAPSHOT=vacuum:           "VACUUM INTO" (one read transaction)
db_snapshot() {
	local src=$1 dst=$2
	case "${BENCH_DB_SNAPSHOT:-backup}" in
	backup) sqlite3 -bail -cmd ".timeout 5000" "$src" ".backup '$dst'" ;;
	vacuum) sqlite3 -bail -cmd ".timeout 5000" "$src" "VACUUM INTO '$dst'" ;;
	*) die "BENCH_DB_SNAPSHOT must be backup or vacuum" ;;
	esac
}

# check_args: validate the common command line, set CMD SRC DST.
check_args() {
	local usage="usage: $PEER.sh backup WORKDIR OUTDIR | restore OUTDIR RESTOREDIR | prune OUTDIR"
	[ "${PEER_DRILL:-0}" = 1 ] && usage+=" | drill OUTDIR SCRATCHDIR"
	if [ "${1:-}" = prune ] && [ $# -eq 2 ]; then
		CMD=prune SRC=$(realpath -m "$2") DST=
		[ -d "$SRC" ] || die "backup directory $SRC not found"
		return
	fi
	[ $# -eq 3 ] || die "$usage"
	CMD=$1 SRC=$(realpath -m "$2") DST=$(realpath -m "$3")
	case $CMD in
	backup)
		[ -f "$SRC/app.db" ] || die "$SRC/app.db not found"
		[ -d "$SRC/uploads" ] || die "$SRC/uploads not found"
		;;
	restore) [ -d "$SRC" ] || die "backup directory $SRC not found" ;;
	drill)
		[ "${PEER_DRILL:-0}" = 1 ] || die "this peer has no drill"
		[ -d "$SRC" ] || die "backup directory $SRC not found"
		;;
	*) die "unknown command '$CMD' ($usage)" ;;
	esac
	mkdir -p "$DST"
	[ "$CMD" = backup ] && [ "${BENCH_INCREMENTAL:-0}" = 1 ] && return
	[ -z "$(ls -A "$DST")" ] || die "$DST is not empty"
}
