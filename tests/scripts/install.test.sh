#!/usr/bin/env bash
# Tests scripts/install.sh in a fake root (DATAVAULT_ROOT): what lands where with which mode,
# a second install changes nothing, datavault.toml is never touched, --prefix rewrites the
# units, systemctl is called only when systemd "runs" (a stub and a fake /run/systemd/system),
# and --uninstall removes the binary and units but keeps config, identity and state.
# Needs no root and no systemd. Last line: "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
script=$PWD/scripts/install.sh

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*"; }
check() { # NAME COMMAND...
    local name="$1"; shift
    if "$@"; then ok "$name"; else fail "$name"; fi
}
finish() { echo "$passed passed, $failed failed"; [ "$failed" = 0 ]; exit $?; }

tmp=$(mktemp -d /tmp/install-test.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# A stand-in binary, so the test needs no cargo build.
bin="$tmp/datavault-bin"
printf '#!/bin/sh\necho "datavault 0.0.0-test"\n' >"$bin"
chmod 0755 "$bin"

# The systemctl stub records its arguments.
stub="$tmp/systemctl"
printf '#!/bin/sh\necho "$*" >>"%s/systemctl.log"\n' "$tmp" >"$stub"
chmod 0755 "$stub"
rundir="$tmp/run-systemd-system"

out=""
code=0
inst() { # ROOT ARGS...: runs install.sh into ROOT
    local root="$1"; shift
    out=$(DATAVAULT_ROOT="$root" "$script" "$@" 2>&1)
    code=$?
}
mode() { stat -c %a "$1" 2>/dev/null; }
snapshot() { # ROOT: every path, type, mode and content hash
    (cd "$1" && find . -printf '%p %y %m\n' | sort && find . -type f -exec sha256sum {} + | sort)
}

# --- first install ---------------------------------------------------------------------------
r="$tmp/root1"
inst "$r" --binary "$bin"
check "install exits 0" [ "$code" = 0 ]
check "binary at /usr/bin/datavault, 0755, identical" \
    bash -c "[ \"$(mode "$r/usr/bin/datavault")\" = 755 ] && cmp -s '$bin' '$r/usr/bin/datavault'"
check "config template at /etc/datavault/datavault.toml.example" cmp -s config/datavault.example.toml "$r/etc/datavault/datavault.toml.example"
check "no live config written" [ ! -e "$r/etc/datavault/datavault.toml" ]
check "/var/lib/datavault is 0700" [ "$(mode "$r/var/lib/datavault")" = 700 ]
for u in datavault-agent.service datavault-backup.service datavault-backup.timer datavault-drill.service datavault-notify@.service datavault-offsite.service datavault-offsite.timer; do
    check "unit $u installed (0644, as in systemd/)" bash -c "[ \"$(mode "$r/etc/systemd/system/$u")\" = 644 ] && cmp -s 'systemd/$u' '$r/etc/systemd/system/$u'"
done
check "drop-in example in the docs, not active" bash -c "[ -f '$r/usr/share/doc/datavault/datavault-paths.conf.example' ] && [ ! -e '$r/etc/systemd/system/datavault-.service.d' ]"
check "systemctl is not run for a DATAVAULT_ROOT" grep -q "systemctl not run" <<<"$out"
before=$(snapshot "$r")

# --- second install: idempotent --------------------------------------------------------------
inst "$r" --binary "$bin"
check "second install exits 0" [ "$code" = 0 ]
check "second install reports nothing installed" bash -c "! grep -q 'installed /' <<<\"\$1\" && ! grep -q created <<<\"\$1\"" _ "$out"
check "second install: the tree is byte-for-byte the same" [ "$before" = "$(snapshot "$r")" ]

# --- an existing datavault.toml is never touched ---------------------------------------------
printf '# mine\n[source]\ndatabase = "/srv/app/app.db"\n' >"$r/etc/datavault/datavault.toml"
chmod 0600 "$r/etc/datavault/datavault.toml"
mine=$(sha256sum <"$r/etc/datavault/datavault.toml")
inst "$r" --binary "$bin"
check "install with a config present exits 0" [ "$code" = 0 ]
check "datavault.toml kept (content and mode)" bash -c "[ \"\$(sha256sum <'$r/etc/datavault/datavault.toml')\" = '$mine' ] && [ \"$(mode "$r/etc/datavault/datavault.toml")\" = 600 ]"
check "says the config was kept" grep -q "kept your /etc/datavault/datavault.toml" <<<"$out"

# --- an upgrade replaces the binary ----------------------------------------------------------
printf '#!/bin/sh\necho "datavault 0.0.1-test"\n' >"$tmp/datavault-new"
chmod 0755 "$tmp/datavault-new"
inst "$r" --binary "$tmp/datavault-new"
check "upgrade installs the new binary" bash -c "cmp -s '$tmp/datavault-new' '$r/usr/bin/datavault' && grep -q 'installed /usr/bin/datavault' <<<\"\$1\"" _ "$out"
check "no temporary files left" bash -c "! find '$r' -name '*.new.*' | grep -q ."

# --- --prefix --------------------------------------------------------------------------------
r2="$tmp/root2"
inst "$r2" --binary "$bin" --prefix /usr/local
check "--prefix /usr/local: binary in /usr/local/bin" [ -x "$r2/usr/local/bin/datavault" ]
check "--prefix /usr/local: ExecStart= rewritten" bash -c "grep -q '^ExecStart=/usr/local/bin/datavault backup --trigger timer' '$r2/etc/systemd/system/datavault-backup.service' && ! grep -rq '/usr/bin/datavault' '$r2/etc/systemd/system'"

# --- bad input -------------------------------------------------------------------------------
inst "$tmp/root3" --binary "$tmp/no-such-binary"
check "a missing --binary is refused" bash -c "[ $code = 1 ] && grep -q 'not an executable' <<<\"\$1\"" _ "$out"
inst "$tmp/root3" --frobnicate
check "an unknown argument is a usage error (exit 2)" [ "$code" = 2 ]

# --- systemd running (stubbed) ---------------------------------------------------------------
r4="$tmp/root4"
rm -f "$tmp/systemctl.log"
DATAVAULT_SYSTEMCTL="$stub" DATAVAULT_SYSTEMD_RUN_DIR="$tmp/absent" inst "$r4" --binary "$bin"
check "systemd not running: systemctl never called" [ ! -e "$tmp/systemctl.log" ]
mkdir -p "$rundir"
export DATAVAULT_SYSTEMCTL="$stub" DATAVAULT_SYSTEMD_RUN_DIR="$rundir"
inst "$r4" --binary "$bin"
check "systemd running, no config: daemon-reload + enable the three, start nothing" \
    diff <(printf '%s\n' "daemon-reload" "enable --quiet datavault-backup.timer datavault-drill.service datavault-agent.service") "$tmp/systemctl.log"
rm -f "$tmp/systemctl.log"
: >"$r4/etc/datavault/datavault.toml"
inst "$r4" --binary "$bin"
check "systemd running, config present: also start the timer and (re)start the agent" \
    diff <(printf '%s\n' "daemon-reload" "enable --quiet datavault-backup.timer datavault-drill.service datavault-agent.service" \
        "start datavault-backup.timer" "restart datavault-agent.service") "$tmp/systemctl.log"
rm -f "$tmp/systemctl.log"
inst "$r4" --binary "$bin" --no-enable
check "--no-enable: only daemon-reload" diff <(echo daemon-reload) "$tmp/systemctl.log"

# --- uninstall -------------------------------------------------------------------------------
echo "AGE-SECRET-KEY-TEST" >"$r4/etc/datavault/identity.txt"
echo "catalog" >"$r4/var/lib/datavault/catalog.db"
mkdir -p "$r4/etc/systemd/system/timers.target.wants" "$r4/etc/systemd/system/datavault-.service.d"
ln -s ../datavault-backup.timer "$r4/etc/systemd/system/timers.target.wants/datavault-backup.timer"
echo "[Service]" >"$r4/etc/systemd/system/datavault-.service.d/paths.conf"
rm -f "$tmp/systemctl.log"
inst "$r4" --uninstall
check "uninstall exits 0" [ "$code" = 0 ]
check "uninstall: binary removed" [ ! -e "$r4/usr/bin/datavault" ]
check "uninstall: units removed" bash -c "! ls '$r4'/etc/systemd/system/datavault-*.service '$r4'/etc/systemd/system/datavault-*.timer 2>/dev/null | grep -q ."
check "uninstall: enablement links removed" [ ! -L "$r4/etc/systemd/system/timers.target.wants/datavault-backup.timer" ]
check "uninstall: config, identity, template kept" bash -c "[ -e '$r4/etc/datavault/datavault.toml' ] && [ -e '$r4/etc/datavault/identity.txt' ] && [ -e '$r4/etc/datavault/datavault.toml.example' ]"
check "uninstall: state kept" bash -c "[ \"\$(cat '$r4/var/lib/datavault/catalog.db')\" = catalog ] && [ \"$(mode "$r4/var/lib/datavault")\" = 700 ]"
check "uninstall: the admin's drop-in kept" [ -f "$r4/etc/systemd/system/datavault-.service.d/paths.conf" ]
check "uninstall says what it kept" bash -c "grep -q 'Kept on purpose' <<<\"\$1\" && grep -q '/etc/datavault' <<<\"\$1\" && grep -q '/var/lib/datavault' <<<\"\$1\"" _ "$out"
check "uninstall: disable --now, then daemon-reload" \
    diff <(printf '%s\n' "disable --now datavault-backup.timer datavault-drill.service datavault-agent.service" "daemon-reload") "$tmp/systemctl.log"
inst "$r4" --uninstall
check "uninstall twice is fine" [ "$code" = 0 ]

finish
