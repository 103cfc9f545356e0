#!/usr/bin/env bash
# CI for the fault and hostile-input suite (issue #5), beyond the plain `cargo test`:
#   1. libfaketime, so the clock tests run instead of skipping;
#   2. the fault suites, with their trial counts in the log (--nocapture);
#   2b. the whole test suite again with the clock a year ahead (no test may depend on the date);
#   3. cargo deny: licences, bans and sources (offline); advisories when the network allows;
#   4. a short cargo fuzz run of every target (60 s in all).
# Run as root on Debian 12 (the mount and run-as-nobody tests need it). Knobs:
#   DATAVAULT_FAULT_TRIALS=N   trials per randomised test (default: each test's own count)
#   DATAVAULT_FAULT_SEED=S     another seed (default: each test's fixed one)
#   FUZZ_SECONDS=N             seconds per fuzz target (default 20); 0 skips fuzzing
#   CI_OFFLINE=1               no cargo install, no advisory fetch
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "=== ci-faults: system packages"
if ! dpkg -s faketime >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
fi

echo "=== ci-faults: fault, hostile-input, config and secret suites"
start=$(date +%s)
log=$(mktemp)
rc=0
cargo test --locked --test faults --test hostile_archives --test config_fuzz --test secrets \
    --test unsafe_archives --test restore_hazards -- --nocapture >"$log" 2>&1 || rc=$?
# The trial counts and seeds each test prints, and the verdicts.
grep -E '^(test |kill |byte flips|truncations|manifests|broken|secrets|churn|concurrency|clock|skipped|test result)|seed ' "$log" || true
if [ "$rc" != 0 ]; then
    tail -n 80 "$log"
    exit "$rc"
fi
echo "ci-faults: suites passed in $(( $(date +%s) - start )) s"

echo "=== ci-faults: the whole suite with the clock a year ahead (issue #11)"
# libfaketime shifts the clock of the test binaries and of every datavault they run, through
# cargo's runner: cargo and rustc keep the real clock (rustc can hang under libfaketime, and a
# build must never happen with a shifted clock). A test that passes only near the day it was
# written fails here.
start=$(date +%s)
cargo test --locked --no-run >/dev/null 2>&1
faketime_lib=$(dpkg -L libfaketime 2>/dev/null | grep '/libfaketime.so.1$' | head -n 1)
log=$(mktemp)
rc=0
host=$(rustc -vV | sed -n 's/^host: //p')
runner_var="CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUNNER"
# The shift must really happen, or this stage proves nothing.
shifted=$(env LD_PRELOAD="$faketime_lib" FAKETIME=+365d date +%Y)
[ "$shifted" = $(( $(date +%Y) + 1 )) ] || { echo "ci-faults: libfaketime did not shift the clock ($shifted)" >&2; exit 1; }
# libfaketime leaves a semaphore and a shared memory segment per process in /dev/shm when the
# process does not exit normally, named by its pid and owned by its user. Once pids wrap, a
# test's datavault that drops to another user can be given a pid whose leftover belongs to
# root: its libfaketime cannot open it and the test fails for nothing. A machine that ran this
# stage many times (a developer's) collects thousands; start from none.
find /dev/shm -maxdepth 1 \( -name 'faketime_shm_*' -o -name 'sem.faketime_sem_*' \) -delete 2>/dev/null || true
# A bound on the whole run (it takes 5-8 min here): a test that waits forever on something the
# shifted clock prevented must fail this stage, not eat the CI's 90 minutes.
env "$runner_var=env LD_PRELOAD=$faketime_lib FAKETIME=+365d FAKETIME_DONT_FAKE_MONOTONIC=1" \
    timeout -k 30 "${YEAR_AHEAD_TIMEOUT:-1500}" cargo test --locked >"$log" 2>&1 || rc=$?
grep -E '^test result' "$log" || true
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "ci-faults: the year-ahead run did not end in ${YEAR_AHEAD_TIMEOUT:-1500} s; it was in:" >&2
    grep -E '^ *Running ' "$log" | tail -n 1 >&2
fi
if [ "$rc" != 0 ]; then
    grep -E '^test .*FAILED|panicked' "$log" | head -n 40
    tail -n 60 "$log"
    exit "$rc"
fi
echo "ci-faults: the suite passed a year ahead in $(( $(date +%s) - start )) s"

echo "=== ci-faults: cargo deny"
if ! command -v cargo-deny >/dev/null; then
    [ -n "${CI_OFFLINE:-}" ] || cargo install --locked cargo-deny
fi
if command -v cargo-deny >/dev/null; then
    # --offline reads every platform's crates (cargo metadata); the builds above fetched only
    # this host's (chrono's iana-time-zone pulls android_system_properties, for one).
    [ -n "${CI_OFFLINE:-}" ] || cargo fetch --locked
    cargo deny --offline check licenses bans sources
    if [ -z "${CI_OFFLINE:-}" ] && getent hosts github.com >/dev/null; then
        cargo deny check advisories
    else
        echo "ci-faults: advisories SKIPPED: the RustSec database is fetched from github.com (offline here)"
    fi
else
    echo "ci-faults: cargo-deny not installed (offline); skipped"
fi

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
if [ "$FUZZ_SECONDS" != 0 ]; then
    echo "=== ci-faults: cargo fuzz, ${FUZZ_SECONDS} s per target"
    if ! command -v cargo-fuzz >/dev/null; then
        [ -n "${CI_OFFLINE:-}" ] || cargo install --locked cargo-fuzz
    fi
    if command -v cargo-fuzz >/dev/null; then
        # Stable toolchain: -Zsanitizer needs RUSTC_BOOTSTRAP (or use `cargo +nightly fuzz`).
        export RUSTC_BOOTSTRAP=1
        for t in manifest_parse archive_read archive_plaintext; do
            mkdir -p "fuzz/corpus/$t"
            flog=$(mktemp)
            if ! cargo fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
                -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 >"$flog" 2>&1; then
                tail -n 60 "$flog"
                echo "ci-faults: fuzz target $t failed; the input is in fuzz/artifacts/$t" >&2
                exit 1
            fi
            echo "$t: $(grep -E '^Done' "$flog")"
        done
    else
        echo "ci-faults: cargo-fuzz not installed (offline); skipped"
    fi
fi
echo "=== ci-faults: all green"
