# shellcheck shell=bash
# Guest-side helpers of the Pi VM test (tests/pi-vm), sourced by guest/main.sh. They run as
# root inside the arm64 guest; the host reads what they write to the 9p share /run/pivm:
#   out/events         one line per event, "EPOCH.NANOS WORDS" (the host waits on these)
#   out/STEP/results   "ok    ..." / "FAIL  ..." lines: the host counts and prints them
#   out/STEP/log       everything the step printed
#   out/STEP/*.json    whatever the host or a later step needs (state hashes, timings)

# shellcheck disable=SC2034 # used by main.sh
share=/run/pivm
APP_DB=/srv/app/data/app.db
APP_UPLOADS=/srv/app/storage/uploads
TARGET=/mnt/datavault
CONFIG=/etc/datavault/datavault.toml
LED=/sys/class/leds/ACT

ev() {
    printf '%s %s\n' "$(date +%s.%N)" "$*" >>"$share/out/events"
    echo "PIVM: $*" >/dev/console 2>/dev/null || true
}
ok() { echo "ok    $*" | tee -a "$OUT/results"; }
fail() { echo "FAIL  $*" | tee -a "$OUT/results"; }
note() { echo "note  $*" | tee -a "$OUT/results"; }
# check DESCRIPTION COMMAND...: ok if the command succeeds.
check() {
    local what=$1 rc=0
    shift
    "$@" || rc=$?
    if [ "$rc" = 0 ]; then ok "$what"; else fail "$what (exit $rc)"; fi
    return "$rc"
}
# expect_exit CODE DESCRIPTION COMMAND...: runs it (output to the log) and checks its exit code.
expect_exit() {
    local want=$1 what=$2 rc=0
    shift 2
    echo "+ $*"
    "$@" || rc=$?
    if [ "$rc" = "$want" ]; then ok "$what (exit $rc)"; else fail "$what: exit $rc, wanted $want"; fi
    [ "$rc" = "$want" ]
}
# wait_until TIMEOUT_S COMMAND...: polls a condition (a file, a unit state) every 0.2 s.
wait_until() {
    local deadline=$(( $(date +%s) + $1 ))
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# The boot transaction is over (the boot drill included): "running", or "degraded" if a unit
# failed. Prints the state.
boot_state() {
    timeout 600 systemctl is-system-running --wait 2>/dev/null || true
}

unit_prop() { systemctl show -p "$2" --value "$1"; }

# datavault's catalog as JSON (runs, events, archives).
audit_json() { datavault --json audit --limit "${1:-50}"; }
# jq is not in the image: tiny queries through sqlite3's JSON functions, on a copy of the text.
json_q() { # json_q JSON_TEXT SQL_EXPR_ON_j  (j = the document)
    sqlite3 :memory: "SELECT $2 FROM (SELECT json('$(printf '%s' "$1" | sed "s/'/''/g")') AS j);"
}
last_run_id() { json_q "$(audit_json 1)" "coalesce(json_extract(j, '\$.runs[0].id'), 0)"; }
# run_field ID FIELD: a field of run ID from the catalog.
run_field() {
    sqlite3 /var/lib/datavault/catalog.db "SELECT $2 FROM runs WHERE id = $1;" 2>/dev/null
}
# Newest run of COMMAND with TRIGGER after run id AFTER: "id|status|started_at|error".
run_after() {
    sqlite3 /var/lib/datavault/catalog.db \
        "SELECT id, status, started_at, coalesce(error, '') FROM runs WHERE command = '$1' AND trigger = '$2' AND id > $3 ORDER BY id DESC LIMIT 1;" 2>/dev/null
}

# --- the application (a stand-in for the owner's app) -------------------------------------

# The "app": a WAL-mode SQLite database and an uploads folder, at the paths of
# config/datavault.example.toml, and a myapp.service that the restore's stop/start commands
# (`systemctl stop myapp`) really stop and start. Its stop and start leave markers for the
# host: a power cut can then be aimed at the swap, which happens between the two.
make_app() {
    mkdir -p /srv/app/data "$APP_UPLOADS/photos" "$APP_UPLOADS/docs"
    sqlite3 "$APP_DB" "PRAGMA journal_mode=WAL;
        CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL, at TEXT NOT NULL);
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
        INSERT INTO notes(body, at) SELECT printf('note %d %s', i, hex(randomblob(40))), datetime('now') FROM n;
        PRAGMA wal_checkpoint(TRUNCATE);" >/dev/null
    local i
    for i in $(seq 1 24); do head -c $(( 4096 + i * 1500 )) /dev/urandom >"$APP_UPLOADS/photos/img-$i.jpg"; done
    for i in $(seq 1 12); do printf 'document %d\n%s\n' "$i" "$(head -c 300 /dev/urandom | base64)" >"$APP_UPLOADS/docs/doc-$i.txt"; done
    ln -sfn photos/img-1.jpg "$APP_UPLOADS/avatar.jpg"
    chmod 0600 "$APP_UPLOADS/docs/doc-1.txt"
    cat >/usr/local/bin/myapp-mark <<'EOF'
