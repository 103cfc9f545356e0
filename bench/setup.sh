#!/usr/bin/env bash
# Install the benchmark's tools from Debian 12 packages (idempotent; needs root).
#   setup.sh          install what is missing
#   setup.sh --check  exit 0 if everything is present, 1 otherwise (installs nothing)
set -euo pipefail
declare -A PKG=([sqlite3]=sqlite3 [zstd]=zstd [age]=age [age-keygen]=age [restic]=restic
	[borg]=borgbackup [/usr/bin/time]=time [gzip]=gzip [tar]=tar [sha256sum]=coreutils
	[python3]=python3)
missing=()
for c in "${!PKG[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("${PKG[$c]}"); done
if [ "${1:-}" = "--check" ]; then
	[ ${#missing[@]} -eq 0 ] && exit 0
	echo "missing packages: ${missing[*]}" >&2
	exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" -eq 0 ] || { echo "setup.sh: need root to apt-get install ${missing[*]}" >&2; exit 1; }
	apt-get -o DPkg::Lock::Timeout=300 update -q
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q $(printf '%s\n' "${missing[@]}" | sort -u)
fi
echo "bench tools present: $(sqlite3 --version | cut -d' ' -f1) zstd $(zstd --version | grep -o 'v[0-9.]*') age $(age --version) $(restic version | cut -d' ' -f1,2) $(borg --version)"
