#!/usr/bin/env bash
# shellcheck disable=SC2015,SC2001,SC2028 # ok/fail always succeed: `test && ok || fail` is a safe if-else
# Tests scripts/setup-usb.sh on loop devices: every refusal, --dry-run, the confirmation, and a
# real run as far as the kernel allows (luksFormat, key file, crypttab/fstab entries, run twice).
# Needs root, losetup, cryptsetup (apt-get install -y cryptsetup-bin) and mkfs.ext4. On a kernel
# without device-mapper the real run must stop at `cryptsetup open` with "device-mapper not
# available"; with device-mapper it must finish, mount and write the marker.
#
# Usage: sudo tests/scripts/setup-usb.test.sh     (last line: "N passed, M failed")
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
script=$PWD/scripts/setup-usb.sh

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*"; }
finish() { echo "$passed passed, $failed failed"; [ "$failed" = 0 ]; exit $?; }

if [ "$(id -u)" != 0 ]; then
    echo "SKIP: needs root (losetup, mount)"
    finish
fi
for tool in losetup cryptsetup mkfs.ext4 mount; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        fail "$tool is not installed (apt-get install -y cryptsetup-bin e2fsprogs mount)"
        finish
    fi
done

tmp=$(mktemp -d /tmp/setup-usb-test.XXXXXX)
loops=()
mounts=()
had_mapper_dir=0
[ -d /dev/mapper ] && had_mapper_dir=1
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local m l
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null; done
    [ -e /dev/mapper/datavault-test ] && cryptsetup close datavault-test 2>/dev/null
    for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null; done
    rm -rf "$tmp"
    # libdevmapper creates /dev/mapper/control even when the kernel has no device-mapper.
    if [ "$had_mapper_dir" = 0 ] && [ -d /dev/mapper ]; then
        rm -f /dev/mapper/control
        rmdir /dev/mapper 2>/dev/null
    fi
}
trap cleanup EXIT

loop=""
new_loop() { # SIZE_MB -> sets $loop (not a subshell: the cleanup must know every device)
    local img
    img=$(mktemp "$tmp/disk.XXXXXX")
    truncate -s "${1}M" "$img"
    loop=$(losetup -f --show "$img") || return 1
    loops+=("$loop")
}

# run NAME EXPECTED_EXIT PATTERN -- ARGS...: runs setup-usb.sh, checks exit code and output.
out=""
code=0
run() {
    local name="$1" want="$2" pattern="$3"
    shift 4
    out=$("$@" 2>&1 </dev/null)
    code=$?
    if [ "$code" = "$want" ] && grep -q -- "$pattern" <<<"$out"; then
        ok "$name"
    else
        fail "$name: exit $code (wanted $want), output lacks '$pattern':"
        sed 's/^/        /' <<<"$out"
    fi
}

etc="$tmp/etc"
mnt="$tmp/mnt"
export DATAVAULT_ETC="$etc"
common=(--mountpoint "$mnt" --name datavault-test)

# --- refusals --------------------------------------------------------------------------------
run "no device: usage error (exit 2)" 2 "which device" -- "$script"
run "unknown option: usage error" 2 "unknown option" -- "$script" /dev/null --frobnicate
run "missing device refused" 1 "does not exist" -- "$script" /dev/does-not-exist --yes "${common[@]}"
echo data >"$tmp/plain-file"
run "regular file refused" 1 "not a block device" -- "$script" "$tmp/plain-file" --yes "${common[@]}"
run "character device refused" 1 "not a block device" -- "$script" /dev/null --yes "${common[@]}"

root_src=$(findmnt -n -o SOURCE / 2>/dev/null | sed 's/\[.*//')
if [ -b "$root_src" ]; then
    run "the root disk ($root_src) refused" 1 "system disk" -- "$script" "$root_src" --yes "${common[@]}"
    run "the root disk refused in --dry-run too" 1 "system disk" -- "$script" "$root_src" --dry-run "${common[@]}"
else
    echo "skip  the root disk (/ is on '$root_src', not a block device; covered with fixtures below)"
fi

new_loop 16 || { fail "losetup"; finish; }
mounted=$loop
mkfs.ext4 -q "$mounted"
mkdir -p "$tmp/busy"
mount "$mounted" "$tmp/busy" && mounts+=("$tmp/busy")
run "a mounted loop device refused" 1 "is mounted at $tmp/busy" -- "$script" "$mounted" --yes "${common[@]}"
run "a mounted loop device refused in --dry-run" 1 "is mounted" -- "$script" "$mounted" --dry-run "${common[@]}"
blkid_before=$(blkid -o value -s TYPE "$mounted")
[ "$blkid_before" = ext4 ] && ok "the mounted device was left alone (still ext4)" || fail "mounted device changed: '$blkid_before'"

