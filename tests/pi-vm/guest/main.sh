#!/bin/bash
# shellcheck disable=SC2015 # ok/fail/note always succeed: `test && ok || fail` is a safe if-else
# Guest side of the Pi VM test (tests/pi-vm/run.sh drives it from the host). Started at
# every boot by pivm-runner (baked into the image) from the 9p share /run/pivm; the host
# names the step in ctl/step and its parameters in ctl/params. Every check writes an ok/FAIL
# line the host counts; the host, not this script, decides pass or fail. See docs/pi-vm.md.
#
# Usage (by pivm-runner only): main.sh early|main
#
# Steps, in the order run.sh boots them:
#   install       the owner's app, then the README's install lines verbatim (as root, sudo
#                 kept) up to `doctor`; units enabled BEFORE the first backup; reboot
#   first-boot    the boot drill with no backup yet: no failure, no hook, LED and status say
#                 so; the README's first backup and drill; SIGUSR1 to the agent; reboot
#   reboot        the drive unlocks and mounts from crypttab, the boot drill passes on its
#                 own, the agent is up; the timer fires at 04:00 (guest clock set to 03:59:50)
#   missed        booted at 05:30 the next day: the missed 04:00 backup runs (Persistent=);
#                 the drive unplugged mid-backup (exit 3, nothing on the SD card, LED "drive
#                 missing", the hook), plugged back, the next run fine
#   cut-N         checks after the previous power cut, a new backup and drill, then the next
#                 operation to be cut (KIND=backup|prune|restore|restore-swap|final)
set -uo pipefail
here=$(dirname "$(readlink -f "$0")")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
phase=${1:-main}
step=$(cat "$share/ctl/step")
OUT=$share/out/$step
mkdir -p "$OUT"
KIND=""
PREV=""
# shellcheck disable=SC1091
[ -f "$share/ctl/params" ] && . "$share/ctl/params"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if [ "$phase" = early ]; then
    # Before datavault-drill.service and myapp.service: the data exactly as the cut left it.
    {
        echo "journal=$([ -e /var/lib/datavault/restore-journal.json ] && echo yes || echo no)"
        find /srv/app/data /srv/app/storage -maxdepth 1 -name '.datavault-*' -printf 'restore-folder=%p\n'
        [ -e "$APP_DB" ] || echo "database=missing"
        echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
    } >"$OUT/early"
    exit 0
fi

exec >>"$OUT/log" 2>&1
ev "step-start $step"
echo "=== $step ($(date -u +%FT%TZ), kernel $(uname -r))"

# --- shared checks -----------------------------------------------------------------------

# The drive came up from /etc/crypttab and /etc/fstab: a dm-crypt LUKS2 mapping on the
# virtio disk the host calls "usbdrive", mounted at /mnt/datavault.
check_drive_mounted() {
    local src num uuid
    src=$(findmnt -n -o SOURCE "$TARGET" 2>/dev/null)
    if [ "$src" = /dev/mapper/datavault ]; then ok "the drive is mounted at $TARGET from /dev/mapper/datavault"
    else fail "the drive is not mounted at $TARGET (findmnt: '${src:-nothing}')"; return 1; fi
    num=$(mountpoint -d "$TARGET")
    uuid=$(cat "/sys/dev/block/$num/dm/uuid" 2>/dev/null)
    case "$uuid" in CRYPT-LUKS2-*) ok "it is a LUKS2 mapping ($uuid)" ;; *) fail "not a LUKS2 mapping: '$uuid'" ;; esac
    local slave
    slave=$(ls "/sys/dev/block/$num/slaves" 2>/dev/null)
    [ "$slave" = "$(basename "$(readlink -f /dev/disk/by-id/virtio-usbdrive)")" ] \
        && ok "over the USB drive's disk ($slave)" || fail "over '$slave', not the USB drive's disk"
    check "systemd-cryptsetup@datavault.service is active (crypttab)" \
        test "$(systemctl is-active systemd-cryptsetup@datavault.service)" = active
}

check_boot_state() {
    local st
    st=$(boot_state)
    if [ "$st" = running ]; then ok "the boot finished: system running, no failed unit"
    else fail "the boot ended '$st'; failed units: $(systemctl list-units --failed --plain --no-legend | awk '{ print $1 }' | tr '\n' ' ')"; fi
}

