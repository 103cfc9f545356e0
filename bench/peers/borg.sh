#!/usr/bin/env bash
# bench-caps: encrypted fsync
# borg: fresh repository in OUTDIR/repo, repokey encryption, --compression zstd,$BENCH_ZSTD_LEVEL (default 3),
# backing up a sqlite3 ".backup" copy of the db plus the uploads folder. A second backup
# (BENCH_INCREMENTAL=1) adds an archive to the same repository (borg's files cache in
# $BENCH_PEER_STATE skips unchanged files); prune = prune --keep-last 1 + compact.
# Keys: BENCH_PASSPHRASE (repository passphrase).
. "$(dirname "$0")/_common.sh"
check_args "$@"
need_cmd sqlite3 borg
need_env BENCH_PASSPHRASE
export BORG_PASSPHRASE=$BENCH_PASSPHRASE BORG_BASE_DIR=$CACHES/borg \
	BORG_DISPLAY_PASSPHRASE=no BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

case $CMD in
backup)
	export BORG_REPO=$DST/repo
	mkdir -p "$DST/.stage"
	[ -d "$DST/repo" ] || phase init sh -c 'borg init --encryption=repokey 2>"$1/.stage/init.log"' _ "$DST"
	phase snapshot db_snapshot "$SRC/app.db" "$DST/.stage/app.db"
	phase archive borg create --compression "zstd,${BENCH_ZSTD_LEVEL:-3}" "::bench-{now:%Y%m%dT%H%M%S.%f}" "$DST/.stage/app.db" "$SRC/uploads"
	printf 'DB=%s\nUPLOADS=%s\n' "$DST/.stage/app.db" "$SRC/uploads" >"$DST/paths.env"
	rm -rf "$DST/.stage"
	;;
restore)
	export BORG_REPO=$SRC/repo
	. "$SRC/paths.env"
	# borg authenticates every chunk while decrypting, so no separate checksum step
	mkdir "$DST/.r"
	last=$(borg list --short --last 1)
	phase extract sh -c 'cd "$1/.r" && borg extract "::$2"' _ "$DST" "$last"
	mv "$DST/.r$DB" "$DST/app.db"
	mv "$DST/.r$UPLOADS" "$DST/uploads"
	rm -rf "$DST/.r"
	;;
prune)
	export BORG_REPO=$SRC/repo
	phase prune borg prune --keep-last 1
	phase compact borg compact
	;;
esac