new_loop 40 || { fail "losetup"; finish; }
dev=$loop
num=$(printf '%d:%d' "0x$(stat -c %t "$dev")" "0x$(stat -c %T "$dev")")
name=$(basename "$dev")

# Fixtures for what loop devices cannot show here: partitions, dm holders, a LUKS/LVM root.
# A fake sysfs in which $dev has a partition ${name}p1 (259:99) and the root is dm-1 on $dev.
fake_sys() { # DIR: builds the sysfs tree for $dev
    local s="$1"
    mkdir -p "$s/dev/block" "$s/devices/virtual/block/$name/${name}p1/holders" \
        "$s/devices/virtual/block/$name/holders" "$s/devices/virtual/block/dm-1/slaves"
    echo "$num" >"$s/devices/virtual/block/$name/dev"
    echo 81920 >"$s/devices/virtual/block/$name/size"
    echo 259:99 >"$s/devices/virtual/block/$name/${name}p1/dev"
    echo 1 >"$s/devices/virtual/block/$name/${name}p1/partition"
    echo 254:1 >"$s/devices/virtual/block/dm-1/dev"
    ln -s "../../devices/virtual/block/$name" "$s/dev/block/$num"
    ln -s "../../devices/virtual/block/$name/${name}p1" "$s/dev/block/259:99"
    ln -s "../../devices/virtual/block/dm-1" "$s/dev/block/254:1"
}
sysA="$tmp/sysA"; fake_sys "$sysA"
echo "1 0 0:30 / / rw - overlay overlay rw" >"$tmp/mi-part"
echo "2 1 259:99 / /media/usb\\040stick rw - vfat /dev/${name}p1 rw" >>"$tmp/mi-part"
run "a device with a mounted partition refused" 1 "${name}p1 is mounted at /media/usb stick" -- \
    env DATAVAULT_SYS="$sysA" DATAVAULT_MOUNTINFO="$tmp/mi-part" "$script" "$dev" --yes "${common[@]}"

sysB="$tmp/sysB"; fake_sys "$sysB"
mkdir -p "$sysB/devices/virtual/block/dm-0/dm"
echo 254:0 >"$sysB/devices/virtual/block/dm-0/dev"
echo datavault >"$sysB/devices/virtual/block/dm-0/dm/name"
ln -s ../../../dm-0 "$sysB/devices/virtual/block/$name/${name}p1/holders/dm-0"
echo "1 0 0:30 / / rw - overlay overlay rw" >"$tmp/mi-none"
run "a device held by an open LUKS mapping refused" 1 "held by datavault" -- \
    env DATAVAULT_SYS="$sysB" DATAVAULT_MOUNTINFO="$tmp/mi-none" "$script" "$dev" --yes "${common[@]}"
echo "3 0 254:0 / /mnt/elsewhere rw - ext4 /dev/mapper/datavault rw" >>"$tmp/mi-none"
run "a device whose open mapping is mounted refused" 1 "dm-0 is mounted at /mnt/elsewhere" -- \
    env DATAVAULT_SYS="$sysB" DATAVAULT_MOUNTINFO="$tmp/mi-none" "$script" "$dev" --yes "${common[@]}"

sysC="$tmp/sysC"; fake_sys "$sysC"
ln -s "../../$name/${name}p1" "$sysC/devices/virtual/block/dm-1/slaves/${name}p1"
echo "1 0 254:1 / / rw - ext4 /dev/mapper/root rw" >"$tmp/mi-root"
run "the disk under an encrypted root (/ on dm-1 on it) refused" 1 "system disk $name, which holds /" -- \
    env DATAVAULT_SYS="$sysC" DATAVAULT_MOUNTINFO="$tmp/mi-root" "$script" "$dev" --yes "${common[@]}"
echo "1 0 0:30 / / rw - overlay overlay rw" >"$tmp/mi-boot"
echo "2 1 259:99 / /boot/firmware rw - vfat /dev/${name}p1 rw" >>"$tmp/mi-boot"
run "the disk holding /boot/firmware refused" 1 "which holds /boot/firmware" -- \
    env DATAVAULT_SYS="$sysA" DATAVAULT_MOUNTINFO="$tmp/mi-boot" "$script" "$dev" --yes "${common[@]}"

