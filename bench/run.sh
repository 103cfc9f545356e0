#!/usr/bin/env bash
# Usage: bench/run.sh PROFILE            (PROFILE: small | medium | large)
# Works from any current directory (paths are relative to this script).
# Generates the workload once (cached under $BENCH_DATA), then measures the peers in
# bench/peers/ (interleaved repeats, medians) and writes bench/results/PROFILE.{md,json}.
# Environment (all optional):
#   BENCH_DATA=/tmp/datavault-bench  scratch root for workloads, keys and runs (keep it in /tmp)
#   BENCH_PEERS=pipeline,datavault   comma-separated peer names (scripts in bench/peers/), or
#                                    "all" (adds clerivo, restic, borg and the -vacuum variants:
#                                    about 3x longer)
#   BENCH_BASELINE=pipeline          peer that ratios are computed against
#   BENCH_TARGET_PEER=datavault      peer the "Targets (issue #6)" table is about
#   BENCH_ZSTD_LEVEL=3               zstd level of pipeline, borg and datavault
#   DATAVAULT_BIN=<repo>/target/release/datavault   built with `cargo build --release` if missing
#   DATAVAULT_THREADS=1              datavault's compression.threads
#   BENCH_REPEATS=3                  interleaved repeats (>= 3 recommended)
#   BENCH_WRITER_RATE=200            writer transactions per second during the load pass
#   BENCH_LOAD_TIMEOUT_MIN=30        a backup under load is DNF after
#   BENCH_LOAD_TIMEOUT_FACTOR=3        max(MIN, FACTOR x its idle wall time) seconds
#   BENCH_RESULTS=bench/results      where PROFILE.md / PROFILE.json go
#   BENCH_SCENARIO=day2              the second day (issue #9): backup, bench/day2.py, backup into
#                                    the same OUTDIR, restore + verify, prune; peers
#                                    BENCH_DAY2_PEERS (restic,borg,datavault-engine), target peer
#                                    BENCH_DAY2_TARGET; results/PROFILE-day2.{md,json}
#   BENCH_DEST=loop                  loop: OUTDIRs on a loop-mounted ext4 image (a separate
#                                    filesystem, like the USB drive), restores and drills on a
#                                    second one (ext4 with its journal, like the Pi's SD card);
#                                    dir: both on the same filesystem as the workload
set -euo pipefail
export LC_ALL=C
STARTED=$(date +%s.%N)
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PEERS=${BENCH_PEERS:-pipeline,datavault}
export BENCH_ZSTD_LEVEL=${BENCH_ZSTD_LEVEL:-3}
PROFILE=${1:-}
case "$PROFILE" in small | medium | large) ;; *)
	echo "usage: $0 small|medium|large" >&2
	exit 2
	;;
esac
DATA=${BENCH_DATA:-/tmp/datavault-bench}
mkdir -p "$DATA/workload" "$DATA/keys"
DATA=$(cd "$DATA" && pwd)

"$HERE/setup.sh" --check 2>/dev/null || "$HERE/setup.sh"

# the datavault binary: built once if missing (never rebuilt here: build it yourself after
# changing the source, or point DATAVAULT_BIN at the binary to measure)
case ",$PEERS," in *,datavault,* | *,all,*)
	export DATAVAULT_BIN=${DATAVAULT_BIN:-$REPO/target/release/datavault}
	if [ ! -x "$DATAVAULT_BIN" ]; then
		[ "$DATAVAULT_BIN" = "$REPO/target/release/datavault" ] || {
			echo "DATAVAULT_BIN=$DATAVAULT_BIN is not an executable" >&2
			exit 1
		}
		echo "building $DATAVAULT_BIN (cargo build --release) ..."
		(cd "$REPO" && cargo build --release --bin datavault)
	fi
	echo "datavault: $("$DATAVAULT_BIN" --version) ($DATAVAULT_BIN)"
	;;
esac

# 1. workload: generated once per (profile, generator source); reused while unchanged
WL=$DATA/workload/$PROFILE
PRISTINE=$DATA/workload/$PROFILE.pristine.db
GEN_SUM=$(sha256sum "$HERE/make_workload.py" | cut -d' ' -f1)
if [ ! -f "$WL/workload.json" ] || [ ! -f "$PRISTINE" ] || [ "$(cat "$WL/.generator" 2>/dev/null)" != "$GEN_SUM" ]; then
	echo "generating workload '$PROFILE' in $WL ..."
	rm -f "$PRISTINE"
	python3 "$HERE/make_workload.py" "$PROFILE" "$WL" --force
	cp "$WL/app.db" "$PRISTINE.part" && mv "$PRISTINE.part" "$PRISTINE"
	echo "$GEN_SUM" >"$WL/.generator"
else
	echo "reusing workload in $WL"
fi

# 2. keys for the peers (see README: the peer contract)
[ -f "$DATA/keys/age.key" ] || age-keygen -o "$DATA/keys/age.key" 2>/dev/null
chmod 600 "$DATA/keys/age.key" # datavault refuses an identity readable by others
[ -f "$DATA/keys/passphrase" ] || head -c 24 /dev/urandom | base64 >"$DATA/keys/passphrase"
export BENCH_AGE_IDENTITY=$DATA/keys/age.key
BENCH_AGE_RECIPIENT=$(age-keygen -y "$BENCH_AGE_IDENTITY")
BENCH_PASSPHRASE=$(cat "$DATA/keys/passphrase")
export BENCH_AGE_RECIPIENT BENCH_PASSPHRASE

