#!/usr/bin/env bash
# Usage: bench/offsite.sh [PROFILE]        (PROFILE: small | medium | large; default medium)
#
# Issue #10's push targets: `datavault offsite push` of a first backup against `rclone copy`
# of the same files to the same server (`rclone serve s3` on 127.0.0.1, a fresh prefix per
# run), interleaved repeats, medians; peak RSS of the push. Writes
# bench/results/offsite-PROFILE.md. The workload comes from make_workload.py (cached under
# $BENCH_DATA), rclone from scripts/get-rclone.sh.
#
# Environment: BENCH_DATA (default /tmp/datavault-bench-offsite), BENCH_REPEATS (3),
# DATAVAULT_BIN (default <repo>/target/release/datavault; build it first), BENCH_RESULTS,
# OFFSITE_FORMAT (archives, the default, or snapshots: the deduplicated store of #9; then also
# the second-day target: a push after bench/day2.py's change against what the store added,
# results in offsite-PROFILE-snapshots.md).
#
# Both tools talk plain http to loopback, so this measures their CPU and protocol cost, not a
# network: on a Pi behind a home uplink the link dominates and both go at its speed.
set -euo pipefail
export LC_ALL=C
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PROFILE=${1:-medium}
DATA=${BENCH_DATA:-/tmp/datavault-bench-offsite}
REPEATS=${BENCH_REPEATS:-3}
RESULTS=${BENCH_RESULTS:-$HERE/results}
DV=${DATAVAULT_BIN:-$REPO/target/release/datavault}
[ -x "$DV" ] || { echo "build $DV first: cargo build --release" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time: apt-get install time" >&2; exit 1; }
RCLONE=$(cd "$REPO" && realpath "$(bash scripts/get-rclone.sh 2>/dev/null | tail -n 1)")
mkdir -p "$DATA" "$RESULTS"
DATA=$(cd "$DATA" && pwd)

FORMAT=${OFFSITE_FORMAT:-archives}
case "$FORMAT" in archives|snapshots) ;; *) echo "OFFSITE_FORMAT: archives or snapshots" >&2; exit 2 ;; esac
WL=$DATA/workload/$PROFILE
if [ ! -f "$WL/workload.json" ]; then
    echo "generating workload '$PROFILE' in $WL ..."
    python3 "$HERE/make_workload.py" "$PROFILE" "$WL" --force
fi

AK=bench-offsite-access-key
SK=bench-offsite-secret-key-0123456789
[ -f "$DATA/id.txt" ] || "$DV" keygen --output "$DATA/id.txt" >/dev/null
RECIPIENT=$(sed -n 's/^# public key: //p' "$DATA/id.txt")
printf 'access_key_id = "%s"\nsecret_access_key = "%s"\n' "$AK" "$SK" >"$DATA/offsite.credentials"
chmod 600 "$DATA/offsite.credentials"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ENDPOINT=http://127.0.0.1:$PORT

config() { # PREFIX [WORKLOAD USB STATE]: writes $DATA/datavault.toml
    local wl=${2:-$WL} usb=${3:-$DATA/usb} state=${4:-$DATA/state}
    printf '%s\n' \
        "[source]" "database = \"$wl/app.db\"" "uploads = \"$wl/uploads\"" \
        "[target]" "path = \"$usb\"" "require_mountpoint = false" "require_luks = false" \
        "[encryption]" "recipients = [\"$RECIPIENT\"]" \
        "[state]" "dir = \"$state\"" \
        "[store]" "format = \"$FORMAT\"" \
        "[offsite]" "url = \"s3://bench/$1\"" "endpoint = \"$ENDPOINT\"" "path_style = true" \
        "credentials = \"$DATA/offsite.credentials\"" >"$DATA/datavault.toml"
}

