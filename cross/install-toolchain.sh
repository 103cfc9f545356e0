#!/usr/bin/env bash
# Installs the Raspberry Pi cross toolchain on a Debian 12 (bookworm) x86_64 machine.
#
# Why Debian's packages and not `rustup target add`: the machines this project builds on
# reach Debian's archive and crates.io but not the rustup distribution server, so the
# target's standard library comes from Debian's multiarch package libstd-rust-web-dev:ARCH,
# which must be the very same version as Debian's compiler, rustc-web. Builds then use
#   RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc cargo build --target aarch64-unknown-linux-gnu
# (rustup's cargo is fine; only the compiler must be Debian's). See docs/pi-build.md.
#
# Usage: cross/install-toolchain.sh [--armhf]
#   --armhf   also the 32-bit ARM pieces (armv7, Raspberry Pi OS 32-bit); see docs/pi-build.md
#             for why that does not work on every mirror.
#
# Idempotent and quiet: when everything is there it only asks dpkg-query (~0.05 s).
# Needs root (or sudo) only when something is missing.
set -euo pipefail

want_armhf=0
for arg in "$@"; do
    case "$arg" in
        --armhf) want_armhf=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install-toolchain: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

# libc6:ARCH and libgcc-s1:ARCH (the Pi's own runtime, multiarch) are what the tests run on
# under qemu (`-L /` in .cargo/config.toml); the -cross packages are what the linker uses.
arm64_packages=(rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
                binutils-aarch64-linux-gnu qemu-user-static libc6:arm64 libgcc-s1:arm64)
armhf_packages=(libstd-rust-web-dev:armhf gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
                binutils-arm-linux-gnueabihf libc6:armhf libgcc-s1:armhf)

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
apt_quiet=(-qq -o=Dpkg::Use-Pty=0)

# Prints the packages of "$@" that are not installed, or whose std is not rustc-web's version.
missing_of() {
    local p status host_v
    host_v=$(dpkg-query -W -f='${Version}' rustc-web 2>/dev/null || true)
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        case "$status" in
            ii*) case "$p" in
                     libstd-rust-web-dev:*)
                         [ "$(dpkg-query -W -f='${Version}' "$p")" = "$host_v" ] || echo "$p" ;;
                 esac ;;
            *) echo "$p" ;;
        esac
    done
}

# A failed update is only a warning: a mirror caught mid-sync fails one index file
# ("File has unexpected size") and the install below is what decides. Beware that apt then
# keeps the *old* lists of that whole suite, for every architecture: that is why arm64 is
# installed before armhf is even added.
apt_update() {
    $SUDO apt-get "${apt_quiet[@]}" update 2>&1 | grep -v '^ \|^W:' >&2 \
        || true
}

add_arch() {
    if ! dpkg --print-foreign-architectures | grep -qx "$1"; then
        $SUDO dpkg --add-architecture "$1"
        return 0
    fi
    return 1
}

# Installs "$@" after checking that apt offers the std at exactly rustc-web's version
# (libstd-rust-web-dev:ARCH Breaks every other version of itself, apt's answer to a mismatch
# is a baffling "held broken packages").
apt_install() {
    local arch std_v rustc_v
    rustc_v=$(apt-cache policy rustc-web | sed -n 's/ *Candidate: //p')
    for p in "$@"; do
        case "$p" in
            libstd-rust-web-dev:*)
                arch=${p#*:}
                std_v=$(apt-cache policy "$p" | sed -n 's/ *Candidate: //p')
                if [ "$std_v" != "$rustc_v" ]; then
                    echo "install-toolchain: apt offers $p $std_v but rustc-web $rustc_v;" \
                         "the $arch index of bookworm-security is probably missing (see apt-get update's errors)" >&2
                    return 1
                fi ;;
        esac
    done
    $SUDO apt-get "${apt_quiet[@]}" install -y --no-install-recommends "$@" 2>&1 \
        | grep -v '^debconf: \|^dpkg-preconfigure: \|^Extracting templates\|^Selecting previously\|^Preparing to\|^Unpacking\|^Setting up\|^Processing triggers\|^(Reading database' >&2 || true
    [ -z "$(missing_of "$@")" ]
}

install_set() {  # install_set ARCH PACKAGES...
    local arch=$1; shift
    local missing
    missing=$(missing_of "$@")
    [ -n "$missing" ] || return 0
    echo "install-toolchain: installing" $missing >&2
    if add_arch "$arch" || ! apt-cache show rustc-web >/dev/null 2>&1; then
        apt_update
    fi
    # shellcheck disable=SC2086  # one word per package
    if ! apt_install $missing rustc-web; then
        # Stale lists can name versions the mirror no longer has: refresh once and retry.
        apt_update
        # shellcheck disable=SC2086
        apt_install $missing rustc-web
    fi
}

# The integration tests spawn the `datavault` binary: under emulation that child is an
# aarch64 ELF the kernel must hand to qemu itself, through binfmt_misc. systemd-binfmt does
# this at boot from qemu-user-static's /usr/lib/binfmt.d/*.conf; machines without systemd as
# PID 1 (containers, CI sandboxes) need it done by hand, once per boot.
register_binfmt() {  # register_binfmt NAME (qemu-aarch64, qemu-arm)
    local conf=/usr/lib/binfmt.d/$1.conf dir=/proc/sys/fs/binfmt_misc
    [ -e "$dir/$1" ] && return 0
    if [ ! -e "$dir/register" ]; then
        $SUDO mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null || true
    fi
    [ -e "$dir/$1" ] && return 0
    if [ -w "$dir/register" ] || [ -n "$SUDO" ]; then
        grep -v '^#' "$conf" | $SUDO tee "$dir/register" >/dev/null 2>&1 || true
    fi
    if [ ! -e "$dir/$1" ]; then
        echo "install-toolchain: warning: could not register $1 with binfmt_misc;" \
             "tests that spawn the datavault binary will fail under emulation" >&2
    fi
}

install_set arm64 "${arm64_packages[@]}"
register_binfmt qemu-aarch64
if [ "$want_armhf" = 1 ]; then
    install_set armhf "${armhf_packages[@]}"
    register_binfmt qemu-arm
fi
