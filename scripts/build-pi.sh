#!/usr/bin/env bash
# Builds the DataVault release binary and .deb for a Raspberry Pi; both land in dist/.
#
# Usage: scripts/build-pi.sh [--target aarch64|armv7] [--no-install] [--no-deb]
#   --target aarch64  (default) Raspberry Pi OS 64-bit: Pi 3, 4, 5, Zero 2 W -> arm64 .deb
#   --target armv7    Raspberry Pi OS 32-bit (armhf) on ARMv7 boards -> armhf .deb
#   --no-install      do not run cross/install-toolchain.sh (the toolchain is already there)
#   --no-deb          only the binary
#
# The compiler is Debian's (rustc-web + libstd-rust-web-dev:ARCH, see
# cross/install-toolchain.sh); cargo may be rustup's. CARGO_TARGET_DIR defaults to target/pi
# so that switching between this and the host build never rebuilds either from scratch.
# See docs/pi-build.md.
set -euo pipefail

cd "$(dirname "$0")/.."

target=aarch64
install=1
want_deb=1
while [ $# -gt 0 ]; do
    case "$1" in
        --target) target="${2:-}"; shift 2 ;;
        --target=*) target="${1#--target=}"; shift ;;
        --no-install) install=0; shift ;;
        --no-deb) want_deb=0; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "build-pi: unknown argument: $1" >&2; exit 2 ;;
    esac
done

case "$target" in
    aarch64|arm64)
        triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; deb_arch=arm64; install_flags=()
        qemu=qemu-aarch64-static ;;
    armv7|armhf)
        triple=armv7-unknown-linux-gnueabihf; gnu=arm-linux-gnueabihf; deb_arch=armhf; qemu=qemu-arm-static
        install_flags=(--armhf) ;;
    *) echo "build-pi: --target must be aarch64 or armv7, not '$target'" >&2; exit 2 ;;
esac

if [ "$install" = 1 ]; then
    bash cross/install-toolchain.sh "${install_flags[@]}"
fi

export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/pi}"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
echo "build-pi: datavault $version for $triple ($(/usr/bin/rustc --version))" >&2

cargo build --release --locked --target "$triple" --bin datavault
bin="$CARGO_TARGET_DIR/$triple/release/datavault"

mkdir -p dist
cp "$bin" "dist/datavault-$version-$triple"

# The .deb's `Depends: libc6 (>= X)` must be at least the newest glibc symbol version the
# binary links against, or dpkg would accept a Pi whose glibc cannot run it.
glibc_min=$("$gnu-objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
declared=$(sed -n 's/^depends = "libc6 (>= \([0-9.]*\)).*/\1/p' Cargo.toml | head -n 1)
size=$(stat -c %s "$bin")
echo "build-pi: $bin: $size bytes, needs glibc >= $glibc_min (package declares libc6 >= ${declared:-?})" >&2
if [ -n "$declared" ] && [ "$(printf '%s\n%s\n' "$glibc_min" "$declared" | sort -V | tail -n 1)" != "$declared" ]; then
    echo "build-pi: the binary needs glibc $glibc_min but Cargo.toml's [package.metadata.deb] depends says libc6 (>= $declared): raise it" >&2
    exit 1
fi

# The man page and the shell completions, from the binary's own clap definition (#15). The
# binary is for the Pi: it runs here through qemu (binfmt_misc, set up by
# cross/install-toolchain.sh, or qemu-*-static directly).
run_bin() {
    if "$bin" --version >/dev/null 2>&1; then
        "$bin" "$@"
    else
        "$qemu" -L "/usr/$gnu" -E "LD_LIBRARY_PATH=/usr/$gnu/lib" "$bin" "$@"
    fi
}
gen=dist/generated
mkdir -p "$gen"
run_bin man | gzip -9n >"$gen/datavault.1.gz"
run_bin completions bash >"$gen/datavault.bash"
run_bin completions zsh >"$gen/_datavault"
run_bin completions fish >"$gen/datavault.fish"
for f in "$gen"/*; do
    [ -s "$f" ] || { echo "build-pi: $f is empty: generating the man page or completions failed" >&2; exit 1; }
done

if [ "$want_deb" = 0 ]; then
    ls -l "dist/datavault-$version-$triple"
    exit 0
fi

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-pi: installing cargo-deb (crates.io)" >&2
    cargo install cargo-deb --locked --quiet
fi

# systemd units ship only when the repository has them: the `systemd` variant of
# [package.metadata.deb] adds systemd/*.service and *.timer to /lib/systemd/system/ (and the
# drop-in example to the docs), under the same package name. cargo-deb refuses a glob that
# matches nothing, so the base package cannot list them.
variant=()
if compgen -G 'systemd/*.service' >/dev/null; then
    variant=(--variant systemd)
fi

# The binary is already built (by Debian's rustc) and stripped by the release profile.
deb=$(cargo deb --no-build --no-strip --target "$triple" "${variant[@]}" --output dist/ | tail -n 1)
echo "build-pi: $deb" >&2
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
