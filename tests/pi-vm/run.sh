#!/usr/bin/env bash
# The Pi VM test (issue #13): DataVault's arm64 .deb on an emulated Raspberry-Pi-like machine
# (qemu-system-aarch64 -M virt -cpu cortex-a72, TCG) with a real LUKS2 USB drive, booted
# again and again: install as the README says, the first boot with no backup yet, a reboot
# (crypttab unlock, boot drill, agent), the 04:00 timer and a missed one (Persistent=), the
# drive unplugged mid-backup and plugged back, and power cuts (kill -9 of qemu) at random
# moments of backups, prunes and in-place restores, each checked at the next boot.
#
# Usage: sudo tests/pi-vm/run.sh [--trials N] [--min-trials N] [--deadline S] [--deb FILE]
#                                [--seed N] [--keep] [--only LIST]
#   --trials N   power-cut trials (default $PIVM_TRIALS, else 20)
#   --deadline S stop starting new trials when the next one would end the whole run after S
#                seconds (default: none); at least --min-trials (default 8) are run anyway
#   --deb FILE   the arm64 .deb (default: the newest dist/datavault_*_arm64.deb)
#   --seed N     seed of the random cut moments (default: the time; printed)
#   --keep       keep the work folder (target/pi-vm/run: disks, serial logs, results)
#   --only LIST  comma-separated subset of: boot,cuts (default both; cuts need boot first)
#
# Needs root, qemu-system-arm, qemu-user-static, debootstrap, device-tree-compiler (installed
# with apt-get when missing). The image comes from tests/pi-vm/build-image.sh (cached).
# Prints every check, each boot's time, the trial table, and ends with "N passed, M failed";
# exits non-zero on any failure. docs/pi-vm.md explains the machine and what is tested.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
trials=${PIVM_TRIALS:-20}
min_trials=8
deadline=0
deb=""
seed=""
keep=0
only="boot,cuts"
while [ $# -gt 0 ]; do
    case "$1" in
        --trials) trials=$2; shift 2 ;;
        --min-trials) min_trials=$2; shift 2 ;;
        --deadline) deadline=$2; shift 2 ;;
        --deb) deb=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        --only) only=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "pi-vm: unknown argument: $1" >&2; exit 2 ;;
    esac
done
for n in "$trials" "$min_trials" "$deadline"; do
    case "$n" in ''|*[!0-9]*) echo "pi-vm: --trials, --min-trials and --deadline take numbers" >&2; exit 2 ;; esac
done
[ "$(id -u)" = 0 ] || { echo "pi-vm: must run as root (debootstrap, qemu virtfs)" >&2; exit 2; }
seed=${seed:-$(date +%s)}
RANDOM=$seed

log() { echo "pi-vm: $*"; }
t_start=$(date +%s)

# --- host tools, image, .deb -----------------------------------------------------------------
need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v dtc >/dev/null || need+=(device-tree-compiler)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ -z "$deb" ]; then
    deb=$(find "$repo/dist" -maxdepth 1 -name 'datavault_*_arm64.deb' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -n 1 | cut -d' ' -f2-)
fi
[ -f "$deb" ] || { log "no .deb: build it with scripts/build-pi.sh (or pass --deb)"; exit 2; }
log "package $(basename "$deb") ($(stat -c %s "$deb") bytes), $trials power-cut trials, seed $seed"

t0=$(date +%s)
image=$(bash "$here/build-image.sh" | tail -n 1)
t_image=$(( $(date +%s) - t0 ))
log "image $image ($t_image s)"

work=$repo/target/pi-vm/run
rm -rf "$work"
mkdir -p "$work/share/ctl" "$work/share/out" "$work/boots"
cp --sparse=always "$image/root.img" "$work/root.img"
truncate -s 512M "$work/usb.img"
cp -r "$here/guest" "$work/share/guest"
cp "$repo/README.md" "$work/share/README.md"
cp "$deb" "$work/share/"
DEB=$(basename "$deb")
events=$work/share/out/events
: >"$events"