# The OnFailure= hook ran in this boot for none of the units. (Listing the notify@ units is
# no proof: OnFailure= references load them, and loaded units are listed even if never run.)
check_no_hook() {
    local ran
    ran=$( { journalctl -b -q -t datavault-notify -o cat; journalctl -b -q -u 'datavault-notify@*' -o cat | grep -v '^$'; } 2>/dev/null | head -n 3)
    if [ -z "$ran" ]; then ok "the failure hook did not run"
    else fail "the failure hook ran: $(tr '\n' ' ' <<<"$ran")"; fi
}

check_boot_drill() { # check_boot_drill passed|nothing
    local res code since row
    res=$(unit_prop datavault-drill.service Result)
    code=$(unit_prop datavault-drill.service ExecMainStatus)
    [ "$res" = success ] && [ "$code" = 0 ] && ok "the boot drill unit ran and succeeded (exit 0)" \
        || fail "the boot drill unit: result '$res', exit '$code'"
    local t0 t1
    t0=$(unit_prop datavault-drill.service ExecMainStartTimestampMonotonic)
    t1=$(unit_prop datavault-drill.service ExecMainExitTimestampMonotonic)
    if [ "${t0:-0}" -gt 0 ] && [ "${t1:-0}" -gt "$t0" ]; then
        awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", (b - a) / 1e6 }' >"$OUT/boot-drill-seconds"
        note "the boot drill took $(cat "$OUT/boot-drill-seconds") s (TCG emulation: relative only)"
    fi
    since=$(date -u -d "@$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) - 5 ))" +%FT%T)
    row=$(sqlite3 /var/lib/datavault/catalog.db "SELECT status FROM runs WHERE command = 'drill' AND trigger = 'boot' AND started_at >= '$since' ORDER BY id DESC LIMIT 1;")
    case "$1" in
        passed)
            [ "$row" = SUCCESS ] && ok "the catalog has this boot's drill: SUCCESS" || fail "this boot's drill in the catalog: '$row'"
            journalctl -b -q -u datavault-drill.service | grep -q 'DRILL PASSED' \
                && ok "its journal says DRILL PASSED" || fail "its journal lacks DRILL PASSED" ;;
        nothing)
            [ "$row" = WARNING ] && ok "the catalog has this boot's drill: WARNING (nothing to drill)" || fail "this boot's drill in the catalog: '$row'"
            journalctl -b -q -u datavault-drill.service | grep -q 'no backup yet' \
                && ok "its journal says 'no backup yet'" || fail "its journal lacks 'no backup yet'" ;;
    esac
}

check_agent() {
    [ "$(systemctl is-active datavault-agent.service)" = active ] && ok "the agent is active (READY=1 received: Type=notify)" \
        || fail "the agent is $(systemctl is-active datavault-agent.service)"
    note "agent status text: '$(unit_prop datavault-agent.service StatusText)'"
}

check_led() { # check_led PATTERN TIMEOUT WHY
    local seen
    if seen=$(wait_led "$1" "$2"); then ok "the LED shows '$1' ($3)"; else fail "the LED shows '$seen', wanted '$1' ($3)"; fi
}

# --- README -----------------------------------------------------------------------------

# The README's install block, one command a line (a line ending in a backslash joined with
# the next, as the shell would), comments stripped.
readme_lines() {
    awk '/^## Install on a Raspberry Pi/ { f = 1 } f && /^```sh/ { b = 1; next } b && /^```/ { exit } b { print }' \
        "$share/README.md" | sed -e ':a' -e '/\\$/N; s/\\\n[[:space:]]*/ /; ta' \
        | sed 's/[[:space:]]\{2,\}#.*$//; s/[[:space:]]*$//' | grep -v '^$'
}

edit_config_as_the_owner() { # what the README's `sudoedit datavault.toml` line asks for
    local marker
    marker=$(grep -o 'target.marker_id = "[0-9a-f]*"' "$OUT/setup-usb.out" | head -n 1 | sed 's/.*= //')
    [ -n "$marker" ] && ok "setup-usb.sh printed the marker id line" || fail "no target.marker_id line in setup-usb.sh's output"
    # database, uploads, the service commands (systemctl stop/start myapp): the template's
    # paths and names are the app's here, so they stay. marker_id and [gpio] change.
    sed -i "s|^# marker_id = .*|marker_id = $marker|" "$CONFIG"
    sed -i 's|^act_led = false.*|act_led = true|; s|^# button_pin = 27.*|button_pin = 27|' "$CONFIG"
    grep -q "^marker_id = $marker" "$CONFIG" && grep -q '^act_led = true' "$CONFIG" \
        && ok "the config edited: marker_id, [gpio] act_led = true, button_pin = 27" || fail "the config edit did not apply"
}

