#!/usr/bin/env bash
# bench-caps: encrypted fsync
# borg-vacuum: same as borg.sh, but snapshots the database with "VACUUM INTO"
# (a single read transaction) instead of the sqlite3 CLI's ".backup".
export BENCH_DB_SNAPSHOT=vacuum
exec "$(dirname "$0")/borg.sh" "$@"
