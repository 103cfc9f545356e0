#!/usr/bin/env bash
# Checks the systemd units in systemd/: `systemd-analyze verify` must print nothing,
# `systemd-analyze security` must rate every service at most THRESHOLD/10 (default 19: below
# 2.0), every timer's OnCalendar= must parse (`systemd-analyze calendar`, next runs printed),
# and the network boundary must hold: the units that touch the data run with
# PrivateNetwork=yes, the ones that talk to the network hold no capability (#15).
#
# Usage: scripts/ci-units.sh [--threshold N]
#
# Works offline, without systemd running as PID 1 and without root: the units are copied into
# a throw-away root folder (with a copy of the distribution's units, for sysinit.target and
# friends, and stub executables for the ExecStart=/ExecReload= commands) and checked with
# --root=, so nothing is written outside a temporary folder. The drop-in example
# systemd/datavault-paths.conf.example is installed there as datavault-.service.d/paths.conf,
# so it is checked too. Prints one exposure figure per service.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$0")/.."

threshold=19
while [ $# -gt 0 ]; do
    case "$1" in
        --threshold) threshold="${2:?}"; shift 2 ;;
        --threshold=*) threshold="${1#--threshold=}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$self"; exit 0 ;;
        *) echo "ci-units: unknown argument: $1" >&2; exit 2 ;;
    esac
done

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "ci-units: systemd-analyze not found: apt-get install -y systemd" >&2
    exit 2
fi
systemd_units=/usr/lib/systemd/system
[ -d "$systemd_units" ] || systemd_units=/lib/systemd/system
if [ ! -f "$systemd_units/sysinit.target" ]; then
    echo "ci-units: no sysinit.target under $systemd_units: apt-get install -y systemd" >&2
    exit 2
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/datavault-ci-units.XXXXXX")
trap 'rm -rf "$root"' EXIT

mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/etc/systemd/system/datavault-.service.d"
cp -a "$systemd_units" "$root/usr/lib/systemd/system"
ln -s usr/bin "$root/bin"
ln -s usr/lib "$root/lib"

# verify only checks that every Exec*= command is an executable file under --root.
mapfile -t units < <(cd systemd && ls -1 -- *.service *.timer 2>/dev/null)
if [ "${#units[@]}" = 0 ]; then
    echo "ci-units: no units in systemd/" >&2
    exit 1
fi
for u in "${units[@]}"; do
    cp "systemd/$u" "$root/etc/systemd/system/$u"
    # Every absolute command in Exec*= lines (after an optional prefix like - @ : + !).
    sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\(\/[^ ]*\).*/\1/p' "systemd/$u"
done | sort -u | while read -r cmd; do
    stub="$root$cmd"
    mkdir -p "$(dirname "$stub")"
    [ -e "$stub" ] || printf '#!/bin/sh\nexit 0\n' >"$stub"
    chmod 0755 "$stub"
done
if [ -f systemd/datavault-paths.conf.example ]; then
    cp systemd/datavault-paths.conf.example "$root/etc/systemd/system/datavault-.service.d/paths.conf"
fi

# A template is checked through one instance, the way OnFailure= starts it.
instance_of() {
    case "$1" in
        *@.service) echo "${1%@.service}@datavault-backup.service.service" ;;
        *) echo "$1" ;;
    esac
}

failed=0
echo "ci-units: systemd-analyze verify ($(systemd-analyze --version | head -n 1))"
for u in "${units[@]}"; do
    name=$(instance_of "$u")
    if out=$(systemd-analyze verify --man=no --root="$root" "$name" 2>&1) && [ -z "$out" ]; then
        echo "  ok    $name"
    else
        echo "  FAIL  $name"
        printf '%s\n' "$out" | sed 's/^/        /'
        failed=1
    fi
done