# 3. destination: like the Pi's USB drive, a separate ext4 filesystem (a loop-mounted image
#    file with direct I/O), so the peers' bulk writes and fsyncs do not share a journal
#    with the live database. BENCH_DEST=dir keeps OUTDIRs on the same filesystem instead.
#    Restores and drills go to a second one, ext4 with its journal like the Pi's SD card: the
#    filesystem under /tmp may have no journal (this project's CI machines mount their root
#    without one), and ext4 without a journal will not reuse an inode freed in the last 60-360 s
#    (ialloc.c, recently_deleted()), so each restore there scans past every file the previous
#    restore or drill deleted: measured 0.49 s for a fresh `tar -x` of the medium uploads, 0.91 s
#    and 1.15 s for the next two after an `rm -rf`, against 0.50 s each on a journaled ext4.
DEST=$DATA/dest
RESTORE_ROOT=$DATA/runs
DEST_DESC="a directory on the same filesystem as the database"
RESTORE_DESC="to $RESTORE_ROOT on the same filesystem as the database"
LOOPDEVS=()
MOUNTS=()
cleanup() {
	local m d
	for m in "${MOUNTS[@]}"; do
		if mountpoint -q "$m" 2>/dev/null; then umount "$m"; fi
	done
	for d in "${LOOPDEVS[@]}"; do losetup -d "$d" 2>/dev/null || true; done
	rm -f "$DATA/usb.img" "$DATA/sd.img"
}
# loop_fs IMAGE BYTES LABEL MOUNTPOINT: a fresh ext4 over a file, mounted; prints the loop
# device (the caller records it for cleanup: this runs in a subshell); undoes itself on failure
loop_fs() {
	local dev
	rm -f "$1"
	mkdir -p "$4"
	truncate -s "$2" "$1" && mkfs.ext4 -q -F -L "$3" "$1" || return 1
	dev=$(losetup -f --show --direct-io=on "$1" 2>/dev/null) || dev=$(losetup -f --show "$1") || return 1
	if ! mount -o noatime "$dev" "$4"; then
		losetup -d "$dev"
		return 1
	fi
	echo "$dev"
}
if [ "${BENCH_DEST:-loop}" = loop ]; then
	for m in "$DEST" "$DATA/sd"; do
		if mountpoint -q "$m" 2>/dev/null; then
			echo "$m is already mounted (another run?); set BENCH_DATA to a different directory" >&2
			exit 1
		fi
	done
	INPUT_BYTES=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["input_bytes"])' "$WL/workload.json")
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	if USBDEV=$(loop_fs "$DATA/usb.img" $((INPUT_BYTES * 5 / 2 + (512 << 20))) benchusb "$DEST"); then
		LOOPDEVS+=("$USBDEV")
		MOUNTS+=("$DEST")
		DEST_DESC="a separate ext4 filesystem (loop device $USBDEV over a file, $(((INPUT_BYTES * 5 / 2 + (512 << 20)) >> 20)) MiB, like the Pi's USB drive)"
		echo "destination: $DEST_DESC"
	else
		cleanup
		LOOPDEVS=()
		MOUNTS=()
		echo "warning: could not mount a loop filesystem; OUTDIRs go to $DEST on the same filesystem" >&2
	fi
	if [ ${#MOUNTS[@]} -gt 0 ] && SDDEV=$(loop_fs "$DATA/sd.img" $((INPUT_BYTES * 2 + (512 << 20))) benchsd "$DATA/sd"); then
		LOOPDEVS+=("$SDDEV")
		MOUNTS+=("$DATA/sd")
		RESTORE_ROOT=$DATA/sd
		RESTORE_DESC="to a second ext4 filesystem with its journal (loop device $SDDEV, like the Pi's SD card; the workload's own filesystem may have none, bench/run.sh says why)"
		echo "restores and drills: $RESTORE_ROOT"
	elif [ ${#MOUNTS[@]} -gt 0 ]; then
		echo "warning: could not mount a second loop filesystem; restores go to $RESTORE_ROOT" >&2
	fi
fi

# 4. measure (BENCH_SCENARIO=day2: the second-day scenario of issue #9, lib/day2.py)
if [ "${BENCH_SCENARIO:-}" = day2 ]; then
	python3 "$HERE/lib/day2.py" --profile "$PROFILE" --workload "$WL" --pristine "$PRISTINE" \
		--data "$DATA" --dest "$DEST" --restore-root "$RESTORE_ROOT" --results "${BENCH_RESULTS:-$HERE/results}" \
		--peers "${BENCH_DAY2_PEERS:-restic,borg,datavault-engine}" --target-peer "${BENCH_DAY2_TARGET:-datavault-engine}" \
		--repeats "${BENCH_REPEATS:-3}" --machine "$(nproc) cores, $(uname -r)"
	awk -v a="$STARTED" -v b="$(date +%s.%N)" 'BEGIN { printf "bench/run.sh total: %.0f s\n", b - a }'
	exit 0
fi
python3 "$HERE/lib/harness.py" --profile "$PROFILE" --workload "$WL" --pristine "$PRISTINE" \
	--data "$DATA" --dest "$DEST" --dest-desc "$DEST_DESC" \
	--restore-root "$RESTORE_ROOT" --restore-desc "$RESTORE_DESC" --results "${BENCH_RESULTS:-$HERE/results}" \
	--peers "$PEERS" --baseline "${BENCH_BASELINE:-pipeline}" --target-peer "${BENCH_TARGET_PEER:-datavault}" \
	--repeats "${BENCH_REPEATS:-3}" --rate "${BENCH_WRITER_RATE:-200}" --zstd-level "$BENCH_ZSTD_LEVEL" \
	--load-timeout-min "${BENCH_LOAD_TIMEOUT_MIN:-30}" --load-timeout-factor "${BENCH_LOAD_TIMEOUT_FACTOR:-3}" \
	--started "$STARTED"
awk -v a="$STARTED" -v b="$(date +%s.%N)" 'BEGIN { printf "bench/run.sh total: %.0f s\n", b - a }'
