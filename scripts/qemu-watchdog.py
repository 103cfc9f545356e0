#!/usr/bin/env python3
"""Cargo's test runner for the aarch64 suite under qemu-user (scripts/ci-aarch64.sh).

qemu-user sometimes never returns from a fork in a multithreaded guest: the child it makes
neither runs nor exits. The test suite forks a lot (every integration test spawns `datavault`,
which spawns the stop and start commands), and one such hang, with no timeout anywhere, once
held a CI run until its 90 minutes ran out, in a test that takes 2.7 s under qemu
(`the_demo_speaks_json_...`). The same test then passed 187 runs in a row under qemu here, and
never hung natively; such hangs are known in other projects' emulated CI (docs/pi-build.md).

So this runs one test binary under `qemu-aarch64-static -L /` like `.cargo/config.toml`'s runner,
passes its output through, and notes each test that ends. When the binary prints nothing for
QEMU_WATCHDOG_SECONDS (300; the slowest single test took 105 s under qemu here), every
process of its session is killed, and the tests that had not ended are run once more, alone
in a fresh binary. A test that hangs twice fails the run; so does any real failure, at once:
only silence is retried.

Usage (cargo appends the test binary and its arguments):
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="python3 scripts/qemu-watchdog.py" cargo test ...
"""

import os
import re
import select
import signal
import subprocess
import sys
import time

QUIET_LIMIT = int(os.environ.get("QEMU_WATCHDOG_SECONDS", "300"))
QEMU = ["qemu-aarch64-static", "-L", "/"]  # .cargo/config.toml's runner for aarch64: keep them alike
ENDED = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)")


def say(msg):
    print(f"=== qemu-watchdog: {msg}", file=sys.stderr, flush=True)


def session_members(sid):
    """Every process of session `sid` (field 6 of /proc/PID/stat), the stragglers included:
    the stop and start commands run in process groups of their own, not in sessions."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="latin-1") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def kill_session(sid):
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_once(argv):
    """Run argv in a session of its own; returns (exit code, or None if it went silent; the
    tests that passed or were ignored; the tests that failed)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    # Its own session is out of reach of a Ctrl-C or a cancelled CI job: pass those on.
    def stop(signum, _frame):
        kill_session(proc.pid)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fd = proc.stdout.fileno()
    ended, failed, pending = set(), set(), b""
    last_output = time.monotonic()
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            last_output = time.monotonic()
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                m = ENDED.match(line.decode("utf-8", "replace"))
                if m:
                    (failed if m.group(2) == "FAILED" else ended).add(m.group(1))
        elif proc.poll() is not None:
            # The binary is gone but something it started still holds the pipe open.
            break
        elif time.monotonic() - last_output > QUIET_LIMIT:
            kill_session(proc.pid)
            proc.wait()
            return None, ended, failed
    code = proc.wait()
    kill_session(proc.pid)  # whatever it left behind
    # Killed by a signal: the shell's convention, not Popen's negative number.
    return (128 - code if code < 0 else code), ended, failed


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: qemu-watchdog.py TEST_BINARY [ARGS...]")
    binary, test_args = args[0], args[1:]
    name = os.path.basename(binary)
    code, ended, failed = run_once(QEMU + args)
    if code is not None:
        sys.exit(code)
    say(f"{name} printed nothing for {QUIET_LIMIT} s (a qemu-user hang): killed after {len(ended)} tests passed")
    if failed:
        say(f"{name}: not retried, these tests failed before it went silent: {', '.join(sorted(failed))}")
        sys.exit(101)
    # Adding --exact would change what given filters or skips mean: a command with arguments
    # of its own is rerun whole, as it was (CI gives none).
    if test_args:
        rerun = QEMU + args
    else:
        rerun = QEMU + args + ["--exact"] + [x for t in sorted(ended) for x in ("--skip", t)]
    say(f"{name}: running {'it whole' if test_args else 'the tests that had not ended'} once more")
    code, _, _ = run_once(rerun)
    if code is None:
        say(f"{name} went silent again for {QUIET_LIMIT} s: failing")
        sys.exit(124)
    sys.exit(code)


if __name__ == "__main__":
    main()
