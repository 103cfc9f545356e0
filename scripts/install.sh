#!/usr/bin/env bash
# Installs DataVault without the .deb: the binary, the config template, the systemd units and
# the state folder; enables the units when systemd is running. Safe to run again (upgrade).
#
# Usage: sudo scripts/install.sh [--binary PATH] [--prefix /usr] [--no-enable]
#        sudo scripts/install.sh --uninstall [--prefix /usr]
#
#   --binary PATH  the datavault binary (default: target/release/datavault, else
#                  target/debug/datavault; `cargo build --release` first)
#   --prefix DIR   binary in DIR/bin, docs in DIR/share/doc/datavault (default /usr); the
#                  units' ExecStart= is rewritten to match
#   --no-enable    install only; do not enable anything
#   --uninstall    disable and remove the binary, the units and the docs. Keeps
#                  /etc/datavault (config, age identity, USB key file), /var/lib/datavault
#                  (catalog, metrics) and every archive on the drive, and says so.
#
# What it installs (under $DATAVAULT_ROOT, default /, for tests and image builds; tests also
# set DATAVAULT_SYSTEMCTL (a stub) and DATAVAULT_SYSTEMD_RUN_DIR (instead of /run/systemd/system)):
#   PREFIX/bin/datavault                       0755
#   /etc/datavault/                            0755, created if missing
#   /etc/datavault/datavault.toml.example      0644, refreshed; datavault.toml is never touched
#   /etc/systemd/system/datavault-*.service, datavault-*.timer         0644
#   PREFIX/share/doc/datavault/datavault-paths.conf.example, appliance.md
#   /var/lib/datavault/                        0700
# Then, only when systemd is running (/run/systemd/system) and DATAVAULT_ROOT is /:
# systemctl daemon-reload; enable datavault-backup.timer, datavault-drill.service and
# datavault-agent.service; start the timer and the agent only if datavault.toml exists.
set -euo pipefail
self=$(readlink -f "$0")

cd "$(dirname "$0")/.."
prog=install
root=${DATAVAULT_ROOT:-/}
root=${root%/}
prefix=/usr
binary=""
uninstall=0
enable=1

