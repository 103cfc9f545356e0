#!/usr/bin/env bash
# What CI runs for the Raspberry Pi (issue #3), after the native test suite:
#   1. the cross toolchain (cross/install-toolchain.sh: Debian's rustc + arm64 std + qemu),
#   2. the whole `cargo test` suite built for aarch64 and run under qemu-aarch64-static,
#   3. the release binary, whose stripped size must stay under the budget below,
#   4. the .deb (scripts/build-pi.sh), printed with dpkg-deb --info / --contents.
#
# DATAVAULT_TEST_EMULATED=1 is set for the qemu run. A test that needs what user-mode qemu
# cannot give (mounts, loop devices, root) checks it and prints
# "skipped under emulation (ran natively)": that is only honest because .ci/run runs the
# native suite first, in the same CI run. Do not call this script on its own as the only test.
#
# CARGO_TARGET_DIR=target/pi keeps the cross build apart from the host build in target/.
set -euo pipefail

cd "$(dirname "$0")/.."

# Stripped aarch64 release binary, in bytes: 9 MiB. 6 MB until the offsite copy's S3 client
# and TLS (#10, 7,689,064 bytes; its issue set 8 MiB as the ceiling); the notifications
# (#15) and then the snapshot store (#9) brought it to 8,737,640 bytes even with every
# non-hot crate built for size. Raised deliberately: docs/pi-build.md says which dependency
# paid for what, and the two ways back under 8 MiB (system OpenSSL, or a non-PIE binary).
SIZE_BUDGET=${DATAVAULT_SIZE_BUDGET:-9437184}
TRIPLE=aarch64-unknown-linux-gnu

section() { printf '\n=== ci-aarch64: %s ===\n' "$*"; }
start=$(date +%s)

section "toolchain"
bash cross/install-toolchain.sh
/usr/bin/rustc --version
qemu-aarch64-static --version | head -n 1

export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR=target/pi
export CARGO_TERM_COLOR=never

section "build tests for $TRIPLE"
cargo build --locked --target "$TRIPLE" --all-targets

section "cargo test --target $TRIPLE (under qemu-aarch64-static)"
# The runner is .cargo/config.toml's (qemu-aarch64-static -L /) inside a watchdog: qemu-user
# can hang forever after a fork in a threaded program, and the suite forks all the time. A
# test binary silent for 300 s is killed and the tests it had not finished run once more
# (scripts/qemu-watchdog.py says why and how; a real failure is never retried).
command -v python3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
DATAVAULT_TEST_EMULATED=1 CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="python3 $PWD/scripts/qemu-watchdog.py" \
    cargo test --locked --target "$TRIPLE"

section "release binary and size budget"
bash scripts/build-pi.sh --target aarch64 --no-install --no-deb
bin="$CARGO_TARGET_DIR/$TRIPLE/release/datavault"
# The release profile strips already; strip a copy anyway so the budget measures code, not
# whatever a future profile change leaves in.
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
aarch64-linux-gnu-strip -o "$tmp" "$bin"
size=$(stat -c %s "$tmp")
awk -v s="$size" -v b="$SIZE_BUDGET" 'BEGIN { printf "stripped size: %d bytes (%.2f MB), budget %d bytes\n", s, s / 1e6, b }' 
if [ "$size" -gt "$SIZE_BUDGET" ]; then
    echo "ci-aarch64: FAIL: the stripped aarch64 binary is over the size budget" >&2
    exit 1
fi
# The binary must start on the Pi's CPU and libc, not just link.
qemu-aarch64-static -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib "$bin" --version

section ".deb"
bash scripts/build-pi.sh --target aarch64 --no-install

section "done in $(( $(date +%s) - start )) s"