mkdir -p "$tmp/occupied"
mount -t tmpfs tmpfs "$tmp/occupied" && mounts+=("$tmp/occupied")
run "an occupied mount point refused" 1 "already a mount point" -- \
    "$script" "$dev" --yes --mountpoint "$tmp/occupied" --name datavault-test

# --- --dry-run -------------------------------------------------------------------------------
run "--dry-run succeeds" 0 "dry run for $dev" -- "$script" "$dev" --dry-run "${common[@]}"
for want in "+ wipefs --all --quiet $dev" \
    "+ cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --label datavault --key-file $etc/datavault/usb.key $dev" \
    "+ cryptsetup open --key-file $etc/datavault/usb.key $dev datavault-test" \
    "+ mkfs.ext4 -q -F -L datavault -m 0 /dev/mapper/datavault-test" \
    "+ mount -o noatime /dev/mapper/datavault-test $mnt" \
    "datavault-test UUID=<UUID of the new LUKS header> $etc/datavault/usb.key luks,nofail" \
    "/dev/mapper/datavault-test $mnt ext4 defaults,nofail,noatime,x-systemd.device-timeout=90s 0 2" \
    "$mnt/.datavault-target" \
    "+ write $etc/systemd/system/$(systemd-escape -p "$mnt").mount.d/datavault.conf: # Written by datavault's setup-usb.sh: see the script. [Mount] LazyUnmount=yes" \
    "+ write $etc/systemd/system/systemd-cryptsetup@datavault\\x2dtest.service.d/datavault.conf:" \
    "ExecStopPost=-$(command -v cryptsetup) close --deferred datavault-test" \
    'target.marker_id = "'; do
    grep -qF -- "$want" <<<"$out" && ok "--dry-run prints: $want" || fail "--dry-run does not print: $want"
done
if [ ! -e "$etc" ] && [ ! -e "$mnt" ] && ! cryptsetup isLuks "$dev" 2>/dev/null; then
    ok "--dry-run changed nothing (no $etc, no $mnt, no LUKS header)"
else
    fail "--dry-run changed something"
fi

# --- confirmation ----------------------------------------------------------------------------
export DATAVAULT_SKIP_DM_PREFLIGHT=1 # this kernel may lack device-mapper: format anyway
out=$(echo wrong | "$script" "$dev" "${common[@]}" 2>&1); code=$?
if [ "$code" = 1 ] && grep -q "not confirmed" <<<"$out" && ! cryptsetup isLuks "$dev" 2>/dev/null && [ ! -e "$etc/datavault/usb.key" ]; then
    ok "a wrong confirmation changes nothing"
else
    fail "wrong confirmation: exit $code: $out"
fi

# --- a real run ------------------------------------------------------------------------------
dm=0
grep -qw device-mapper /proc/misc 2>/dev/null && dm=1
mkdir -p "$etc"
printf '# <target name> <source device> <key file> <options>\nother UUID=1234 none luks\n' >"$etc/crypttab"
printf '# /etc/fstab\nproc /proc proc defaults 0 0\n' >"$etc/fstab"

first_run() {
    out=$(echo "$dev" | "$script" "$dev" "${common[@]}" 2>&1); code=$?
}
first_run
if [ "$dm" = 0 ]; then
    [ "$code" = 3 ] && grep -q "device-mapper not available" <<<"$out" \
        && ok "without device-mapper the run stops at cryptsetup open, saying so (exit 3)" \
        || { fail "run without device-mapper: exit $code"; sed 's/^/        /' <<<"$out"; }
else
    [ "$code" = 0 ] && ok "the real run succeeds" || { fail "real run: exit $code"; sed 's/^/        /' <<<"$out"; }
    mounts+=("$mnt")