# One backup: the "first backup" both tools send.
rm -rf "$DATA/usb" "$DATA/state" "$DATA/s3"
mkdir -p "$DATA/usb" "$DATA/s3/bench"
config none
"$DV" --config "$DATA/datavault.toml" -q backup >/dev/null
BYTES=$(find "$DATA/usb" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
FILES=$(find "$DATA/usb" -type f | wc -l)

"$RCLONE" serve s3 --addr "127.0.0.1:$PORT" --auth-key "$AK,$SK" "$DATA/s3" 2>"$DATA/rclone-serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT),0.1)" 2>/dev/null; do
    kill -0 "$SERVER" || { cat "$DATA/rclone-serve.log" >&2; exit 1; }
done

measure() { # NAME CMD...: appends "NAME wall_s rss_kib" to $DATA/runs
    local name=$1
    shift
    sync
    /usr/bin/time -f "%e %M" -o "$DATA/time.out" "$@" >/dev/null 2>"$DATA/$name.err" || {
        echo "$name failed:" >&2
        cat "$DATA/$name.err" >&2
        exit 1
    }
    echo "$name $(cat "$DATA/time.out")" >>"$DATA/runs"
}

: >"$DATA/runs"
for i in $(seq 1 "$REPEATS"); do
    config "dv$i"
    measure datavault "$DV" --config "$DATA/datavault.toml" -q offsite push
    measure rclone "$RCLONE" copy --config /dev/null "$DATA/usb" \
        ":s3,provider=Other,access_key_id=$AK,secret_access_key=$SK,endpoint='$ENDPOINT':bench/rc$i"
    rm -rf "$DATA/s3/bench/dv$i" "$DATA/s3/bench/rc$i"
done

# The second day (snapshots): a first backup and push, bench/day2.py's change on a copy of the
# workload, a second backup; then what the push sends against what that backup added.
DAY2="not measured: run with OFFSITE_FORMAT=snapshots"
DAY2V=-
if [ "$FORMAT" = snapshots ]; then
    rm -rf "$DATA/day2"
    mkdir -p "$DATA/day2/usb"
    cp -a "$WL" "$DATA/day2/wl"
    config d2 "$DATA/day2/wl" "$DATA/day2/usb" "$DATA/day2/state"
    "$DV" --config "$DATA/datavault.toml" -q backup >/dev/null
    "$DV" --config "$DATA/datavault.toml" -q offsite push >/dev/null
    python3 "$HERE/day2.py" "$DATA/day2/wl" >/dev/null
    ADDED=$("$DV" --config "$DATA/datavault.toml" -q --json backup | python3 -c 'import json,sys; print(json.load(sys.stdin)["added_bytes"])')
    SENT=$("$DV" --config "$DATA/datavault.toml" -q --json offsite push | python3 -c 'import json,sys; print(json.load(sys.stdin)["uploaded_bytes"])')
    D2RATIO=$(awk -v a="$SENT" -v b="$ADDED" 'BEGIN { printf "%.2f", a / b }')
    DAY2="${D2RATIO}x ($(awk -v b="$SENT" 'BEGIN { printf "%.1f MB", b / 1e6 }') sent, $(awk -v b="$ADDED" 'BEGIN { printf "%.1f MB", b / 1e6 }') added)"
    DAY2V=$(awk -v v="$D2RATIO" 'BEGIN { print (v <= 1.2) ? "**PASS**" : "**FAIL**" }')
    rm -rf "$DATA/day2"
fi

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
DVW=$(awk '$1 == "datavault" { print $2 }' "$DATA/runs" | median)
RCW=$(awk '$1 == "rclone" { print $2 }' "$DATA/runs" | median)
DVR=$(awk '$1 == "datavault" { print $3 }' "$DATA/runs" | sort -n | tail -n 1)
RCR=$(awk '$1 == "rclone" { print $3 }' "$DATA/runs" | sort -n | tail -n 1)
RATIO=$(awk -v a="$DVW" -v b="$RCW" 'BEGIN { printf "%.2f", a / b }')
RSSMIB=$(awk -v k="$DVR" 'BEGIN { printf "%.1f", k / 1024 }')
RCRSSMIB=$(awk -v k="$RCR" 'BEGIN { printf "%.1f", k / 1024 }')
verdict() { awk -v v="$1" -v t="$2" 'BEGIN { print (v <= t) ? "**PASS**" : "**FAIL**" }'; }
OUT=$RESULTS/offsite-$PROFILE.md
[ "$FORMAT" = archives ] || OUT=$RESULTS/offsite-$PROFILE-$FORMAT.md
{
    echo "# Offsite push vs rclone copy ($PROFILE)"
    echo
    echo "\`bench/offsite.sh $PROFILE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), $(nproc) cores."
    echo "Format: $FORMAT. One first backup: $FILES files, $(awk -v b="$BYTES" 'BEGIN { printf "%.1f MB", b / 1e6 }'), sent to \`rclone serve s3\` ($("$RCLONE" version | head -n 1)) on 127.0.0.1, a fresh prefix per run; $REPEATS interleaved repeats, medians."
    echo "datavault: $("$DV" --version), defaults (5 MiB parts, one in flight). rclone copy: its defaults (5 MiB chunks, 4 concurrent)."
    echo
    echo "| target | goal | measured | verdict |"
    echo "|---|---|---|---|"
    echo "| \`offsite push\` of a first backup vs \`rclone copy\` of the same files (wall) | <= 1.3x | ${RATIO}x ($DVW s vs $RCW s) | $(verdict "$RATIO" 1.3) |"
    echo "| peak RSS during a push (worst run) | <= 40 MiB | $RSSMIB MiB (rclone copy: $RCRSSMIB MiB) | $(verdict "$RSSMIB" 40) |"
    echo "| bytes sent after the dedup bench's second-day change vs what the store added | <= 1.2x | $DAY2 | $DAY2V |"
    echo
    echo "| run | tool | wall s | peak RSS KiB |"
    echo "|---|---|---|---|"
    awk '{ n[$1]++; printf "| %d | %s | %s | %s |\n", n[$1], $1, $2, $3 }' "$DATA/runs"
} >"$OUT"
cat "$OUT"