# The machine. -M virt has a PL061 GPIO controller: the device tree gets a gpio-leds node on
# its line 0 labelled ACT, so /sys/class/leds/ACT is a real kernel LED, as on a Pi, and its
# default trigger (disk-activity) stands in for the Pi's mmc0.
# shellcheck disable=SC2054 # commas inside qemu's option values
machine=(-M virt -cpu cortex-a72 -smp 2 -m 1024 -accel tcg,thread=multi -nic none)
qemu-system-aarch64 "${machine[@]}" -M virt,dumpdtb="$work/virt.dtb" -display none >/dev/null 2>&1
dtc -q -I dtb -O dts "$work/virt.dtb" >"$work/virt.dts"
phandle=$(awk '/pl061@/ { f = 1 } f && /phandle/ { gsub(/[<>;]/, ""); print $3; exit }' "$work/virt.dts")
[ -n "$phandle" ] || { log "no PL061 in the virt machine's device tree"; exit 1; }
sed -i '$d' "$work/virt.dts"
cat >>"$work/virt.dts" <<EOF

	leds {
		compatible = "gpio-leds";

		led-act {
			label = "ACT";
			gpios = <$phandle 0x00 0x00>;
			linux,default-trigger = "disk-activity";
			default-state = "off";
		};
	};
};
EOF
dtc -q -I dts -O dtb -o "$work/pi.dtb" "$work/virt.dts"

# The guest's clock: the host's plus an offset that the timer steps move forward (the guest
# never sees its clock go back, so retention and the clock checks behave).
clock_offset=0