# Runs README lines FROM..TO (1-based) as written, with the Pi's device and placeholders
# swapped for this machine's. Every line must exit 0.
run_readme() {
    local from=$1 to=$2 i=0 line cmd deb_named rc
    while IFS= read -r line; do
        i=$((i + 1))
        [ "$i" -ge "$from" ] && [ "$i" -le "$to" ] || continue
        cmd=$line
        case "$cmd" in
            *"./datavault_"*"_arm64.deb"*)
                deb_named=$(grep -o 'datavault_[^ ]*_arm64.deb' <<<"$cmd")
                [ "$deb_named" = "$DEB" ] && ok "the README names the package the build makes ($DEB)" \
                    || fail "the README names $deb_named, the build makes $DEB"
                cmd=${cmd//$deb_named/$DEB} ;;
        esac
        cmd=${cmd//\/dev\/sda/\/dev\/vdb}
        cmd=${cmd//\/somewhere\/OFF\/the\/pi/\/root\/off-the-pi}
        echo "+ README line $i: $cmd"
        rc=0
        case "$cmd" in
            "sudoedit /etc/datavault/datavault.toml") edit_config_as_the_owner ;;
            "sudoedit /etc/systemd/system/datavault-.service.d/paths.conf")
                # The example already names this app's folders (those of config/datavault.example.toml).
                grep -q '^ReadWritePaths=/srv/app/data /srv/app/storage$' /etc/systemd/system/datavault-.service.d/paths.conf \
                    && ok "paths.conf: ReadWritePaths=/srv/app/data /srv/app/storage (the folders of the database and of the uploads)" \
                    || fail "paths.conf lacks ReadWritePaths=/srv/app/data /srv/app/storage" ;;
            *setup-usb.sh*--dry-run*) bash -c "$cmd" </dev/null || rc=$? ;;
            # The confirmation is typed: the device name.
            *setup-usb.sh*) echo /dev/vdb | bash -c "$cmd" 2>&1 | tee "$OUT/setup-usb.out"; rc=${PIPESTATUS[1]} ;;
            *) bash -c "$cmd" </dev/null || rc=$? ;;
        esac
        [ "$rc" = 0 ] && ok "README: $line" || fail "README: $line (exit $rc)"
    done < <(readme_lines)
}

readme_line_of() { readme_lines | grep -n -- "$1" | head -n 1 | cut -d: -f1; }

# --- steps ------------------------------------------------------------------------------

step_install() {
    make_app
    ok "the app: $(sqlite3 "$APP_DB" 'SELECT count(*) FROM notes') rows, $(find "$APP_UPLOADS" -type f | wc -l) files, myapp.service $(systemctl is-active myapp)"
    [ -b /dev/vdb ] && [ "$(readlink -f /dev/disk/by-id/virtio-usbdrive)" = /dev/vdb ] \
        && ok "the blank USB drive is /dev/vdb" || fail "the USB drive is not /dev/vdb"
    cd /root || return
    cp "$share/$DEB" /root/
    readme_lines >"$OUT/readme-lines"
    local first_backup
    first_backup=$(readme_line_of 'datavault backup')
    [ -n "$first_backup" ] || { fail "no 'datavault backup' line in the README's install block"; return; }
    run_readme 1 $((first_backup - 1))
    check "the package is installed" dpkg -s datavault >/dev/null
    check "the drive is in /etc/crypttab" grep -q '^datavault UUID=' /etc/crypttab
    check "and in /etc/fstab" grep -q '^/dev/mapper/datavault /mnt/datavault ext4' /etc/fstab
    check "the marker is on the drive" test -s "$TARGET/.datavault-target"
    check "the USB key file is root-only (0400)" test "$(stat -c %a /etc/datavault/usb.key)" = 400
    check "the identity is 0600" test "$(stat -c %a /etc/datavault/identity.txt)" = 600
    # The careless (or install.sh) order: the units enabled before any backup exists, so the
    # next boot's drill finds nothing to drill.
    expect_exit 0 "units enabled before the first backup" \
        systemctl enable datavault-backup.timer datavault-drill.service datavault-agent.service
    echo "$first_backup" >"$OUT/first-backup-line"
}

