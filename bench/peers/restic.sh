#!/usr/bin/env bash
# bench-caps: encrypted fsync
# restic: fresh repository in OUTDIR/repo (repo format v2, compression auto = zstd),
# backing up a sqlite3 ".backup" copy of the db plus the uploads folder. A second backup
# (BENCH_INCREMENTAL=1) goes into the same repository: restic finds the first as its parent
# (same host and paths) and re-reads only changed files; prune = forget --keep-last 1 --prune.
# Keys: BENCH_PASSPHRASE (repository password).
. "$(dirname "$0")/_common.sh"
check_args "$@"
need_cmd sqlite3 restic
need_env BENCH_PASSPHRASE
export RESTIC_PASSWORD=$BENCH_PASSPHRASE RESTIC_CACHE_DIR=$CACHES/restic-cache

case $CMD in
backup)
	export RESTIC_REPOSITORY=$DST/repo
	mkdir -p "$DST/.stage"
	[ -f "$DST/repo/config" ] || phase init restic init -q
	phase snapshot db_snapshot "$SRC/app.db" "$DST/.stage/app.db"
	phase archive restic backup -q --host bench --tag bench "$DST/.stage/app.db" "$SRC/uploads"
	printf 'DB=%s\nUPLOADS=%s\n' "$DST/.stage/app.db" "$SRC/uploads" >"$DST/paths.env"
	rm -rf "$DST/.stage"
	;;
restore)
	export RESTIC_REPOSITORY=$SRC/repo
	. "$SRC/paths.env"
	# restic authenticates every blob (MAC) while decrypting, so no separate checksum step
	phase extract restic restore -q latest --target "$DST/.r"
	mv "$DST/.r$DB" "$DST/app.db"
	mv "$DST/.r$UPLOADS" "$DST/uploads"
	rm -rf "$DST/.r"
	;;
prune)
	export RESTIC_REPOSITORY=$SRC/repo
	phase prune restic forget -q --keep-last 1 --prune
	;;
esac
