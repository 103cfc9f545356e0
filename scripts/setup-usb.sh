#!/usr/bin/env bash
# Prepares a USB drive as DataVault's target: LUKS2 with a key file kept root-only on the Pi,
# ext4 inside (label "datavault"), /etc/crypttab and /etc/fstab entries so it opens and mounts
# at boot (nofail: a missing drive never blocks booting), mounted, with the .datavault-target
# marker that datavault checks before writing. Prints the `target.marker_id = "..."` line
# for /etc/datavault/datavault.toml.
#
# Usage: sudo scripts/setup-usb.sh DEVICE [--dry-run] [--yes]
#            [--mountpoint /mnt/datavault] [--keyfile /etc/datavault/usb.key] [--name datavault]
#
#   DEVICE        the whole USB drive (/dev/sda) or one partition of it (/dev/sda1). ERASED.
#   --dry-run     check everything, print every command it would run, change nothing
#   --yes         do not ask (otherwise: type the device name to confirm)
#   --mountpoint  where the drive is mounted (default /mnt/datavault; another path needs
#                 a drop-in for the units, see systemd/datavault-paths.conf.example)
#   --keyfile     the LUKS key file (default /etc/datavault/usb.key; an existing one is
#                 reused, never overwritten). Keep a copy OFF the Pi: without it, and without
#                 the Pi, the drive cannot be opened.
#   --name        the device-mapper name (default datavault: /dev/mapper/datavault)
#
# Refuses (exit 1, nothing changed): a missing device, a non-block device, the disk that holds
# /, /boot or /boot/firmware (or swap), a device with any mounted partition, a device in use
# by device-mapper (an open LUKS mapping, LVM), an occupied mount point or mapping name.
# Exit 2: bad arguments. Exit 3: device-mapper or a needed tool is missing.
#
# For tests, system locations can be redirected:
#   DATAVAULT_ETC        instead of /etc (crypttab, fstab, and the default key file)
#   DATAVAULT_SYS        instead of /sys (block device topology)
#   DATAVAULT_MOUNTINFO  instead of /proc/self/mountinfo
#   DATAVAULT_SKIP_DM_PREFLIGHT=1  format even without device-mapper (the run then stops at
#                        `cryptsetup open`); only for tests on kernels without dm-crypt.
set -euo pipefail
self=$(readlink -f "$0")

prog=setup-usb
etc=${DATAVAULT_ETC:-/etc}
sys=${DATAVAULT_SYS:-/sys}
mountinfo=${DATAVAULT_MOUNTINFO:-/proc/self/mountinfo}

device=""
dry_run=0
yes=0
mountpoint_dir=/mnt/datavault
keyfile=""
name=datavault

die() { echo "$prog: $*" >&2; exit 1; }
usage_error() { echo "$prog: $*" >&2; echo "usage: $0 DEVICE [--dry-run] [--yes] [--mountpoint DIR] [--keyfile FILE] [--name NAME]" >&2; exit 2; }
missing() { echo "$prog: $*" >&2; exit 3; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --yes|-y) yes=1; shift ;;
        --mountpoint) mountpoint_dir="${2:-}"; shift 2 || usage_error "--mountpoint needs a value" ;;
        --mountpoint=*) mountpoint_dir="${1#*=}"; shift ;;
        --keyfile) keyfile="${2:-}"; shift 2 || usage_error "--keyfile needs a value" ;;
        --keyfile=*) keyfile="${1#*=}"; shift ;;
        --name) name="${2:-}"; shift 2 || usage_error "--name needs a value" ;;
        --name=*) name="${1#*=}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$self"; exit 0 ;;
        -*) usage_error "unknown option: $1" ;;
        *) [ -z "$device" ] || usage_error "only one DEVICE, got '$device' and '$1'"; device="$1"; shift ;;
    esac
