#!/usr/bin/env bash
# Builds the Pi VM's base image (issue #13), or finds it in the cache: an arm64 Debian
# bookworm root file system (minbase + systemd, udev, cryptsetup, e2fsprogs, sqlite3 and the
# kernel, linux-image-arm64) made with `debootstrap --foreign` and its second stage under
# qemu-user (binfmt_misc), plus the kernel and initrd to boot it with qemu-system-aarch64.
# DataVault itself is NOT in the image: the test installs the .deb in the guest, as an owner
# would. See docs/pi-vm.md.
#
# Usage: tests/pi-vm/build-image.sh [--force] [--no-deps]
#   --force    rebuild even when the cache has an image for these inputs
#   --no-deps  do not apt-get install the host tools (debootstrap, qemu-user-static, ...)
#
# Prints the image folder (vmlinuz, initrd.img, root.img, info) as the last line of stdout.
# The cache key is the SHA-256 of this script and of tests/pi-vm/image/*: change either and
# the next run rebuilds; otherwise a rerun takes a second. Cache folder: $PIVM_CACHE, default
# /var/cache/datavault-pi-vm (older images there are deleted). $PIVM_MIRROR: the Debian
# mirror for debootstrap (default: debootstrap's own).
#
# Measured on a 2-core x86_64 host: ~4 min cold (download, second stage under emulation,
# one initramfs), 0.1 s warm.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
force=0
deps=1
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --no-deps) deps=0 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "build-image: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "build-image: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap, chroot)"; exit 2; }

suite=bookworm
# The kernel's initramfs holds only these (MODULES=list): the root disk is virtio-blk on PCI.
# With the default MODULES=most, mkinitramfs under qemu-user takes ~5 min instead of ~20 s.
initramfs_modules=(virtio_pci virtio_blk ext4)
# sudo: the README's install lines run verbatim; sqlite3, procps: the checks.
packages=(systemd-sysv udev kmod cryptsetup e2fsprogs linux-image-arm64 sudo sqlite3 procps)

cache_root=${PIVM_CACHE:-/var/cache/datavault-pi-vm}
key=$(cat "$0" "$here"/image/* | sha256sum | cut -c1-16)
out=$cache_root/$suite-arm64-$key
if [ "$force" = 0 ] && [ -f "$out/info" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

# --- host tools ----------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$deps" = 0 ]; then log "missing: ${need[*]}"; exit 3; fi
    log "installing ${need[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The second stage runs arm64 programs in a chroot: the kernel hands them to qemu through
# binfmt_misc. systemd-binfmt registers qemu at boot; a container or a CI sandbox without
# systemd as PID 1 needs it done by hand. The F flag (in Debian's .conf) makes the kernel
# keep qemu open, so the chroot needs no copy of it.
binfmt=/proc/sys/fs/binfmt_misc
[ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt"
if [ ! -e "$binfmt/qemu-aarch64" ]; then
    grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf >"$binfmt/register"
fi
grep -q '^enabled' "$binfmt/qemu-aarch64" || { log "qemu-aarch64 is not enabled in binfmt_misc"; exit 3; }

# --- the root file system --------------------------------------------------------------------
mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
root=$work/root
cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT

started=$(date +%s)
log "debootstrap --foreign $suite arm64 (first stage: download and unpack)"
mirror=()
[ -n "${PIVM_MIRROR:-}" ] && mirror=("$PIVM_MIRROR")
include=$(IFS=,; echo "${packages[*]}")
debootstrap --foreign --arch=arm64 --variant=minbase --include="$include" \
    "$suite" "$root" "${mirror[@]}" >"$work/debootstrap1.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap1.log" >&2; exit 1; }

# Seed the initramfs configuration before the kernel's postinst builds one. Neither path
# is a conffile of initramfs-tools, so dpkg leaves them alone.
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
echo "MODULES=list" >"$root/etc/initramfs-tools/conf.d/pi-vm.conf"
printf '%s\n' "${initramfs_modules[@]}" >"$root/usr/share/initramfs-tools/modules.d/pi-vm"

log "debootstrap second stage (arm64 code under qemu-user: a few minutes)"
chroot "$root" /debootstrap/debootstrap --second-stage >"$work/debootstrap2.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap2.log" >&2; tail -n 30 "$root/debootstrap/debootstrap.log" >&2 || true; exit 1; }
log "debootstrap done in $(( $(date +%s) - started )) s"

# --- a Pi-like system ------------------------------------------------------------------------
echo raspberrypi >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# The root disk is the first virtio disk: the "SD card".
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" >"$root/etc/fstab"
# A persistent journal: the checks read what happened in earlier boots.
mkdir -p "$root/var/log/journal"
# Nothing that runs on its own schedule and is not under test; no login prompts on the
# serial console (the host reads it as a log).
# (getty-static starts gettys on tty2-6 when there is no D-Bus: 13 s of an emulated boot.)
systemctl --root="$root" mask -q apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer serial-getty@ttyAMA0.service getty@tty1.service \
    getty-static.service 2>/dev/null || true
install -m 0755 "$here/image/pivm-runner" "$root/usr/local/sbin/pivm-runner"
install -m 0644 "$here/image/pivm-early.service" "$here/image/pivm-runner.service" "$root/etc/systemd/system/"
systemctl --root="$root" enable -q pivm-early.service pivm-runner.service
# No network in the guest: apt must never try to download (`apt install ./x.deb` with its
# dependencies already installed needs no package lists).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* 2>/dev/null || true

kver=$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
kconfig=$root/boot/config-$kver
for opt in CONFIG_DM_CRYPT CONFIG_GPIO_PL061 CONFIG_LEDS_GPIO CONFIG_LEDS_CLASS CONFIG_RTC_DRV_PL031 \
           CONFIG_RTC_HCTOSYS CONFIG_9P_FS CONFIG_NET_9P_VIRTIO CONFIG_GPIO_SIM CONFIG_GPIO_CDEV; do
    log "kernel $kver: $(grep -E "^$opt=|^# $opt is not set" "$kconfig" || echo "$opt unknown")"
done

# Whatever the second stage left mounted (proc, sys) must not be copied into the image.
awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done

mkdir -p "$work/out"
cp "$root/boot/vmlinuz-$kver" "$work/out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/out/initrd.img"
cp "$kconfig" "$work/out/kernel.config"
log "root.img (mkfs.ext4 -d: no mount needed)"
mkfs.ext4 -q -F -L pi-root -d "$root" "$work/out/root.img" 3G
{
    echo "suite=$suite"
    echo "kernel=$kver"
    echo "packages=${packages[*]}"
    echo "key=$key"
    echo "built=$(date -u +%FT%TZ) in $(( $(date +%s) - started )) s"
} >"$work/out/info"

rm -rf "$out"
mv "$work/out" "$out"
# Older images (other inputs) are dead weight: 3 GB sparse each.
for d in "$cache_root"/"$suite"-arm64-*; do
    [ "$d" = "$out" ] || rm -rf "$d"
done
log "built $out in $(( $(date +%s) - started )) s"
echo "$out"