#!/bin/sh
# Leaves a marker for the Pi VM test host when the app is stopped or started.
[ -d /run/pivm/out ] && printf '%s app-%s\n' "$(date +%s.%N)" "$1" >>/run/pivm/out/events
exit 0
EOF
    chmod 0755 /usr/local/bin/myapp-mark
    cat >/etc/systemd/system/myapp.service <<'EOF'
[Unit]
Description=The owner's application (a stand-in: idle, holds nothing open)

[Service]
ExecStartPost=/usr/local/bin/myapp-mark started
ExecStart=/bin/sleep infinity
ExecStopPost=/usr/local/bin/myapp-mark stopped

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable --now myapp.service
}

# Change the live data: what a restore must undo exactly.
mutate_app() {
    local n=$1
    sqlite3 "$APP_DB" "INSERT INTO notes(body, at) VALUES ('after the backup $n', datetime('now'));
        UPDATE notes SET body = body || ' edited' WHERE id % 97 = $(( n % 97 ));
        DELETE FROM notes WHERE id = $(( 10 + n ));" >/dev/null
    head -c 3000 /dev/urandom >"$APP_UPLOADS/photos/new-$n.jpg"
    printf 'changed %d\n' "$n" >>"$APP_UPLOADS/docs/doc-2.txt"
    rm -f "$APP_UPLOADS/photos/img-$(( (n % 20) + 3 )).jpg"
}

# The live state, as the app would see it: rows (a logical dump: page layout may differ after
# a restore) and every upload's kind, mode, link target and content.
state_hash() {
    {
        sqlite3 "$APP_DB" .dump 2>&1
        if [ -d "$APP_UPLOADS" ]; then
            (cd "$APP_UPLOADS" && find . -printf '%y %m %p -> %l\n' | LC_ALL=C sort \
                && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
        else
            echo "no uploads folder"
        fi
    } | sha256sum | cut -c1-16
}

# --- the status LED ----------------------------------------------------------------------

# Samples the ACT LED's brightness for MILLISECONDS (bash builtins only: no fork per sample) and
# names the pattern: steady-on, off, single (healthy), double (drive missing), fast
# (working), sos (drill failed), or unknown:... with the pulse trains seen.
led_pattern() {
    local ms=${1:-4500} f=$LED/brightness v last=x t end
    t=${EPOCHREALTIME/./}
    end=$(( t + ms * 1000 ))
    {
        while :; do
            t=${EPOCHREALTIME/./}
            (( t > end )) && break
            read -r v <"$f" || v=x
            [ "$v" != 0 ] && v=1
            if [ "$v" != "$last" ]; then echo "$t $v"; last=$v; fi
        done
        echo "$t end"
    } | awk '
        NR == 1 { first = $1; state = $2; n = 0; next }
        $2 == "end" { last = $1; exit }
        { n++; if ($2 == 1) { on_at = $1 } else if (on_at) { p++; ps[p] = on_at; pd[p] = $1 - on_at } }
        END {
            if (n == 0) { print (state == 1 ? "steady-on" : "off"); exit }
            # Bursts: pulses whose starts are less than 600 ms apart.
            b = 0
            for (i = 1; i <= p; i++) {
                if (i == 1 || ps[i] - ps[i - 1] > 600000) { b++; size[b] = 0; bstart[b] = ps[i] }
                size[b]++; bend[b] = ps[i] + pd[i]
            }
            # Sizes of the bursts that lie wholly inside the window.
            s = ""; full = 0
            for (i = 1; i <= b; i++) {
                if (bstart[i] - first < 300000 || last - bend[i] < 700000) continue
                full++; s = s " " size[i]; k[size[i]]++
            }
            # Working: 100 ms on, 100 ms off, without a pause.
            if (p >= 4) {
                fast = 1
                for (i = 2; i <= p; i++) if (ps[i] - ps[i - 1] > 400000) fast = 0
                if (fast) { print "fast"; exit }
            }
            if (full == 0) { printf "unknown:%d-pulses-in-%d-bursts\n", p, b; exit }
            best = 0; for (z in k) if (k[z] > best) { best = k[z]; mode = z }
            if (mode == 1) print "single"; else if (mode == 2) print "double";
            else if (mode == 9) print "sos"; else printf "unknown:bursts%s\n", s
        }'
}

# Waits up to TIMEOUT_S for the LED to show PATTERN; prints what it saw last.
wait_led() {
    local want=$1 deadline=$(( $(date +%s) + $2 )) seen
    while :; do
        seen=$(led_pattern 4500)
        [ "$seen" = "$want" ] && { echo "$seen"; return 0; }
        [ "$(date +%s)" -lt "$deadline" ] || { echo "$seen"; return 1; }
    done
}

# One line about the LED's GPIO line as the kernel sees it (gpiolib's debugfs view of the
# PL061: direction, level, consumer).
gpio_line() {
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    grep -h -i 'ACT' /sys/kernel/debug/gpio 2>/dev/null | head -n 1 | tr -s ' '
}