step_first_boot() {
    check_boot_state
    check_drive_mounted
    check_boot_drill nothing
    check_no_hook
    check_agent
    journalctl -b -q -u datavault-agent.service | grep -q 'running without the button' \
        && ok "the agent says it runs without the button (button_pin 27: rppal finds no Raspberry Pi)" \
        || fail "the agent did not report the missing button"
    check_led steady-on 40 "no backup yet"
    note "ACT LED: trigger '$(grep -o '\[[^]]*\]' "$LED/trigger")', GPIO line: $(gpio_line)"
    datavault status | tee "$OUT/status-before.txt"
    grep -q 'no backup yet' "$OUT/status-before.txt" && ok "status says 'no backup yet'" || fail "status does not say 'no backup yet'"
    cd /root || return
    local from total
    from=$(cat "$share/out/install/first-backup-line")
    total=$(readme_lines | wc -l)
    run_readme "$from" "$total"
    check "status is healthy after the first backup and drill" sh -c 'datavault status | grep -q "status: OK"'
    # SIGUSR1: the agent starts a backup.
    local before row
    before=$(last_run_id)
    systemctl kill -s SIGUSR1 --kill-who=main datavault-agent.service
    note "LED right after SIGUSR1: $(led_pattern 1500)"
    if wait_until 120 sh -c "[ -n \"\$(sqlite3 /var/lib/datavault/catalog.db \"SELECT 1 FROM runs WHERE command = 'backup' AND id > $before AND status != 'RUNNING'\")\" ]"; then
        row=$(run_after backup manual "$before")
        [ "$(cut -d'|' -f2 <<<"$row")" = SUCCESS ] && ok "SIGUSR1 made the agent back up ($row)" || fail "the agent's backup: $row"
    else
        fail "no backup within 120 s of SIGUSR1"
    fi
    journalctl -b -q -u datavault-agent.service | grep -q 'starting Backup' && ok "the agent's journal shows the job" || fail "the agent's journal lacks the job"
    check_led single 40 "healthy after the backup"
    check_no_hook
}

