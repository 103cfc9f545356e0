#!/usr/bin/env bash
# bench-caps: encrypted fsync
# restic-vacuum: same as restic.sh, but snapshots the database with "VACUUM INTO"
# (a single read transaction) instead of the sqlite3 CLI's ".backup".
export BENCH_DB_SNAPSHOT=vacuum
exec "$(dirname "$0")/restic.sh" "$@"
