#!/usr/bin/env bash
# bench-caps:
# clerivo: what the original Node backup.js does (no encryption, gzip):
#   PRAGMA wal_checkpoint(FULL) -> copy the db file -> tar.gz (db + uploads) -> sha256
#   -> JSON metadata beside the archive. Restore checks the sha256, then extracts.
# No keys needed.
. "$(dirname "$0")/_common.sh"
check_args "$@"
need_cmd sqlite3 tar gzip sha256sum
ARCHIVE=backup.tar.gz

case $CMD in
backup)
	mkdir "$DST/.stage"
	# Prisma/better-sqlite3 run the pragma with a 5 s busy timeout
	checkpoint() { sqlite3 -cmd ".timeout 5000" "$SRC/app.db" "PRAGMA wal_checkpoint(FULL);" >"$DST/.stage/ckpt"; }
	phase checkpoint checkpoint
	note checkpoint_busy_log_done "$(cat "$DST/.stage/ckpt")"
	phase copy cp "$SRC/app.db" "$DST/.stage/app.db"
	phase archive tar -czf "$DST/$ARCHIVE.part" -C "$DST/.stage" app.db -C "$SRC" uploads
	mv "$DST/$ARCHIVE.part" "$DST/$ARCHIVE"
	meta() {
		local sum size
		sum=$(sha256sum "$DST/$ARCHIVE" | cut -d' ' -f1)
		size=$(stat -c %s "$DST/$ARCHIVE")
		printf '{"file":"%s","sha256":"%s","size":%s,"created":"%s"}\n' \
			"$ARCHIVE" "$sum" "$size" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$DST/backup.json"
	}
	phase checksum meta
	rm -rf "$DST/.stage"
	;;
restore)
	want=$(sed -n 's/.*"sha256":"\([0-9a-f]*\)".*/\1/p' "$SRC/backup.json")
	[ -n "$want" ] || die "no sha256 in $SRC/backup.json"
	check() { [ "$(sha256sum "$SRC/$ARCHIVE" | cut -d' ' -f1)" = "$want" ] || die "checksum mismatch for $SRC/$ARCHIVE"; }
	phase checksum check
	phase extract tar -xzf "$SRC/$ARCHIVE" -C "$DST"
	;;
esac