step_reboot() {
    check_boot_state
    check_drive_mounted
    check_boot_drill passed
    check_agent
    check_led single 40 "healthy"
    check "the ACT LED is the agent's (trigger none)" grep -q '\[none\]' "$LED/trigger"
    check_no_hook
    # Stopping the agent gives the LED back to the kernel trigger it had.
    systemctl stop datavault-agent.service
    check "agent stopped: the LED's trigger is back ([disk-activity], the VM's mmc0)" grep -q '\[disk-activity\]' "$LED/trigger"
    systemctl start datavault-agent.service
    check "the agent starts again" test "$(systemctl is-active datavault-agent.service)" = active

    # The timer, on its own: the guest clock set to 03:59:50 of the next 04:00 still ahead.
    # Not always tomorrow's: before 04:00, today's 04:00 is the one the timer waits for, and
    # jumping past it to tomorrow makes the timer fire at once (a missed run), at 03:59:5x.
    # The test drop-in only zeroes RandomizedDelaySec (up to 10 min otherwise); OnCalendar=
    # is the shipped one.
    systemctl list-timers --all datavault-backup.timer
    mkdir -p /etc/systemd/system/datavault-backup.timer.d /etc/systemd/system/datavault-drill-weekly.timer.d
    printf '[Timer]\nRandomizedDelaySec=0\n' >/etc/systemd/system/datavault-backup.timer.d/pi-vm-test.conf
    # The weekly drill's catch-up (Persistent=) then fires at boot, ordered after the boot
    # drill and the backup, instead of at a random moment inside a later step of this test.
    printf '[Timer]\nRandomizedDelaySec=0\n' >/etc/systemd/system/datavault-drill-weekly.timer.d/pi-vm-test.conf
    systemctl daemon-reload
    local before day row started tod
    tod=$(date -u +%H%M%S)
    if [ $((10#$tod)) -ge 35800 ] && [ $((10#$tod)) -lt 40500 ]; then
        # Today's 04:00 is about to fire or has just fired: let it, then aim at tomorrow's.
        note "the guest clock is near 04:00 ($tod): waiting for today's run to pass"
        wait_until 600 bash -c '[ $((10#$(date -u +%H%M%S))) -ge 40500 ]' || true
        wait_until 300 sh -c '! systemctl is-active -q datavault-backup.service' || true
    fi
    tod=$(date -u +%H%M%S)
    if [ $((10#$tod)) -lt 35800 ]; then day=$(date -u +%F); else day=$(date -u -d tomorrow +%F); fi
    before=$(last_run_id)
    date -u -s "$day 03:59:50" >/dev/null
    ev "clock set to $day 03:59:50"
    systemctl list-timers --all datavault-backup.timer
    if wait_until 150 sh -c "[ -n \"\$(sqlite3 /var/lib/datavault/catalog.db \"SELECT 1 FROM runs WHERE command = 'backup' AND trigger = 'timer' AND id > $before AND status != 'RUNNING'\")\" ]"; then
        row=$(run_after backup timer "$before")
        started=$(cut -d'|' -f3 <<<"$row")
        [ "$(cut -d'|' -f2 <<<"$row")" = SUCCESS ] && ok "the timer's backup succeeded ($row)" || fail "the timer's backup: $row"
        case "$started" in
            "${day}T04:00:"*) ok "it started at 04:00 on its own ($started)" ;;
            *) fail "it started at $started, not at ${day}T04:00" ;;
        esac
        check "datavault-backup.service result success" test "$(unit_prop datavault-backup.service Result)" = success
    else
        fail "no timer backup within 150 s of 03:59:50"
    fi
    check_no_hook
    date +%s >"$OUT/clock"
}

step_missed() {
    check_boot_state
    note "booted at $(date -u +%FT%TZ) (guest clock): 04:00 was missed while off"
    check_drive_mounted
    check_boot_drill passed
    local boot_at row
    boot_at=$(date -u -d "@$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) ))" +%FT%T)
    if wait_until 180 sh -c "[ -n \"\$(sqlite3 /var/lib/datavault/catalog.db \"SELECT 1 FROM runs WHERE command = 'backup' AND trigger = 'timer' AND started_at >= '$boot_at' AND status != 'RUNNING'\")\" ]"; then
        row=$(sqlite3 /var/lib/datavault/catalog.db "SELECT id, status, started_at FROM runs WHERE command = 'backup' AND trigger = 'timer' AND started_at >= '$boot_at' ORDER BY id LIMIT 1")
        [ "$(cut -d'|' -f2 <<<"$row")" = SUCCESS ] && ok "the missed 04:00 backup ran after boot (Persistent=true): $row" || fail "the catch-up backup: $row"
    else
        fail "no catch-up backup within 180 s of boot"
    fi
    # The weekly drill's catch-up, when a Sunday 05:00 fell before this boot: its unit is
    # ordered after the boot drill and the backup, so it comes last and the steps below wait
    # for it (a drill holding the lock would make their backup exit 75).
    local weekly_ended wrow
    weekly_ended() { ! systemctl is-active -q datavault-drill-weekly.service \
        && ! systemctl list-jobs --no-legend | grep -q datavault-drill-weekly; }
    wait_until 300 weekly_ended || fail "the weekly drill's catch-up did not end within 300 s"
    wrow=$(sqlite3 /var/lib/datavault/catalog.db "SELECT id, status, started_at FROM runs WHERE command = 'drill' AND trigger = 'timer' AND started_at >= '$boot_at' ORDER BY id LIMIT 1")
    if [ -z "$wrow" ]; then
        note "the weekly drill had no catch-up at this boot (no Sunday 05:00 since its timer first ran)"
    elif [ "$(cut -d'|' -f2 <<<"$wrow")" = SUCCESS ] && [ "$(cut -d'|' -f1 <<<"$wrow")" -gt "$(cut -d'|' -f1 <<<"${row:-0}")" ]; then
        ok "the weekly drill's catch-up ran after the boot drill and the catch-up backup: $wrow ($(journalctl -b -q -u datavault-drill-weekly.service -o cat | grep -E 'DRILL PASSED|nothing new to prove' | tail -n 1))"
    else
        fail "the weekly drill's catch-up: $wrow (the catch-up backup: $row)"
    fi
    note "timer: last trigger $(unit_prop datavault-backup.timer LastTriggerUSec)"
    check_agent
    check_led single 45 "healthy"
    check_no_hook
    step_unplug
}

step_unplug() {
    local blk pid rc
    blk=$(basename "$(readlink -f /dev/disk/by-id/virtio-usbdrive)")
    # A 24 MB upload makes the backup last long enough to be caught mid-archive.
    head -c 24000000 /dev/urandom >"$APP_UPLOADS/video.bin"
    datavault backup --trigger manual >"$OUT/unplug-backup.out" 2>&1 &
    pid=$!
    # A file being written is `NAME.partial`: an archive at the top, or a snapshot's pack
    # under store/packs/ (the template's format).
    local i=0 partial=""
    until partial=$(find "$TARGET" -xdev -name '*.partial' -print -quit 2>/dev/null) && [ -n "$partial" ]; do
        i=$((i + 1)); [ "$i" -lt 5000 ] && kill -0 "$pid" 2>/dev/null || break
    done
    kill -STOP "$pid" 2>/dev/null
    if [ -n "$partial" ]; then ok "a backup is mid-write (${partial#"$TARGET"/})"
    else fail "could not catch the backup mid-write"; fi
    ev "unplug-now $blk"
    if wait_until 60 test ! -e "/sys/block/$blk"; then ok "the drive is gone ($blk unplugged by the host: device_del)"
    else fail "the drive did not go away"; fi
    kill -CONT "$pid" 2>/dev/null
    rc=0; wait "$pid" || rc=$?
    cat "$OUT/unplug-backup.out"
    [ "$rc" = 3 ] && ok "the backup exits 3 (target not ready)" || fail "the backup exited $rc, wanted 3"
    grep -q 'target' "$OUT/unplug-backup.out" && ok "its message: $(grep 'error' "$OUT/unplug-backup.out" | tail -n 1)" || true
    rm -f "$APP_UPLOADS/video.bin"
    findmnt "$TARGET" || true
    note "after the unplug: $(findmnt -n -o SOURCE,OPTIONS "$TARGET" 2>/dev/null || echo "$TARGET not mounted"); cryptsetup unit $(systemctl is-active systemd-cryptsetup@datavault.service)"
    # Nothing went to the SD card: look under whatever is still mounted there.
    mkdir -p /run/rootview && mount --bind / /run/rootview
    local under
    under=$(ls -A /run/rootview/mnt/datavault 2>&1)
    [ -z "$under" ] && ok "nothing was written to the SD card's /mnt/datavault" || fail "the SD card's /mnt/datavault holds: $under"
    umount /run/rootview
    datavault status >"$OUT/status-unplugged.txt" 2>&1
    cat "$OUT/status-unplugged.txt"
    grep -q 'NEEDS ATTENTION' "$OUT/status-unplugged.txt" && ok "status: NEEDS ATTENTION ($(grep -m1 'target' "$OUT/status-unplugged.txt" | sed 's/^ *//'))" \
        || fail "status does not flag the missing drive"
    check_led double 45 "drive missing"
    # The units fail with exit 3 (not 2: in their sandbox, ReadWritePaths= bind-mounts the
    # empty folder onto itself), and the hook reports it. Both wait for the drive first (the
    # mount's 90 s device timeout): started together, they wait once.
    systemctl start --no-block datavault-drill.service datavault-backup.service
    both_ended() { ! systemctl is-active -q datavault-drill.service datavault-backup.service \
        && ! systemctl list-jobs --no-legend | grep -q -E 'datavault-(drill|backup)'; }
    wait_until 240 both_ended || fail "the drill and backup units did not end within 240 s"
    [ "$(unit_prop datavault-drill.service ExecMainStatus)" = 3 ] && ok "datavault-drill.service exits 3 without the drive" \
        || fail "datavault-drill.service: exit $(unit_prop datavault-drill.service ExecMainStatus), result $(unit_prop datavault-drill.service Result)"
    [ "$(unit_prop datavault-backup.service ExecMainStatus)" = 3 ] && ok "datavault-backup.service exits 3 without the drive" \
        || fail "datavault-backup.service: exit $(unit_prop datavault-backup.service ExecMainStatus), result $(unit_prop datavault-backup.service Result)"
    if wait_until 30 sh -c 'journalctl -b -q -t datavault-notify | grep -q "datavault-backup.service failed"'; then
        ok "the failure hook reported it: $(journalctl -b -q -t datavault-notify -o cat | grep datavault-backup | tail -n 1 | cut -c1-90)..."
    else
        fail "the failure hook did not report the failed backup"
    fi
    systemctl reset-failed 'datavault-notify@*' datavault-backup.service datavault-drill.service 2>/dev/null

    ev "replug-now"
    if wait_until 60 test -e /dev/disk/by-id/virtio-usbdrive; then ok "the drive is back ($(readlink -f /dev/disk/by-id/virtio-usbdrive), device_add)"
    else fail "the drive did not come back"; return; fi
    udevadm settle
    sleep 2
    note "after the replug: $(findmnt -n -o SOURCE,OPTIONS "$TARGET" 2>/dev/null || echo "$TARGET not mounted"); cryptsetup unit $(systemctl is-active systemd-cryptsetup@datavault.service)"
    # The next run, as the timer would start it.
    systemctl start datavault-backup.service
    if [ "$(unit_prop datavault-backup.service Result)" = success ]; then ok "the next backup run (the unit) succeeds"
    else
        fail "the next backup run fails: exit $(unit_prop datavault-backup.service ExecMainStatus); $(journalctl -b -q -u datavault-backup.service -o cat | grep error | tail -n 1)"
    fi
    check_drive_mounted
    check "verify --all after the replug" datavault verify --all
    check_led single 45 "healthy again"
}

# --- power cuts ---------------------------------------------------------------------------

check_after_cut() {
    local pdir=$share/out/$PREV kind id_before hash_before old new h row st err
    kind=$(cat "$pdir/kind")
    id_before=$(cat "$pdir/id-before")
    check_boot_state
    check_drive_mounted
    check_boot_drill passed
    check_no_hook
    check "the live database passes integrity_check" test "$(sqlite3 "$APP_DB" 'PRAGMA integrity_check')" = ok
    check "the catalog passes integrity_check" test "$(sqlite3 /var/lib/datavault/catalog.db 'PRAGMA integrity_check')" = ok
    h=$(state_hash)
    case "$kind" in
        restore*)
            old=$(cat "$pdir/hash-old"); new=$(cat "$pdir/hash-new")
            if [ "$h" = "$old" ]; then ok "live data is exactly the old state"; echo old >"$OUT/outcome"
            elif [ "$h" = "$new" ]; then ok "live data is exactly the restored state"; echo restored >"$OUT/outcome"
            else fail "live data is neither the old ($old) nor the restored ($new) state: $h"; echo mixed >"$OUT/outcome"; fi
            if [ "$(sed -n 's/^journal=//p' "$OUT/early")" = yes ]; then
                note "the boot found the restore journal (the cut fell in the journaled stop/swap/start): the boot drill's run repaired it"
                echo yes >"$OUT/repaired-at-boot"
            fi ;;
        *)
            hash_before=$(cat "$pdir/hash-before")
            [ "$h" = "$hash_before" ] && ok "live data unchanged by the cut $kind" || fail "live data changed by a $kind: $h vs $hash_before" ;;
    esac
    check "myapp is running" test "$(systemctl is-active myapp.service)" = active
    local leftovers kept told k
    # A cut in the middle of the swap, then a reboot: the app came up on whatever stood at
    # the live paths before datavault's repair put the previous data back, so the repair
    # keeps that (restored data the app may have written to) in .datavault-undone-* and
    # says so, by design: datavault never deletes what the app may have written. Accepted
    # only with the old state live and the repair's own words (this boot's) naming the folder.
    leftovers=$(find /srv/app/data /srv/app/storage -maxdepth 1 -name '.datavault-*' ! -name '.datavault-undone-*' -printf '%f ')
    kept=$(find /srv/app/data /srv/app/storage -maxdepth 1 -name '.datavault-undone-*' -printf '%p ')
    [ -z "$leftovers" ] && ok "no restore leftovers beside the live data" || fail "left beside the live data: $leftovers"
    if [ -n "$kept" ]; then
        told=$(journalctl -b -q -o cat | grep 'keeps what was live when the restore was undone' || true)
        for k in $kept; do
            if [ "$(cat "$OUT/outcome" 2>/dev/null)" = old ] && printf '%s\n' "$told" | grep -qF "$k keeps what was live"; then
                ok "the repair kept what the app may have written in $k, and said so"
                rm -rf "$k" # what the owner does once checked; the next boots start clean
            else
                fail "left beside the live data: $k (outcome '$(cat "$OUT/outcome" 2>/dev/null)'; the repair said: ${told:-nothing})"
            fi
        done
    fi
    # Every complete archive verifies. An archive cut between its rename and its manifest is
    # listed as incomplete (and verify --all exits 4 for it) until the next backup removes it.
    local out fails incomplete
    out=$(datavault verify --all 2>&1)
    echo "$out"
    fails=$(grep '^FAIL' <<<"$out" | grep -v 'incomplete: no manifest' || true)
    incomplete=$(grep -c '^FAIL.*incomplete: no manifest' <<<"$out" || true)
    [ -z "$fails" ] && ok "every complete archive verifies (verify --all; incomplete ones left by the cut: $incomplete)" \
        || fail "verify --all: $fails"
    [ "$incomplete" = 0 ] || echo "$incomplete" >"$OUT/incomplete-after-cut"
    local partials
    partials=$(find "$TARGET" -maxdepth 1 -name '*.partial' | wc -l)
    [ "$partials" = 0 ] && ok "no .partial file left on the drive" || fail "$partials .partial file(s) left"
    # The catalog: the cut command's run is recorded, never left RUNNING.
    row=$(sqlite3 /var/lib/datavault/catalog.db "SELECT id, status, coalesce(error, '') FROM runs WHERE id > $id_before AND command = '${kind%-swap}' ORDER BY id LIMIT 1")
    st=$(cut -d'|' -f2 <<<"$row"); err=$(cut -d'|' -f3 <<<"$row")
    case "$st|$err" in
        "|") ok "the cut came before the $kind run was recorded"; echo before >"$OUT/landing" ;;
        "FAILED|interrupted") ok "the catalog shows the interrupted $kind run ($row)"; echo mid >"$OUT/landing" ;;
        "SUCCESS|") ok "the $kind run had finished before the cut ($row)"; echo after >"$OUT/landing" ;;
        *) fail "the $kind run in the catalog: $row"; echo bad >"$OUT/landing" ;;
    esac
    local running
    running=$(sqlite3 /var/lib/datavault/catalog.db "SELECT count(*) FROM runs WHERE status = 'RUNNING'")
    [ "$running" = 0 ] && ok "no run left RUNNING in the catalog" || fail "$running run(s) left RUNNING"
}

