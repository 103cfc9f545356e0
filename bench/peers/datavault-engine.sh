#!/usr/bin/env bash
# bench-caps: encrypted fsync
# datavault-engine: the deduplicated snapshot engine (src/store/dedup, #9) before the commands
# use it, through examples/dedup_bench.rs: the database via sqlite_dbpage in fixed 8 KiB
# chunks, uploads in FastCDC chunks, age per chunk, packs + index + tree + refs + manifest.
# State (chunk key, SQLite cache) in $BENCH_PEER_STATE (kept between the second-day backups).
# Binary: $DATAVAULT_ENGINE_BIN, default <repo>/target/release/examples/dedup_bench
#   (cargo build --release --example dedup_bench).
. "$(dirname "$0")/_common.sh"
check_args "$@"
need_env BENCH_AGE_RECIPIENT BENCH_AGE_IDENTITY
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${DATAVAULT_ENGINE_BIN:-$REPO/target/release/examples/dedup_bench}
[ -x "$BIN" ] || die "$BIN not found: cargo build --release --example dedup_bench"
BENCH_AGE_IDENTITY=$(realpath "$BENCH_AGE_IDENTITY")
export BENCH_AGE_IDENTITY
case $CMD in
backup) phase backup "$BIN" backup "$SRC" "$DST" "$CACHES" ;;
restore) phase restore "$BIN" restore "$SRC" "$DST" "$CACHES" ;;
prune) phase prune "$BIN" prune "$SRC" "$CACHES" ;;
esac