die() { echo "$prog: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --uninstall) uninstall=1; shift ;;
        --prefix) prefix="${2:-}"; shift 2 || die "--prefix needs a value" ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --binary) binary="${2:-}"; shift 2 || die "--binary needs a value" ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --no-enable) enable=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$self"; exit 0 ;;
        *) echo "$prog: unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$prefix" in /*) prefix=${prefix%/} ;; *) echo "$prog: --prefix must be absolute" >&2; exit 2 ;; esac

# The offsite units are installed, not enabled: that is the admin's step once the bucket
# and /etc/datavault/offsite.credentials exist (docs/offsite.md).
units=(datavault-agent.service datavault-backup.service datavault-backup.timer
    datavault-drill.service datavault-notify@.service datavault-offsite.service datavault-offsite.timer)
enabled_units=(datavault-backup.timer datavault-drill.service datavault-agent.service)
bin_path="$root$prefix/bin/datavault"
unit_dir="$root/etc/systemd/system"
doc_dir="$root$prefix/share/doc/datavault"
etc_dir="$root/etc/datavault"
state_dir="$root/var/lib/datavault"

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    die "must run as root (sudo $0 ...), or set DATAVAULT_ROOT to install into a folder"
fi
# Tests point these at a stub and a fake folder; systemctl is otherwise never run for a
# DATAVAULT_ROOT (it would act on this machine's systemd, not on the folder).
systemctl=${DATAVAULT_SYSTEMCTL:-systemctl}
systemd_live=0
if [ -d "${DATAVAULT_SYSTEMD_RUN_DIR:-/run/systemd/system}" ] && { [ -z "$root" ] || [ -n "${DATAVAULT_SYSTEMCTL:-}" ]; }; then
    systemd_live=1
fi

changed() { echo "$prog: $*"; }
# install_file MODE SRC DEST: copies only when different, and says what it did.
install_file() {
    local mode="$1" src="$2" dest="$3"
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
        echo "$prog: up to date: ${dest#"$root"}"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    # Through a temporary name and a rename: a running datavault keeps its old binary.
    install -m "$mode" "$src" "$dest.new.$$"
    mv -f "$dest.new.$$" "$dest"
    changed "installed ${dest#"$root"}"
}

if [ "$uninstall" = 1 ]; then
    if [ "$systemd_live" = 1 ]; then
        "$systemctl" disable --now "${enabled_units[@]}" 2>/dev/null || true
    fi
    for u in "${units[@]}"; do
        if [ -e "$unit_dir/$u" ]; then rm -f "$unit_dir/$u"; changed "removed /etc/systemd/system/$u"; fi
        # Enablement links left behind when systemd was not running.
        for link in "$unit_dir"/*.wants/"$u"; do
            [ -L "$link" ] && rm -f "$link"
        done
    done
    if [ -e "$bin_path" ]; then rm -f "$bin_path"; changed "removed $prefix/bin/datavault"; fi
    if [ -d "$doc_dir" ]; then
        rm -f "$doc_dir/datavault-paths.conf.example" "$doc_dir/appliance.md" "$doc_dir/README.md"
        rmdir "$doc_dir" 2>/dev/null || true
    fi
    if [ "$systemd_live" = 1 ]; then
        "$systemctl" daemon-reload
    fi
    cat <<EOF
$prog: DataVault is uninstalled. Kept on purpose:
  /etc/datavault       config, the age identity (the only key to the archives), the USB key file
  /var/lib/datavault   the catalog and metrics
  the archives on the USB drive, and its /etc/crypttab and /etc/fstab entries
Delete them yourself only if you are sure; without the identity no archive can be restored.
EOF
    if [ -d "$unit_dir/datavault-.service.d" ]; then
        echo "  /etc/systemd/system/datavault-.service.d (your drop-in) is kept too."
    fi
    exit 0
fi

# --- install --------------------------------------------------------------------------------
if [ -z "$binary" ]; then
    for candidate in target/release/datavault target/debug/datavault; do
        if [ -x "$candidate" ]; then binary=$candidate; break; fi
    done
    [ -n "$binary" ] || die "no binary: run \`cargo build --release\` first, or give --binary PATH"
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
    die "--binary $binary is not an executable file"
fi
if ! "$binary" --version >/dev/null 2>&1; then
    echo "$prog: warning: \`$binary --version\` does not run here (another architecture?); installing it anyway" >&2
fi
if [ -z "$root" ] && command -v dpkg-query >/dev/null 2>&1 \
    && dpkg-query -S "$prefix/bin/datavault" >/dev/null 2>&1; then
    die "$prefix/bin/datavault belongs to the datavault package: upgrade with apt, or remove the package first"
fi
for u in "${units[@]}"; do
    [ -f "systemd/$u" ] || die "systemd/$u is missing from this checkout"
done

install_file 0755 "$binary" "$bin_path"

if [ ! -d "$etc_dir" ]; then
    install -d -m 0755 "$etc_dir"
    changed "created /etc/datavault"
fi
install_file 0644 config/datavault.example.toml "$etc_dir/datavault.toml.example"
config_exists=0
if [ -e "$etc_dir/datavault.toml" ]; then
    config_exists=1
    echo "$prog: kept your /etc/datavault/datavault.toml (never overwritten)"
fi

if [ ! -d "$state_dir" ]; then
    install -d -m 0700 "$state_dir"
    changed "created /var/lib/datavault (0700)"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for u in "${units[@]}"; do
    sed "s|/usr/bin/datavault|$prefix/bin/datavault|g" "systemd/$u" >"$tmp/$u"
    install_file 0644 "$tmp/$u" "$unit_dir/$u"
done
install_file 0644 systemd/datavault-paths.conf.example "$doc_dir/datavault-paths.conf.example"
[ -f docs/appliance.md ] && install_file 0644 docs/appliance.md "$doc_dir/appliance.md"
install_file 0644 README.md "$doc_dir/README.md"

next_steps() {
    echo "$prog: next steps:"
    if [ "$config_exists" = 0 ]; then
        echo "  sudo datavault init --keygen        # or: cp /etc/datavault/datavault.toml.example /etc/datavault/datavault.toml"
        echo "  sudoedit /etc/datavault/datavault.toml"
    fi
    echo "  let the units write the app's database folder: $prefix/share/doc/datavault/datavault-paths.conf.example"
    if [ "$systemd_live" = 0 ] || [ "$enable" = 0 ]; then
        echo "  sudo systemctl daemon-reload"
        echo "  sudo systemctl enable --now datavault-backup.timer datavault-agent.service"
        echo "  sudo systemctl enable datavault-drill.service"
    elif [ "$config_exists" = 0 ]; then
        echo "  sudo systemctl start datavault-backup.timer datavault-agent.service"
    fi
    echo "  sudo datavault status"
}

if [ "$systemd_live" = 1 ]; then
    "$systemctl" daemon-reload
    if [ "$enable" = 1 ]; then
        "$systemctl" enable --quiet "${enabled_units[@]}"
        changed "enabled ${enabled_units[*]}"
        if [ "$config_exists" = 1 ]; then
            "$systemctl" start datavault-backup.timer
            # A running agent picks up the new binary on restart; a stopped one starts.
            "$systemctl" restart datavault-agent.service || echo "$prog: datavault-agent did not start: journalctl -u datavault-agent" >&2
        else
            echo "$prog: not starting anything before /etc/datavault/datavault.toml exists"
        fi
    fi
elif [ -z "$root" ]; then
    echo "$prog: systemd is not running here: nothing enabled"
else
    echo "$prog: installed under $root: systemctl not run"
fi
next_steps