step_cut() {
    if [ -n "$PREV" ]; then
        check_after_cut
    else
        check_boot_state
        check_drive_mounted
        check_boot_drill passed
        # From the next boot on, pivm-early.service records the data as each cut left it.
        mkdir -p /var/lib/pivm && touch /var/lib/pivm/early
        # The tight retention for prune trials: everything but the newest two backups goes.
        sed -e 's/^keep_last = .*/keep_last = 2/' -e 's/^keep_daily = .*/keep_daily = 0/' \
            -e 's/^keep_weekly = .*/keep_weekly = 0/' -e 's/^keep_monthly = .*/keep_monthly = 0/' \
            "$CONFIG" >/etc/datavault/tight.toml
    fi
    local t0 t1 est
    t0=${EPOCHREALTIME/./}
    expect_exit 0 "a new backup passes" datavault backup
    t1=${EPOCHREALTIME/./}
    est=$(( (t1 - t0) / 1000 ))
    expect_exit 0 "a drill passes" datavault drill
    [ -z "$PREV" ] || expect_exit 0 "verify --all after that backup (it removed what the cut left)" datavault verify --all
    [ "$KIND" = final ] && return 0
    if [ -z "$PREV" ]; then
        # Calibration: an uncut in-place restore, so the host knows how long the swap window
        # (between the app's stop and start markers) and a whole restore last here.
        mutate_app 0
        ev "calibrate-restore-go"
        expect_exit 0 "an uncut in-place restore (calibration)" datavault restore --yes
        ev "calibrate-restore-done"
        expect_exit 0 "and a backup after it" datavault backup
    fi

    echo "$KIND" >"$OUT/kind"
    # What the cut must find again is what was on the disk: the changes the test made to the
    # live files (written, not synced, like any app's) are made durable first.
    sync
    local n=${step#cut-}
    case "$KIND" in
        backup)
            state_hash >"$OUT/hash-before"
            last_run_id >"$OUT/id-before"
            ev "cut-go backup est_ms=$est"
            datavault backup --comment "power-cut trial $n" ;;
        prune)
            # Two more archives to delete, then the tight policy.
            datavault backup >/dev/null 2>&1; datavault backup >/dev/null 2>&1
            state_hash >"$OUT/hash-before"
            t0=${EPOCHREALTIME/./}
            datavault --config /etc/datavault/tight.toml prune --dry-run
            t1=${EPOCHREALTIME/./}
            # (after the dry run, which is a prune run of its own in the catalog)
            last_run_id >"$OUT/id-before"
            ev "cut-go prune est_ms=$(( (t1 - t0) / 1000 ))"
            datavault --config /etc/datavault/tight.toml prune ;;
        restore|restore-swap)
            # The newest backup is the state before these changes: restoring it must bring
            # back exactly that, or leave exactly the changed state.
            state_hash >"$OUT/hash-new"
            mutate_app "$n"
            sync
            state_hash >"$OUT/hash-old"
            last_run_id >"$OUT/id-before"
            ev "cut-go $KIND"
            datavault restore --yes ;;
    esac
    ev "op-done $KIND rc=$?"
}

case "$step" in
    install) step_install; after=reboot ;;
    first-boot) step_first_boot; after=reboot ;;
    reboot) step_reboot; after=poweroff ;;
    missed) step_missed; after=poweroff ;;
    cut-*) step_cut; after="wait" ;;
    *) fail "unknown step $step"; after=poweroff ;;
esac
[ "$KIND" = final ] && after=poweroff
ev "step-done $step fails=$(grep -c '^FAIL' "$OUT/results" 2>/dev/null || echo 0)"
sync
case "$after" in
    reboot) systemctl reboot ;;
    poweroff) systemctl poweroff ;;
    wait) sleep infinity ;; # the host cuts the power
esac