echo "ci-units: systemd-analyze security --offline=true --threshold=$threshold (exposure, lower is better)"
for u in "${units[@]}"; do
    case "$u" in *.service) ;; *) continue ;; esac
    name=$(instance_of "$u")
    rc=0
    out=$(systemd-analyze security --offline=true --root="$root" --threshold="$threshold" --no-pager "$name" 2>&1) || rc=$?
    level=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p' | tail -n 1)
    if [ "$rc" = 0 ] && [ -n "$level" ]; then
        printf '  ok    %-32s %s\n' "$u" "$level"
    else
        printf '  FAIL  %-32s %s (exit %s)\n' "$u" "${level:-no figure}" "$rc"
        [ -n "$level" ] || printf '%s\n' "$out" | tail -n 5 | sed 's/^/        /'
        failed=1
    fi
done

# The network boundary (#10): only the offsite push and the failure hook may reach the
# network; the units that read the app's data or hold the drive read-write never do.
echo "ci-units: network boundary"
check() { # unit, description, grep -E pattern that must match (or ! pattern that must not)
    local u=$1 what=$2 pat=$3 neg=0
    case "$pat" in '!'*) neg=1; pat=${pat#!} ;; esac
    if grep -Eq -- "$pat" "systemd/$u"; then found=1; else found=0; fi
    if [ "$found" != "$neg" ]; then
        printf '  ok    %-32s %s\n' "$u" "$what"
    else
        printf '  FAIL  %-32s %s\n' "$u" "$what"
        failed=1
    fi
}
for u in datavault-backup.service datavault-drill.service datavault-agent.service; do
    check "$u" "PrivateNetwork=yes" '^PrivateNetwork=yes$'
    check "$u" "no IP socket" '!^RestrictAddressFamilies=.*AF_INET'
done
check datavault-backup.service "starts the offsite push on success" '^OnSuccess=.*datavault-offsite.service'
check datavault-offsite.service "no capability at all" '^CapabilityBoundingSet=$'
check datavault-offsite.service "the drive stays read-only" '!^ReadWritePaths=.*/mnt'
check datavault-offsite.service "skipped where no offsite is set up" '^ConditionPathExists=/etc/datavault/offsite.credentials$'
check datavault-offsite.service "waits for the network" '^After=.*network-online.target'
check datavault-offsite.timer "retries" '^Unit=datavault-offsite.service$'
# ---- timers and the network boundary (#15) ------------------------------------------------
echo "ci-units: systemd-analyze calendar (each timer's OnCalendar=, next 3 runs)"
for u in "${units[@]}"; do
    case "$u" in *.timer) ;; *) continue ;; esac
    while read -r expr; do
        if out=$(systemd-analyze calendar --iterations=3 "$expr" 2>&1); then
            next=$(printf '%s\n' "$out" | sed -n 's/^ *\(Next elapse\|Iter\. #[0-9]*\): *//p' | tr '\n' ';')
            printf '  ok    %-32s %s -> %s\n' "$u" "$expr" "$next"
        else
            printf '  FAIL  %-32s %s\n' "$u" "$expr"
            printf '%s\n' "$out" | sed 's/^/        /'
            failed=1
        fi
    done < <(sed -n 's/^OnCalendar=//p' "systemd/$u")
    grep -q '^Persistent=true' "systemd/$u" || { echo "  FAIL  $u: Persistent=true missing (a Pi that was off would skip it)"; failed=1; }
done
echo "ci-units: network boundary (data units offline, network units without capabilities)"
for u in datavault-backup.service datavault-drill.service datavault-drill-weekly.service datavault-agent.service; do
    [ -f "systemd/$u" ] || continue
    if grep -q '^PrivateNetwork=yes' "systemd/$u"; then echo "  ok    $u: PrivateNetwork=yes"
    else echo "  FAIL  $u: must keep PrivateNetwork=yes"; failed=1; fi
done
for u in datavault-notify.service datavault-ping-start.service datavault-notify@.service datavault-offsite.service; do
    [ -f "systemd/$u" ] || continue
    if grep -q '^CapabilityBoundingSet=$' "systemd/$u"; then echo "  ok    $u: network, no capability"
    else echo "  FAIL  $u: a unit with network must have CapabilityBoundingSet= (empty)"; failed=1; fi
done

if [ "$failed" != 0 ]; then
    echo "ci-units: FAILED" >&2
    exit 1
fi
echo "ci-units: all units verified, every service at or below $threshold/10"