fi
cryptsetup isLuks --type luks2 "$dev" && ok "the device is LUKS2" || fail "the device is not LUKS2"
cryptsetup luksDump "$dev" | grep -q 'Label:.*datavault' && ok "the LUKS label is datavault" || fail "LUKS label"
cryptsetup luksDump "$dev" | grep -q 'pbkdf2' && ok "the key slot uses PBKDF2 (cheap unlock for a random key)" || fail "PBKDF"
key="$etc/datavault/usb.key"
if [ "$(stat -c '%a %U %s' "$key" 2>/dev/null)" = "400 root 64" ]; then ok "key file: 64 bytes, 0400, root"; else fail "key file: $(stat -c '%a %U %s' "$key" 2>&1)"; fi
if cryptsetup luksOpen --test-passphrase --key-file "$key" "$dev" 2>/dev/null; then ok "the key file opens the LUKS header"; else fail "the key file does not open the header"; fi
uuid=$(cryptsetup luksUUID "$dev")
key_sum=$(sha256sum "$key")
check_entries() { # LABEL
    local c f
    c=$(grep -c '^datavault-test ' "$etc/crypttab")
    f=$(grep -c " $mnt " "$etc/fstab")
    if [ "$c" = 1 ] && grep -qxF "datavault-test UUID=$uuid $key luks,nofail" "$etc/crypttab"; then ok "$1: one crypttab line, with the LUKS UUID"; else fail "$1: crypttab:"; sed 's/^/        /' "$etc/crypttab"; fi
    if [ "$f" = 1 ] && grep -qxF "/dev/mapper/datavault-test $mnt ext4 defaults,nofail,noatime,x-systemd.device-timeout=90s 0 2" "$etc/fstab"; then ok "$1: one fstab line, nofail"; else fail "$1: fstab:"; sed 's/^/        /' "$etc/fstab"; fi
    if grep -qx 'other UUID=1234 none luks' "$etc/crypttab" && grep -qx 'proc /proc proc defaults 0 0' "$etc/fstab" \
        && grep -q '^# <target name>' "$etc/crypttab"; then ok "$1: other entries and comments kept"; else fail "$1: other entries lost"; fi
}
check_entries "first run"
# Unplugged while mounted: a lazy unmount and a deferred close, so nothing stays busy.
mount_dropin="$etc/systemd/system/$(systemd-escape -p "$mnt").mount.d/datavault.conf"
crypt_dropin="$etc/systemd/system/systemd-cryptsetup@datavault\x2dtest.service.d/datavault.conf"
grep -qx 'LazyUnmount=yes' "$mount_dropin" 2>/dev/null && ok "drop-in: the mount unmounts lazily" || fail "no LazyUnmount drop-in at $mount_dropin"
grep -qx "ExecStopPost=-$(command -v cryptsetup) close --deferred datavault-test" "$crypt_dropin" 2>/dev/null \
    && ok "drop-in: the mapping is closed deferred when the drive goes" || fail "no deferred-close drop-in at $crypt_dropin"
[ -f "$etc/crypttab.datavault-bak" ] && grep -qx 'other UUID=1234 none luks' "$etc/crypttab.datavault-bak" \
    && ok "the previous crypttab is kept as crypttab.datavault-bak" || fail "no crypttab backup"
if [ "$dm" = 1 ]; then
    grep -qE '^id = "[0-9a-f]{32}"$' "$mnt/.datavault-target" && ok "marker written" || fail "marker"
    id=$(sed -n 's/^id = "\(.*\)"$/\1/p' "$mnt/.datavault-target")
    grep -qF "target.marker_id = \"$id\"" <<<"$out" && ok "prints the marker_id line" || fail "marker_id line"
    umount "$mnt"; cryptsetup close datavault-test
fi

# Again, on the same device: the key is reused, the entries replaced, not duplicated.
first_run
if [ "$dm" = 0 ]; then [ "$code" = 3 ]; else [ "$code" = 0 ]; fi && ok "second run: same outcome (exit $code)" || fail "second run: exit $code"
[ "$(sha256sum "$key")" = "$key_sum" ] && grep -q "reusing the existing key file" <<<"$out" \
    && ok "second run: the existing key file is reused, not overwritten" || fail "second run: key file changed"
new_uuid=$(cryptsetup luksUUID "$dev")
[ "$new_uuid" != "$uuid" ] && ok "second run: a new LUKS header (new UUID)" || fail "second run: same UUID?"
uuid=$new_uuid
check_entries "second run"
if [ "$dm" = 1 ]; then umount "$mnt"; cryptsetup close datavault-test; fi

# Without the test override, a kernel without device-mapper is refused before anything.
if [ "$dm" = 0 ]; then
    unset DATAVAULT_SKIP_DM_PREFLIGHT
    new_loop 40
    fresh=$loop
    run "no device-mapper: refused before touching the drive (exit 3)" 3 "device-mapper not available" -- \
        "$script" "$fresh" --yes "${common[@]}"
    cryptsetup isLuks "$fresh" 2>/dev/null && fail "the drive was formatted anyway" || ok "the drive was not touched"
fi

finish