qemu_pid=""
mon=""
boot_dir=""
ev_from=1
# boot STEP PARAMS...: starts the guest on its own (background) for STEP.
boot() {
    local step=$1
    shift
    boot_dir=$work/boots/$step
    mkdir -p "$boot_dir"
    echo "$step" >"$work/share/ctl/step"
    { echo "DEB=$DEB"; printf '%s\n' "$@"; } >"$work/share/ctl/params"
    ev_from=$(( $(wc -l <"$events") + 1 ))
    mon=$boot_dir/mon
    mkfifo "$mon.in" "$mon.out"
    local base
    base=$(date -u -d "@$(( $(date +%s) + clock_offset ))" +%FT%T)
    # exec: $! is qemu itself, so kill -9 is a power cut, not the end of a wrapper.
    exec qemu-system-aarch64 "${machine[@]}" -display none -no-reboot \
        -kernel "$image/vmlinuz" -initrd "$image/initrd.img" -dtb "$work/pi.dtb" \
        -append "root=/dev/vda rw console=ttyAMA0 quiet loglevel=3" \
        -rtc base="$base" \
        -drive if=none,id=sd,file="$work/root.img",format=raw \
        -device virtio-blk-pci,drive=sd,serial=sdcard,bus=pcie.0,addr=0x2 \
        -device pcie-root-port,id=usbport,bus=pcie.0,chassis=1,addr=0x3 \
        -blockdev driver=file,filename="$work/usb.img",node-name=usbfile \
        -blockdev driver=raw,file=usbfile,node-name=usb \
        -device virtio-blk-pci,drive=usb,id=usbdrive,serial=usbdrive,bus=usbport \
        -virtfs local,path="$work/share",mount_tag=pivm,security_model=none,id=pivm \
        -chardev pipe,id=mon0,path="$mon" -mon chardev=mon0,mode=readline \
        -serial file:"$boot_dir/serial.log" &
    qemu_pid=$!
    cat "$mon.out" >"$boot_dir/monitor.log" &
    boot_t0=$(date +%s.%N)
}
monitor() { printf '%s\n' "$*" >"$mon.in"; }
alive() { kill -0 "$qemu_pid" 2>/dev/null; }
# wait_event REGEX TIMEOUT_S [AFTER]: the first event of this boot (or after line AFTER of
# the events file) matching REGEX, printed.
wait_event() {
    wait_line "$events" "$1" "$2" "${3:-$((ev_from - 1))}"
}
# wait_line FILE REGEX TIMEOUT_S AFTER: the first line after line AFTER of FILE matching REGEX.
# The guest writes FILE through 9p: a line is there as soon as the guest wrote it.
wait_line() {
    local deadline=$(( SECONDS + $3 )) line
    while :; do
        if line=$(tail -n +"$(( $4 + 1 ))" "$1" 2>/dev/null | grep -m 1 -E "$2"); then echo "$line"; return 0; fi
        alive || return 2
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.02
    done
}
lines_of() { wc -l <"$1" 2>/dev/null || echo 0; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# Wait for qemu to exit (the guest powered off or rebooted) or kill it after TIMEOUT_S.
wait_exit() {
    local deadline=$(( SECONDS + $1 ))
    while alive; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            host_fail "$step_name: the guest did not power off within $1 s (killed)"
            kill -9 "$qemu_pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$qemu_pid" 2>/dev/null || true
}
power_cut() {
    kill -9 "$qemu_pid"
    wait "$qemu_pid" 2>/dev/null || true
}

passed=0
failed=0
host_ok() { passed=$((passed + 1)); echo "ok    [host] $*"; }
host_fail() { failed=$((failed + 1)); echo "FAIL  [host] $*"; }
# Print and count a step's results (the guest's ok/FAIL lines).
collect() {
    local step=$1 r=$work/share/out/$1/results n_ok n_fail
    if [ ! -f "$r" ]; then host_fail "$step: no results from the guest (see $work/boots/$step/serial.log)"; return; fi
    sed "s/^/  [$step] /" "$r"
    n_ok=$(grep -c '^ok' "$r" || true)
    n_fail=$(grep -c '^FAIL' "$r" || true)
    passed=$((passed + n_ok))
    failed=$((failed + n_fail))
    # A plain step ends with step-done; a cut step is cut after its cut-go (or at its end).
    if ! tail -n +"$ev_from" "$events" | grep -q -E "step-done $step |cut-go"; then
        host_fail "$step: the guest did not finish the step"
        tail -n 30 "$work/share/out/$step/log" 2>/dev/null | sed 's/^/    log: /'
    fi
}
boot_seconds() { awk -v a="$boot_t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }'; }
declare -a timings=()
timing() { timings+=("$1|$2"); echo "pi-vm: boot '$1' took $2 s"; }
# Seconds from the boot's start to the guest's first event (kernel + systemd + the runner).
boot_to_runner() {
    local l
    l=$(tail -n +"$ev_from" "$events" | grep -m 1 'step-start' | cut -d' ' -f1)
    [ -n "$l" ] && awk -v a="$boot_t0" -v b="$l" 'BEGIN { printf "%.1f", b - a }'
}

# A plain step: boot, let the guest run it to its end (poweroff or reboot), collect.
run_step() { # run_step STEP TIMEOUT_S
    step_name=$1
    log "boot: $1"
    boot "$1"
    wait_exit "$2"
    collect "$1"
    timing "$1" "$(boot_seconds)"
    log "  multi-user and the runner reached after $(boot_to_runner) s"
}

cleanup() {
    if [ -n "$qemu_pid" ] && alive; then kill -9 "$qemu_pid" 2>/dev/null || true; fi
    if [ "$keep" = 0 ] && [ "$failed" = 0 ]; then rm -f "$work/root.img" "$work/usb.img"; fi
}
trap cleanup EXIT

# --- functional boots -----------------------------------------------------------------------
if [[ ",$only," == *,boot,* ]]; then
    run_step install 900
    run_step first-boot 600
    run_step reboot 1200 # up to 10 min more when the guest clock is near 04:00 (main.sh)
    # The guest powered off after the timer run; boot again the next day at 05:30, after a
    # missed 04:00 (and, on a Sunday, after the weekly drill's 05:00, so that its catch-up runs
    # at boot, not in the middle of a step): the guest's clock said $(cat clock) when it stopped.
    guest_now=$(cat "$work/share/out/reboot/clock" 2>/dev/null || echo $(( $(date +%s) + clock_offset )))
    next=$(date -u -d "$(date -u -d "@$guest_now" +%F) + 1 day 05:30:00" +%s)
    clock_offset=$(( next - $(date +%s) ))
    log "boot: missed (guest clock $(date -u -d "@$next" +%FT%TZ): the 04:00 run was missed)"
    step_name=missed
    boot missed
    if line=$(wait_event 'unplug-now' 900); then
        monitor "device_del usbdrive"
        host_ok "missed: device_del usbdrive sent ($line)"
        if wait_event 'replug-now' 300 >/dev/null; then
            monitor "device_add virtio-blk-pci,drive=usb,id=usbdrive,serial=usbdrive,bus=usbport"
            host_ok "missed: device_add usbdrive sent"
        else
            host_fail "missed: the guest never asked for the drive back"
        fi
    else
        host_fail "missed: the guest never reached the unplug"
    fi
    wait_exit 600
    collect missed
    timing missed "$(boot_seconds)"
fi

# --- power cuts -----------------------------------------------------------------------------
# rand_ms MAX [MIN]: uniform MIN..MAX-1 ms (MIN defaults to 0).
rand_ms() {
    local lo=${2:-0} span=$(( $1 - ${2:-0} ))
    echo $(( lo + (RANDOM * 32768 + RANDOM) % (span > 0 ? span : 1) ))
}
# sleep_ms MS, unless the operation ends first: returns 1 if "op-done" came before.
cut_after_ms() {
    local until_ns=$(( $(date +%s%N) + $1 * 1000000 ))
    while [ "$(date +%s%N)" -lt "$until_ns" ]; do
        if tail -n +"$ev_from" "$events" | grep -q 'op-done'; then return 1; fi
        sleep 0.01
    done
}

declare -a table=()
if [[ ",$only," == *,cuts,* ]] && [ "$trials" -gt 0 ]; then
    kinds=(backup restore prune restore-swap)
    restore_ms=6000
    swap_ms=800
    prev=""
    series_t0=$(date +%s)
    for i in $(seq 0 "$trials"); do
        step_name=cut-$i
        if [ "$i" = "$trials" ]; then kind=final; else kind=${kinds[$(( i % ${#kinds[@]} ))]}; fi
        # Within the deadline: a trial boot and the final checking boot must still fit.
        if [ "$deadline" -gt 0 ] && [ "$i" -ge "$min_trials" ] && [ "$kind" != final ]; then
            per=$(( ($(date +%s) - series_t0) / i ))
            if [ $(( $(date +%s) - t_start + per * 5 / 2 )) -gt "$deadline" ]; then
                log "deadline: $i trials done (${per} s each); this boot is the last, checking one"
                kind=final
            fi
        fi
        log "boot: cut-$i (check the previous cut${prev:+ $prev}; next: $kind)"
        boot "cut-$i" "KIND=$kind" "PREV=$prev"
        if [ "$kind" = final ]; then
            wait_exit 600
            collect "cut-$i"
            timing "cut-$i" "$(boot_seconds)"
            break
        fi
        if [ -z "$prev" ]; then
            # The calibration restore, timed by the host: the whole restore, and its swap window
            # from datavault's "swapping in the restored data" line to the app's start marker.
            if wait_event 'calibrate-restore-go' 900 >/dev/null; then
                c_ev=$(lines_of "$events"); c_log=$(lines_of "$work/share/out/cut-$i/log"); c_t0=$(now_ms)
                if wait_line "$work/share/out/cut-$i/log" 'swapping in the restored data' 300 "$c_log" >/dev/null; then
                    c_t1=$(now_ms)
                    wait_event 'app-started' 120 "$c_ev" >/dev/null && swap_ms=$(( $(now_ms) - c_t1 ))
                fi
                wait_event 'calibrate-restore-done' 300 "$c_ev" >/dev/null && restore_ms=$(( $(now_ms) - c_t0 ))
                log "  calibration: a restore takes $restore_ms ms; from 'swapping in' to the app's start: $swap_ms ms"
            fi
        fi
        if ! go=$(wait_event 'cut-go' 900); then
            host_fail "cut-$i: the guest never reached the operation to cut"
            kill -9 "$qemu_pid" 2>/dev/null || true
            wait "$qemu_pid" 2>/dev/null || true
            collect "cut-$i"
            break
        fi
        go_log=$(lines_of "$work/share/out/cut-$i/log")
        est=$(grep -o 'est_ms=[0-9]*' <<<"$go" | cut -d= -f2 || true)
        case "$kind" in
            # The guest timed a backup a moment ago, and a dry-run prune (the same listing and
            # decisions, without the deletions). The first fifth of a backup is the process
            # starting, before the run is even recorded.
            backup) est=${est:-2000}; delay=$(rand_ms $(( est * 9 / 10 )) $(( est / 5 ))) ; aim="backup (took $est ms uncut)" ;;
            prune) est=${est:-1000}; delay=$(rand_ms $(( est * 13 / 10 )) $(( est / 3 ))) ; aim="prune (dry run took $est ms)" ;;
            restore) delay=$(rand_ms $(( restore_ms * 11 / 10 ))) ; aim="restore (took $restore_ms ms uncut)" ;;
            restore-swap)
                # From datavault's "swapping in the restored data" (logged just before the first
                # rename) to the app's start: the journaled swap and its commit.
                if wait_line "$work/share/out/cut-$i/log" 'swapping in the restored data' $(( restore_ms * 3 / 1000 + 30 )) "$go_log" >/dev/null; then
                    delay=$(rand_ms "$swap_ms")
                else
                    delay=0
                fi
                aim="the swap ($swap_ms ms window from 'swapping in')" ;;
        esac
        if cut_after_ms "$delay"; then cut_when="after $delay ms"; else cut_when="after the operation ended"; fi
        power_cut
        log "  power cut: $kind, aimed at the $aim, $cut_when"
        collect "cut-$i"
        timing "cut-$i" "$(boot_seconds)"
        table+=("$i|$kind|$delay|$cut_when")
        prev=cut-$i
    done
fi

# --- summary --------------------------------------------------------------------------------
out=$work/share/out
summary=$work/summary.md
{
    echo "## Pi VM run $(date -u +%FT%TZ), seed $seed"
    echo
    echo "Image: $(tr '\n' ' ' <"$image/info")"
    echo
    echo "| boot | seconds |"
    echo "|---|---|"
    for t in "${timings[@]}"; do echo "| ${t%%|*} | ${t#*|} |"; done
    echo
    for s in first-boot reboot missed; do
        [ -f "$out/$s/boot-drill-seconds" ] && echo "Boot drill at '$s': $(cat "$out/$s/boot-drill-seconds") s (TCG)."
    done
    if [ "${#table[@]}" -gt 0 ]; then
        echo
        echo "| trial | operation | cut | landed (catalog) | live data after the next boot | repaired at boot |"
        echo "|---|---|---|---|---|---|"
        for row in "${table[@]}"; do
            IFS='|' read -r n kind delay when <<<"$row"
            nxt=$out/cut-$((n + 1))
            landed=$(cat "$nxt/landing" 2>/dev/null || echo "?")
            outcome=$(cat "$nxt/outcome" 2>/dev/null || echo "unchanged")
            repaired=$(cat "$nxt/repaired-at-boot" 2>/dev/null || echo "-")
            echo "| $n | $kind | $when | $landed | $outcome | $repaired |"
        done
        echo
        for k in backup prune restore restore-swap; do
            tot=0; mid=0
            for row in "${table[@]}"; do
                IFS='|' read -r n kind _ _ <<<"$row"
                [ "$kind" = "$k" ] || continue
                tot=$((tot + 1))
                [ "$(cat "$out/cut-$((n + 1))/landing" 2>/dev/null)" = mid ] && mid=$((mid + 1))
            done
            [ "$tot" -gt 0 ] && echo "- $k: $tot trials, $mid cut mid-run (the catalog shows the run interrupted)"
        done
    fi
    echo
    echo "Total: $(( $(date +%s) - t_start )) s (image: $t_image s)."
} >"$summary"
cat "$summary"
mids=$(cat "$out"/cut-*/landing 2>/dev/null | grep -c '^mid$' || true)
if [ "${#table[@]}" -gt 0 ]; then
    # A cut that always lands before or after the operation proves nothing: at least a third
    # of the trials must have interrupted a run.
    if [ $(( mids * 3 )) -ge "${#table[@]}" ]; then host_ok "$mids of ${#table[@]} cuts interrupted a run"
    else host_fail "only $mids of ${#table[@]} cuts interrupted a run (want a third)"; fi
fi
log "serial logs, results and disks: $work"
echo "pi-vm: $passed passed, $failed failed"
[ "$failed" = 0 ]
