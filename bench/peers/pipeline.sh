#!/usr/bin/env bash
# bench-caps: encrypted
# pipeline: the well-built shell pipeline a careful admin would write.
#   sqlite3 .backup -> tar -c | zstd -T0 -$BENCH_ZSTD_LEVEL (default 3) | age -r RECIPIENT -> sha256sum
# Keys: BENCH_AGE_RECIPIENT (backup), BENCH_AGE_IDENTITY (restore, path to age identity file)
. "$(dirname "$0")/_common.sh"
check_args "$@"
need_cmd sqlite3 tar zstd age sha256sum
ARCHIVE=backup.tar.zst.age

case $CMD in
backup)
	need_env BENCH_AGE_RECIPIENT
	mkdir "$DST/.stage"
	phase snapshot db_snapshot "$SRC/app.db" "$DST/.stage/app.db"
	archive() {
		tar -cf - -C "$DST/.stage" app.db -C "$SRC" uploads |
			zstd -q -T0 "-${BENCH_ZSTD_LEVEL:-3}" |
			age -r "$BENCH_AGE_RECIPIENT" >"$DST/$ARCHIVE.part"
	}
	phase archive archive
	mv "$DST/$ARCHIVE.part" "$DST/$ARCHIVE"
	phase checksum sh -c 'cd "$1" && sha256sum "$2" >"$2.sha256"' _ "$DST" "$ARCHIVE"
	rm -rf "$DST/.stage"
	;;
restore)
	need_env BENCH_AGE_IDENTITY
	phase checksum sh -c 'cd "$1" && sha256sum --quiet --strict -c "$2.sha256"' _ "$SRC" "$ARCHIVE"
	extract() {
		age -d -i "$BENCH_AGE_IDENTITY" "$SRC/$ARCHIVE" | zstd -q -d -c | tar -xf - -C "$DST"
	}
	phase extract extract
	;;
esac