done
keyfile=${keyfile:-$etc/datavault/usb.key}
[ -n "$device" ] || usage_error "which device? (lsblk shows the USB drive, e.g. /dev/sda)"
case "$mountpoint_dir" in /*) ;; *) usage_error "--mountpoint must be an absolute path" ;; esac
case "$keyfile" in /*) ;; *) usage_error "--keyfile must be an absolute path" ;; esac
case "$name" in ""|*/*|*[[:space:]]*) usage_error "--name must be a plain name like 'datavault'" ;; esac
mountpoint_dir=${mountpoint_dir%/}
[ -n "$mountpoint_dir" ] || usage_error "--mountpoint cannot be /"

# --- block device topology, from sysfs (no udev needed) ------------------------------------

# "MAJ:MIN" of a block special file.
devnum() {
    local major minor
    major=$(stat -L -c '%t' "$1") && minor=$(stat -L -c '%T' "$1") || return 1
    printf '%d:%d\n' "0x$major" "0x$minor"
}
# The canonical sysfs folder of a "MAJ:MIN".
sysdir_of() {
    local d="$sys/dev/block/$1"
    [ -e "$d" ] || return 1
    readlink -f "$d"
}
# The whole disk's sysfs folder, for a disk or a partition folder.
disk_of() { if [ -f "$1/partition" ]; then dirname "$1"; else echo "$1"; fi; }
# A folder and, for a whole disk, its partitions.
with_partitions() {
    local d="$1" c
    echo "$d"
    if [ ! -f "$d/partition" ]; then
        for c in "$d"/*/; do
            c=${c%/}
            [ -f "$c/partition" ] && echo "$c"
        done
    fi
    return 0
}
# Every device-mapper (or md) device stacked on top of a folder, recursively.
holders_of() {
    local h
    for h in "$1"/holders/*; do
        [ -e "$h" ] || continue
        h=$(readlink -f "$h")
        echo "$h"
        holders_of "$h"
    done
}
# The bottom devices under a folder (itself when nothing is below).
leaves_of() {
    local s found=0
    for s in "$1"/slaves/*; do
        [ -e "$s" ] || continue
        found=1
        leaves_of "$(readlink -f "$s")"
    done
    [ "$found" = 1 ] || echo "$1"
}
# Mount points (decoded) of a "MAJ:MIN", one per line.
mounts_of() {
    awk -v dev="$1" '$3 == dev { print $5 }' "$mountinfo" | sed 's/\\040/ /g; s/\\011/\t/g; s/\\134/\\/g'
}
# "MAJ:MIN" of what is mounted at a path, if anything.
dev_mounted_at() {
    awk -v mp="$1" '$5 == mp { d = $3 } END { if (d != "") print d }' "$mountinfo"
}
human() { basename "$1"; }

# --- checks (read-only) -------------------------------------------------------------------

[ -e "$device" ] || die "$device does not exist (plug the drive in; \`lsblk\` lists the disks)"
[ -b "$device" ] || die "$device is not a block device (give the drive itself, e.g. /dev/sda)"
target_num=$(devnum "$device") || die "cannot read the device number of $device"
target_dir=$(sysdir_of "$target_num") || die "$device ($target_num) is not in $sys/dev/block"
target_disk=$(disk_of "$target_dir")
target_disk_num=$(cat "$target_disk/dev")

# The disk(s) the running system lives on: refuse them outright.
for mp in / /boot /boot/firmware; do
    num=$(dev_mounted_at "$mp") || true
    [ -n "$num" ] || continue
    dir=$(sysdir_of "$num") || continue
    while read -r leaf; do
        [ -n "$leaf" ] || continue
        if [ "$(cat "$(disk_of "$leaf")/dev")" = "$target_disk_num" ]; then
            die "$device is on the system disk $(human "$(disk_of "$leaf")"), which holds $mp: refusing. The USB drive is another disk (\`lsblk\`)"
        fi
    done < <(leaves_of "$dir")
done
if [ -r /proc/swaps ]; then
    while read -r swap _; do
        [ -b "$swap" ] || continue
        snum=$(devnum "$swap") || continue
        sdir=$(sysdir_of "$snum") || continue
        while read -r leaf; do
            [ -n "$leaf" ] || continue
            if [ "$(cat "$(disk_of "$leaf")/dev")" = "$target_disk_num" ]; then
                die "$device holds the active swap $swap: refusing"
            fi
        done < <(leaves_of "$sdir")
    done < <(tail -n +2 /proc/swaps)
fi

# Anything on the device in use: mounted partitions, mappings stacked on it.
while read -r part; do
    [ -n "$part" ] || continue
    for d in "$part" $(holders_of "$part"); do
        num=$(cat "$d/dev" 2>/dev/null) || continue
        mps=$(mounts_of "$num")
        if [ -n "$mps" ]; then
            mp=$(echo "$mps" | head -n 1)
            die "$device is mounted: $(human "$d") is mounted at $mp. Refusing to erase it; unmount it first (sudo umount '$mp') if it really is the drive to erase"
        fi
    done
    holders=$(holders_of "$part")
    if [ -n "$holders" ]; then
        die "$device is in use: $(human "$part") is held by $(for h in $holders; do printf '%s ' "$(cat "$h/dm/name" 2>/dev/null || human "$h")"; done)(an open LUKS mapping or LVM). Close it first (sudo cryptsetup close NAME)"
    fi
done < <(with_partitions "$target_dir")

existing=$(dev_mounted_at "$mountpoint_dir") || true
if [ -n "$existing" ]; then
    die "$mountpoint_dir is already a mount point ($existing): unmount it first, or choose --mountpoint"
fi
if [ -e "/dev/mapper/$name" ]; then
    die "/dev/mapper/$name already exists (a drive is open under that name): sudo umount $mountpoint_dir; sudo cryptsetup close $name, or choose --name"
fi

for tool in cryptsetup mkfs.ext4 mount; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        if [ "$dry_run" = 1 ]; then
            echo "$prog: note: $tool is not installed (sudo apt install cryptsetup e2fsprogs)" >&2
        else
            missing "$tool is not installed: sudo apt install cryptsetup e2fsprogs"
        fi
    fi
done
if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "must run as root: sudo $0 $device ..."
fi
# /dev/mapper/control alone proves nothing (libdevmapper creates the node even when the
# kernel has no device-mapper): ask the kernel.
dm_available() { grep -qw device-mapper /proc/misc 2>/dev/null || grep -qw device-mapper /proc/devices 2>/dev/null; }
dm_ok=1
dm_available || dm_ok=0
if [ "$dm_ok" = 0 ] && [ "${DATAVAULT_SKIP_DM_PREFLIGHT:-0}" != 1 ]; then
    if [ "$dry_run" = 1 ]; then
        echo "$prog: note: device-mapper not available (not in /proc/misc): a real run would refuse" >&2
    else
        missing "device-mapper not available (not in /proc/misc; try: sudo modprobe dm_crypt): nothing was changed"
    fi
fi

size=$(( $(cat "$target_dir/size" 2>/dev/null || echo 0) * 512 ))
model=$(sed 's/[[:space:]]*$//' "$target_disk/device/model" 2>/dev/null || true)
describe="$device ($(human "$target_dir"), $((size / 1000000)) MB${model:+, $model})"

# --- the plan ------------------------------------------------------------------------------

crypttab="$etc/crypttab"
fstab="$etc/fstab"
mapper="/dev/mapper/$name"
# nofail: the boot never waits for the drive. The device timeout only bounds how long the
# mount (and the drill and backup units ordered after it) wait for the unlocked drive; 10 s
# was too short for a slow boot (on the Pi VM the unlock came 30 s after the mount gave up,
# and nothing mounted the drive afterwards). 90 s is systemd's own default, written out.
fstab_line="$mapper $mountpoint_dir ext4 defaults,nofail,noatime,x-systemd.device-timeout=90s 0 2"
marker="$mountpoint_dir/.datavault-target"

q() { printf '%q ' "$@" | sed 's/ $//'; }
run() {
    if [ "$dry_run" = 1 ]; then
        echo "+ $(q "$@")"
    else
        "$@"
    fi
}

# Replace the line whose field FIELD equals KEY (comments kept) with LINE, or append it;
# leave the file untouched when it already says exactly that. A copy of the old file is kept
# as FILE.datavault-bak the first time.
set_entry() {
    local file="$1" field="$2" key="$3" line="$4" tmp existed=1
    if [ "$dry_run" = 1 ]; then
        echo "+ set the '$key' line of $file to: $line"
        return 0
    fi
    mkdir -p "$(dirname "$file")"
    [ -e "$file" ] || { existed=0; touch "$file"; chmod 0644 "$file"; }
    if awk -v f="$field" -v k="$key" -v l="$line" '
            /^[[:space:]]*#/ { next } $f == k { n++; if ($0 != l) bad = 1 }
            END { exit !(n == 1 && !bad) }' "$file"; then
        echo "$prog: $file already has: $line"
        return 0
    fi
    if [ "$existed" = 1 ] && [ ! -e "$file.datavault-bak" ]; then
        cp -p "$file" "$file.datavault-bak"
    fi
    tmp=$(mktemp "$file.XXXXXX")
    awk -v f="$field" -v k="$key" '/^[[:space:]]*#/ { print; next } $f != k { print }' "$file" >"$tmp"
    printf '%s\n' "$line" >>"$tmp"
    chmod --reference="$file" "$tmp" 2>/dev/null || chmod 0644 "$tmp"
    mv "$tmp" "$file"
    echo "$prog: $file: $line"
}

if [ "$dry_run" = 1 ]; then
    echo "$prog: dry run for $describe: nothing will be changed. It would run:"
else
    echo "$prog: about to ERASE $describe and make it the DataVault drive ($mountpoint_dir)."
    if [ "$yes" = 0 ]; then
        answer=""
        if [ -t 0 ]; then
            read -r -p "Type the device name ($device) to erase it: " answer || true
        else
            read -r answer || true
        fi
        if [ "$answer" != "$device" ] && [ "$answer" != "$(basename "$device")" ]; then
            die "not confirmed (expected '$device'): nothing was changed"
        fi
    fi
fi

# 1. The key file: 64 random bytes, root-only. An existing one is reused (it may open
#    another datavault drive: never overwrite it).
if [ -e "$keyfile" ]; then
    echo "$prog: reusing the existing key file $keyfile"
    run chmod 0400 "$keyfile"
else
    run install -d -m 0755 "$(dirname "$keyfile")"
    if [ "$dry_run" = 1 ]; then
        echo "+ (umask 077; head -c 64 /dev/urandom > $(q "$keyfile.tmp")) && chmod 0400 $(q "$keyfile.tmp") && mv $(q "$keyfile.tmp") $(q "$keyfile")"
    else
        (umask 077; head -c 64 /dev/urandom >"$keyfile.tmp")
        chmod 0400 "$keyfile.tmp"
        mv "$keyfile.tmp" "$keyfile"
        echo "$prog: new key file $keyfile (0400)"
    fi
fi

# 2. LUKS2. The key is 512 random bits, so a slow, memory-hard KDF adds nothing but boot
#    time and RAM (argon2id wants up to 1 GiB; a Pi Zero 2 W has 512 MB): PBKDF2, and at
#    its minimum of 1000 iterations. Stretching a random key protects nothing, and the
#    benchmarked default (2 s of this CPU) made the unlock at boot lose the race against the
#    mount's device timeout on the Pi VM (#13).
run wipefs --all --quiet "$device"
run cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --label datavault --key-file "$keyfile" "$device"
if [ "$dry_run" = 1 ]; then
    uuid='<UUID of the new LUKS header>'
    echo "+ cryptsetup luksUUID $(q "$device")"
else
    uuid=$(cryptsetup luksUUID "$device")
fi

# 3. Boot-time entries (idempotent: one line for the name, one for the mount point).
set_entry "$crypttab" 1 "$name" "$name UUID=$uuid $keyfile luks,nofail"
set_entry "$fstab" 2 "$mountpoint_dir" "$fstab_line"

# 3b. Unplugged while mounted (a cable, a careless owner): systemd unmounts the drive and
#     closes the mapping, but a backup still holding its archive open keeps both busy, and
#     nothing tries again: every later run met a dead mount (seen on the Pi VM, #13). A lazy
#     unmount and a deferred close let both finish on their own once the last file is
#     closed; the next backup or drill (its unit wants the mount) unlocks and mounts the
#     drive again when it is back.
# systemd's unit-name escaping (systemd-escape, or the same rules by hand): "/" becomes "-"
# in a path, every byte but [A-Za-z0-9:_.] (and a leading ".") becomes \xHH.
unit_escape() { # unit_escape STRING [--path]
    local s=$1 out="" c i hex
    if command -v systemd-escape >/dev/null 2>&1; then
        systemd-escape ${2:+"$2"} -- "$s"
        return
    fi
    if [ "${2:-}" = --path ]; then
        s=$(printf '%s' "$s" | tr -s '/'); s=${s#/}; s=${s%/}
    fi
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        if [ "$c" = / ] && [ "${2:-}" = --path ]; then out+=-
        elif [[ "$c" =~ [A-Za-z0-9:_] ]] || { [ "$c" = . ] && [ "$i" -gt 0 ]; }; then out+=$c
        else printf -v hex '%02x' "'$c"; out+="\\x$hex"; fi
    done
    printf '%s\n' "$out"
}
set_dropin() { # set_dropin FILE TEXT
    if [ "$dry_run" = 1 ]; then
        echo "+ write $1: $(printf '%s' "$2" | tr '\n' ' ')"
        return 0
    fi
    mkdir -p "$(dirname "$1")"
    printf '%s\n' "$2" >"$1.tmp"
    chmod 0644 "$1.tmp"
    mv "$1.tmp" "$1"
    echo "$prog: $1"
}
cryptsetup_bin=$(command -v cryptsetup 2>/dev/null || echo /sbin/cryptsetup)
set_dropin "$etc/systemd/system/$(unit_escape "$mountpoint_dir" --path).mount.d/datavault.conf" \
    "# Written by datavault's setup-usb.sh: see the script.
[Mount]
LazyUnmount=yes"
set_dropin "$etc/systemd/system/systemd-cryptsetup@$(unit_escape "$name").service.d/datavault.conf" \
    "# Written by datavault's setup-usb.sh: see the script.
[Service]
ExecStopPost=-$cryptsetup_bin close --deferred $name"

# 4. Open, make the file system, mount.
if [ "$dry_run" = 1 ]; then
    run cryptsetup open --key-file "$keyfile" "$device" "$name"
elif ! cryptsetup open --key-file "$keyfile" "$device" "$name"; then
    if ! dm_available; then
        missing "cryptsetup open failed: device-mapper not available (this kernel has no device-mapper). The drive is LUKS-formatted and $crypttab/$fstab are written; on a kernel with dm-crypt, run this again"
    fi
    die "cryptsetup open $device failed (see above)"
fi
run mkfs.ext4 -q -F -L datavault -m 0 "$mapper"
run mkdir -p "$mountpoint_dir"
run mount -o noatime "$mapper" "$mountpoint_dir"
run chmod 0700 "$mountpoint_dir"

# 5. The marker datavault checks (target.marker_id) before it writes anything.
if [ "$dry_run" = 1 ]; then
    id='<random 128-bit hex id>'
    echo "+ write 'id = \"$id\"' to $marker"
else
    id=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    (umask 022; printf 'id = "%s"\n' "$id" >"$marker.tmp")
    sync "$marker.tmp" 2>/dev/null || sync
    mv "$marker.tmp" "$marker"
fi

# 6. Let systemd's generators see the new crypttab/fstab entries.
if [ -d /run/systemd/system ] && [ "$etc" = /etc ]; then
    run systemctl daemon-reload
fi

cat <<EOF

$prog: done: $mountpoint_dir is the DataVault drive. The line for the config:

target.marker_id = "$id"

that is, in /etc/datavault/datavault.toml:

[target]
path = "$mountpoint_dir"
marker_id = "$id"

Keep a copy of $keyfile OFF the Pi (with the age identity): it is the only way to open
this drive anywhere else.
EOF
if [ "$mountpoint_dir" != /mnt/datavault ]; then
    echo "The systemd units expect /mnt/datavault: add ReadWritePaths=$mountpoint_dir in a drop-in (systemd/datavault-paths.conf.example)."
fi
