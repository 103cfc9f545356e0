#!/usr/bin/env bash
# bench-caps: encrypted
# pipeline-vacuum: same as pipeline.sh, but snapshots the database with
# "VACUUM INTO" (a single read transaction) instead of the CLI's ".backup".
export BENCH_DB_SNAPSHOT=vacuum
exec "$(dirname "$0")/pipeline.sh" "$@"
