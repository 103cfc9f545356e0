#!/usr/bin/env python3
"""Measurement core behind bench/run.sh (run that, not this).

For each repeat r (peers in an order rotated by r, so no peer always runs first):
  quiet pass, each peer:  reset app.db from the pristine copy; time the backup under
                          /usr/bin/time -v while sampling the RSS of the whole process
                          tree; measure the output; time the restore the same way
                          (+ syncfs: durable restore); verify.py --mode quiet (integrity,
                          logical equality, hashes); for peers whose "# bench-caps:" line
                          says "drill", time `peer drill OUTDIR SCRATCH` the same way.
  load pass, each peer:   reset app.db; start writer.py (steady tx/s); after a warm-up,
                          run the backup (killed after a timeout: a backup that never
                          finishes is reported as DNF); stop the writer; compute the
                          writer's latency over the backup window; restore and
                          verify.py --mode load (integrity + writer invariant + hashes).
  load pass, control:     the writer alone (no backup) for as long as the target peer's
                          idle backup, at least --control-seconds: the noise floor.
Reports medians over repeats, per-repeat ratios against a baseline peer (median of the
ratios: robust to the machine getting slower or faster between repeats), and a table of
the issue #6 targets for --target-peer (ratios of medians, PASS/FAIL).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.sysconf("SC_PAGE_SIZE")
sys.path.insert(0, BENCH)
from writer import summarize  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ process metrics

class TreeRss:
    """Samples the summed RSS of every process in a session (the timed command tree)."""

    def __init__(self, sid: int, interval: float = 0.02):
        self.sid, self.interval = sid, interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._foreign: set[int] = set()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        total = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self._foreign:
                continue
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    st = f.read()
            except OSError:
                continue
            fields = st[st.rfind(b")") + 2:].split()
            if int(fields[3]) != self.sid:
                self._foreign.add(pid)
                continue
            total += int(fields[21]) * PAGE // 1024
        self.peak_kb = max(self.peak_kb, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak_kb


def parse_time_v(path: str) -> dict:
    out: dict = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.strip().rpartition(": ")
                if k == "User time (seconds)":
                    out["user_s"] = float(v)
                elif k == "System time (seconds)":
                    out["sys_s"] = float(v)
                elif k == "Maximum resident set size (kbytes)":
                    out["maxrss_kb"] = int(v)
                elif k == "Exit status":
                    out["exit_status"] = int(v)
    except OSError:
        pass
    return out


def evict_from_page_cache(folder: str) -> None:
    """Restores and drills read the backup cold, as they would days after it was made: every
    peer's output is dropped from the page cache first (the sources stay warm). Otherwise a
    tool that drops what it wrote (datavault, to spare a 512 MB Pi's cache) would be compared
    with tools whose archive is still in memory. BENCH_WARM_RESTORE=1 turns this off."""
    if os.environ.get("BENCH_WARM_RESTORE") == "1":
        return
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_timed(argv: list[str], env: dict, tag_dir: str, timeout: float) -> dict:
    """Run argv under /usr/bin/time -v in its own session; returns the measurements."""
    os.makedirs(tag_dir, exist_ok=True)
    tfile = os.path.join(tag_dir, "time.txt")
    phase_log = os.path.join(tag_dir, "phases.tsv")
    env = dict(env, BENCH_PHASE_LOG=phase_log)
    load1 = round(os.getloadavg()[0], 2)  # how busy the shared machine was (other work included)
    with open(os.path.join(tag_dir, "stdout.txt"), "wb") as so, \
            open(os.path.join(tag_dir, "stderr.txt"), "wb") as se:
        t0 = time.monotonic()
        p = subprocess.Popen(["/usr/bin/time", "-v", "-o", tfile, *argv], env=env, stdout=so,
                             stderr=se, stdin=subprocess.DEVNULL, start_new_session=True)
        sampler = TreeRss(p.pid)
        # A blocking wait (waitpid) with a timer for the timeout: Popen.wait(timeout=...) polls
        # with sleeps of up to 50 ms, which quantized short wall times.
        done = threading.Event()
        timed_out = threading.Event()

        def kill() -> None:
            if done.is_set():
                return
            timed_out.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the session we started for this command
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        p.wait()
        wall = time.monotonic() - t0
        done.set()
        timer.cancel()
        timed_out = timed_out.is_set()
        tree_kb = sampler.stop()
    r = {"wall_s": round(wall, 4), "rc": p.returncode, "timed_out": timed_out, "loadavg1_before": load1,
         "tree_rss_kb": tree_kb, "t_start": t0, "t_end": t0 + wall, **parse_time_v(tfile)}
    if "user_s" in r:
        r["cpu_s"] = round(r["user_s"] + r["sys_s"], 3)
    phases: dict = {}
    notes: dict = {}
    if os.path.exists(phase_log):
        with open(phase_log) as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition("\t")
                if k.startswith("note:"):
                    notes[k[5:]] = v
                else:
                    phases[k] = round(phases.get(k, 0.0) + float(v), 4)
    r["phases"], r["notes"] = phases, notes
    if p.returncode != 0 or timed_out:
        with open(os.path.join(tag_dir, "stderr.txt"), "rb") as f:
            r["stderr_tail"] = f.read()[-600:].decode(errors="replace")
    return r


def peer_caps(peer: str) -> list[str]:
    """What a peer declares in its "# bench-caps: ..." line: encrypted, fsync, drill."""
    try:
        with open(os.path.join(BENCH, "peers", peer + ".sh")) as f:
            for _i, line in zip(range(20), f):
                if line.startswith("# bench-caps:"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def tree_bytes(path: str) -> tuple[int, int]:
    total = n = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            fp = os.path.join(root, name)
            if os.path.isfile(fp) and not os.path.islink(fp):
                total += os.path.getsize(fp)
                n += 1
    return total, n


# ------------------------------------------------------------------------- harness

class Harness:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = a.workload
        self.pristine = a.pristine
        with open(os.path.join(self.work, "workload.json")) as f:
            self.manifest = json.load(f)
        self.runs_dir = os.path.join(a.data, "runs", a.profile)
        self.dest = a.dest or os.path.join(a.data, "dest")
        os.makedirs(self.dest, exist_ok=True)
        # restores and drills: their own filesystem when run.sh could mount one (like the SD card)
        self.restore_root = os.path.join(a.restore_root or self.runs_dir, "restores", a.profile)
        self.env = dict(os.environ)
        self.records: list[dict] = []

    # -- helpers
    def reset_db(self) -> None:
        for suffix in ("-wal", "-shm", "-journal"):
            try:
                os.remove(os.path.join(self.work, "app.db" + suffix))
            except FileNotFoundError:
                pass
        db = os.path.join(self.work, "app.db")
        shutil.copyfile(self.pristine, db)
        # Durable before the clock starts. Rewriting the file makes ext4 write its 100+ MB out
        # at once (its rule for files truncated and rewritten), and the first fsync of the
        # timed run, on the same filesystem, waited for all of it: 20-40 ms landed at random
        # in peers that fsync (datavault's catalog, restic, borg) and never in the shell
        # pipeline. A real app does not rewrite its database before each backup.
        fd = os.open(db, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fresh(self, *parts: str) -> str:
        d = os.path.join(self.runs_dir, *parts)
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
        return d

    def peer_cmd(self, peer: str, *args: str) -> list[str]:
        return ["bash", os.path.join(BENCH, "peers", peer + ".sh"), *args]

    def verify(self, restore: str, mode: str, tag_dir: str) -> dict:
        t = time.monotonic()
        p = subprocess.run([sys.executable, os.path.join(BENCH, "verify.py"), restore, self.work,
                            "--mode", mode], capture_output=True, text=True)
        try:
            v = json.loads(p.stdout)
        except json.JSONDecodeError:
            v = {"ok": False, "problems": [p.stderr[-400:]]}
        v["verify_s"] = round(time.monotonic() - t, 3)  # the harness's own cost (bench/verify.py)
        return v

    def restore_and_verify(self, peer: str, out: str, rst: str, env: dict, base: str, mode: str,
                           rec: dict) -> None:
        """Restore (timed), syncfs of the restore folder (durable restore), verify.py, and for
        peers that declare "drill" the drill (timed) into a fresh scratch folder."""
        evict_from_page_cache(out)
        r = run_timed(self.peer_cmd(peer, "restore", out, rst), env, os.path.join(base, "log-restore"),
                      self.a.quiet_timeout)
        rec["restore"] = r
        if r["rc"] == 0:
            self.flush(rst, r)
        rec["verify"] = self.verify(rst, mode, base) if r["rc"] == 0 else \
            {"ok": False, "problems": ["restore failed: " + r.get("stderr_tail", "")]}
        if mode == "quiet" and "drill" in peer_caps(peer):
            shutil.rmtree(rst, ignore_errors=True)  # same free space / cache situation as the restore had
            scratch = os.path.join(os.path.dirname(rst), "drill")
            evict_from_page_cache(out)
            d = run_timed(self.peer_cmd(peer, "drill", out, scratch), env, os.path.join(base, "log-drill"),
                          self.a.quiet_timeout)
            d["ok"] = d["rc"] == 0 and not d["timed_out"]
            rec["drill"] = d

    def start_writer(self, tag_dir: str) -> tuple[subprocess.Popen, str]:
        wjson = os.path.join(tag_dir, "writer.json")
        p = subprocess.Popen([sys.executable, os.path.join(BENCH, "writer.py"),
                              os.path.join(self.work, "app.db"), "3600", "--rate", str(self.a.rate),
                              "--json", wjson], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
        line = p.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"writer did not start: {line!r}")
        return p, wjson

    def stop_writer(self, p: subprocess.Popen, wjson: str) -> dict:
        p.send_signal(signal.SIGTERM)
        tail = p.communicate(timeout=60)[0]
        with open(wjson) as f:
            data = json.load(f)
        data["line"] = tail.strip()
        return data

    @staticmethod
    def window(records: list, t0: float, t1: float) -> dict:
        inside = [r for r in records if r[0] <= t1 and r[0] + r[1] >= t0]
        s = summarize(inside)
        dur = max(1e-9, t1 - t0)
        s["rate_achieved"] = round(len(inside) / dur, 1)
        return s

    # -- passes
    def quiet(self, peer: str, rep: int) -> dict:
        base = self.fresh(peer, f"r{rep}-quiet")
        out = self.fresh_out(f"{peer}-r{rep}-quiet")
        rst, tmp = self.restore_dir(peer, f"r{rep}-quiet"), os.path.join(base, "tmp")
        os.makedirs(tmp)
        env = dict(self.env, TMPDIR=tmp)
        self.reset_db()
        rec = {"peer": peer, "rep": rep, "pass": "quiet"}
        b = run_timed(self.peer_cmd(peer, "backup", self.work, out), env, os.path.join(base, "log-backup"),
                      self.a.quiet_timeout)
        rec["backup"] = b
        rec["out_bytes"], rec["out_files"] = tree_bytes(out) if os.path.isdir(out) else (0, 0)
        if b["rc"] == 0 and not b["timed_out"]:
            self.flush(out, b)
            self.restore_and_verify(peer, out, rst, env, base, "quiet", rec)
        else:
            rec["verify"] = {"ok": False, "problems": ["backup failed: " + b.get("stderr_tail", "")]}
        self.cleanup(base, out)
        return rec

    def load(self, peer: str | None, rep: int, timeout: float, control_s: float = 3.0) -> dict:
        name = peer or "(no backup)"
        base = self.fresh(peer or "_control", f"r{rep}-load")
        out = self.fresh_out(f"{peer or '_control'}-r{rep}-load")
        rst, tmp = self.restore_dir(peer or "_control", f"r{rep}-load"), os.path.join(base, "tmp")
        os.makedirs(tmp)
        env = dict(self.env, TMPDIR=tmp)
        self.reset_db()
        rec: dict = {"peer": name, "rep": rep, "pass": "load", "timeout_s": round(timeout, 1)}
        wp, wjson = self.start_writer(base)
        time.sleep(self.a.warmup)
        if peer:
            b = run_timed(self.peer_cmd(peer, "backup", self.work, out), env,
                          os.path.join(base, "log-backup"), timeout)
        else:
            t0 = time.monotonic()
            time.sleep(control_s)
            b = {"t_start": t0, "t_end": time.monotonic(), "rc": 0, "timed_out": False}
            b["wall_s"] = round(b["t_end"] - t0, 4)
        time.sleep(0.2)
        w = self.stop_writer(wp, wjson)
        rec["backup"] = b
        rec["writer_window"] = self.window(w["records"], b["t_start"], b["t_end"])
        rec["writer_warmup"] = self.window(w["records"], w["t0"], b["t_start"])
        rec["writer_total"] = w["summary"]
        if peer:
            rec["out_bytes"], rec["out_files"] = tree_bytes(out) if os.path.isdir(out) else (0, 0)
            if b["rc"] == 0 and not b["timed_out"]:
                self.flush(out, b)
                self.restore_and_verify(peer, out, rst, env, base, "load", rec)
            else:
                why = "timed out (DNF)" if b["timed_out"] else "backup failed"
                rec["verify"] = {"ok": False, "problems": [why + ": " + b.get("stderr_tail", "")[-300:]]}
        self.cleanup(base, out)
        return rec

    def restore_dir(self, *parts: str) -> str:
        """Where a restore goes (the peer creates it); the drill's scratch folder is its sibling."""
        d = os.path.join(self.restore_root, *parts)
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
        return os.path.join(d, "restore")

    def fresh_out(self, name: str) -> str:
        """OUTDIR on the destination filesystem (the "USB drive"); the peer creates it."""
        d = os.path.join(self.dest, name)
        if os.path.exists(d):
            shutil.rmtree(d)
        return d

    @staticmethod
    def flush(out: str, b: dict) -> None:
        """syncfs() of the filesystem holding `out`: time until the backup (or the restored
        files) is durable, for every peer alike (restic, borg and datavault fsync their own
        files, the shell peers do not)."""
        t = time.monotonic()
        subprocess.run(["sync", "-f", out], check=False)
        b["flush_s"] = round(time.monotonic() - t, 4)
        b["durable_s"] = round(b["wall_s"] + b["flush_s"], 4)

    def cleanup(self, base: str, out: str) -> None:
        shutil.rmtree(os.path.join(base, "tmp"), ignore_errors=True)
        peer, tag = os.path.relpath(base, self.runs_dir).split(os.sep)
        shutil.rmtree(os.path.join(self.restore_root, peer, tag), ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    # -- main loop
    def warm_cache(self) -> None:
        for root, _dirs, files in os.walk(self.work):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    while f.read(1 << 20):
                        pass
        with open(self.pristine, "rb") as f:
            while f.read(1 << 20):
                pass

    def run(self) -> None:
        peers = self.a.peers
        self.warm_cache()
        t_all = time.monotonic()
        for rep in range(self.a.repeats):
            k = rep % len(peers)
            order = peers[k:] + peers[:k]
            quiet_wall = {}
            for peer in order:
                rec = self.quiet(peer, rep)
                self.records.append(rec)
                quiet_wall[peer] = rec["backup"]["wall_s"]
                log(f"rep {rep + 1}/{self.a.repeats} quiet {peer:16s} backup {rec['backup']['wall_s']:8.3f}s "
                    f"rc={rec['backup']['rc']} out={rec['out_bytes'] / 1e6:.2f}MB "
                    f"restore {rec.get('restore', {}).get('wall_s', float('nan')):.3f}s "
                    + (f"drill {rec['drill']['wall_s']:.3f}s{'' if rec['drill']['ok'] else ' FAILED'} "
                       if "drill" in rec else "")
                    + f"verify={'ok' if rec['verify']['ok'] else rec['verify']['problems']}")
            # the control window (writer alone) lasts as long as the target peer's idle backup
            # (else the baseline's), at least --control-seconds: a longer window sees a worse max
            ref = quiet_wall.get(self.a.target_peer) or quiet_wall.get(self.a.baseline) or 0
            control_s = min(60.0, max(self.a.control_seconds, ref))
            for peer in [None] + order:
                timeout = max(self.a.load_timeout_min, self.a.load_timeout_factor * quiet_wall.get(peer, 0))
                rec = self.load(peer, rep, timeout, control_s)
                self.records.append(rec)
                ww = rec["writer_window"]
                log(f"rep {rep + 1}/{self.a.repeats} load  {rec['peer']:16s} backup {rec['backup']['wall_s']:8.3f}s "
                    f"{'DNF ' if rec['backup']['timed_out'] else ''}writer tx={ww['tx']} p99={ww['p99_ms']}ms "
                    f"max={ww['max_ms']}ms fail={ww['failures']} "
                    f"verify={'-' if 'verify' not in rec else ('ok' if rec['verify']['ok'] else rec['verify']['problems'])}")
        self.elapsed = time.monotonic() - t_all
        self.reset_db()


# ----------------------------------------------------------------------- reporting

def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def datavault_version() -> str:
    """Which datavault binary was measured: version, path, size, mtime, sha256 prefix, and the
    repository's commit (+ whether src/ differs from it or is newer than the binary)."""
    repo = os.path.dirname(BENCH)
    dv = os.environ.get("DATAVAULT_BIN") or os.path.join(repo, "target", "release", "datavault")
    try:
        ver = subprocess.run([dv, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
        st = os.stat(dv)
        import hashlib
        with open(dv, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:12]
        built = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        out = f"{ver} ({dv}, {st.st_size / 1e6:.1f} MB, built {built}, sha256 {sha}…)"
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "src", "Cargo.toml",
                                "Cargo.lock", "build.rs", ".cargo"], capture_output=True, text=True,
                               timeout=20).stdout.strip()
        newest = max((os.path.getmtime(os.path.join(r, f)) for r, _d, fs in os.walk(os.path.join(repo, "src"))
                      for f in fs), default=0)
        out += f"; repo at {head or '?'}" + (" with uncommitted source changes" if dirty else "")
        if newest > st.st_mtime:
            out += "; **src/ is newer than the binary**"
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def tool_versions(peers: list[str] | None = None) -> dict:
    cmds = {"sqlite3": "sqlite3 --version", "zstd": "zstd --version", "age": "age --version",
            "restic": "restic version", "borg": "borg --version", "gzip": "gzip --version",
            "tar": "tar --version", "python": f"{sys.executable} --version"}
    out = {}
    for k, c in cmds.items():
        try:
            s = subprocess.run(c, shell=True, capture_output=True, text=True, timeout=20)
            out[k] = (s.stdout or s.stderr).strip().splitlines()[0][:90]
        except Exception as e:  # noqa: BLE001
            out[k] = f"unavailable ({e})"
    if peers is None or "datavault" in peers:
        out["datavault"] = datavault_version()
    return out


def machine() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "os": platform.platform(), "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
            "loadavg_end": os.getloadavg()}


def ratio_of_medians(x, y):
    return x / y if x is not None and y else None


def summarize_runs(a: argparse.Namespace, recs: list[dict], manifest: dict) -> dict:
    base = a.baseline if a.baseline in a.peers else a.peers[0]
    by = lambda peer, pss: [r for r in recs if r["peer"] == peer and r["pass"] == pss]  # noqa: E731
    quiet_base = {r["rep"]: r for r in by(base, "quiet")}
    control = {r["rep"]: r for r in by("(no backup)", "load")}
    inp = manifest["input_bytes"]
    per_gb = lambda cpu: None if cpu is None else cpu / (inp / 1e9)  # noqa: E731  CPU s per GB of input
    peers_out = {}
    for peer in a.peers:
        q = by(peer, "quiet")
        ok = [r for r in q if r["backup"]["rc"] == 0 and not r["backup"]["timed_out"]]

        def ratio(get):
            vals = []
            for r in ok:
                b = quiet_base.get(r["rep"])
                if b and get(b) and get(r) is not None:
                    vals.append(get(r) / get(b))
            return med(vals)

        phases: dict = {}  # insertion order = the order the peer ran its phases
        for r in ok:
            for k, v in r["backup"]["phases"].items():
                phases.setdefault(k, []).append(v)
        qs = {
            "runs": len(q), "ok_runs": len(ok),
            "verify_ok": sum(1 for r in q if r["verify"]["ok"]),
            "wall_s": med([r["backup"]["wall_s"] for r in ok]),
            "wall_s_min": min((r["backup"]["wall_s"] for r in ok), default=None),
            "wall_s_max": max((r["backup"]["wall_s"] for r in ok), default=None),
            "durable_s": med([r["backup"].get("durable_s") for r in ok]),
            "durable_ratio": ratio(lambda r: r["backup"].get("durable_s")),
            "cpu_s": med([r["backup"].get("cpu_s") for r in ok]),
            "user_s": med([r["backup"].get("user_s") for r in ok]),
            "sys_s": med([r["backup"].get("sys_s") for r in ok]),
            "maxrss_mb": med([r["backup"].get("maxrss_kb", 0) / 1024 for r in ok]),
            "tree_rss_mb": med([r["backup"]["tree_rss_kb"] / 1024 for r in ok]),
            "out_bytes": med([r["out_bytes"] for r in ok]),
            "out_ratio": (med([r["out_bytes"] for r in ok]) or 0) / inp,
            "wall_ratio": ratio(lambda r: r["backup"]["wall_s"]),
            "cpu_ratio": ratio(lambda r: r["backup"].get("cpu_s")),
            "rss_ratio": ratio(lambda r: r["backup"].get("maxrss_kb")),
            "size_ratio": ratio(lambda r: r["out_bytes"]),
            "phases_s": {k: round(med(v), 4) for k, v in phases.items()},
            "restore_wall_s": med([r["restore"]["wall_s"] for r in ok if "restore" in r]),
            "restore_cpu_s": med([r["restore"].get("cpu_s") for r in ok if "restore" in r]),
            "restore_maxrss_mb": med([r["restore"].get("maxrss_kb", 0) / 1024 for r in ok if "restore" in r]),
            "restore_tree_rss_mb": med([r["restore"]["tree_rss_kb"] / 1024 for r in ok if "restore" in r]),
            "restore_wall_ratio": ratio(lambda r: r.get("restore", {}).get("wall_s")),
            "restore_durable_s": med([r["restore"].get("durable_s") for r in ok if "restore" in r]),
            "restore_durable_ratio": ratio(lambda r: r.get("restore", {}).get("durable_s")),
            "restore_ok": sum(1 for r in ok if r.get("restore", {}).get("rc") == 0),
            "verify_s": med([r["verify"].get("verify_s") for r in ok]),
            "problems": sorted({p for r in q for p in r["verify"].get("problems", [])})[:5],
        }
        drills = [r for r in ok if "drill" in r]
        dok = [r for r in drills if r["drill"]["ok"]]
        qs.update({
            "caps": peer_caps(peer),
            "cpu_s_per_gb": per_gb(qs["cpu_s"]),
            "restore_cpu_s_per_gb": per_gb(qs["restore_cpu_s"]),
            "maxrss_mb_max": max((r["backup"].get("maxrss_kb", 0) / 1024 for r in ok), default=None),
            "drill_runs": len(drills), "drill_ok": len(dok),
            "drill_wall_s": med([r["drill"]["wall_s"] for r in dok]),
            "drill_cpu_s": med([r["drill"].get("cpu_s") for r in dok]),
            "drill_cpu_s_per_gb": per_gb(med([r["drill"].get("cpu_s") for r in dok])),
            "drill_maxrss_mb": med([r["drill"].get("maxrss_kb", 0) / 1024 for r in dok]),
            "drill_tree_rss_mb": med([r["drill"]["tree_rss_kb"] / 1024 for r in dok]),
            "drill_recovery_s": med([float(r["drill"]["notes"]["drill_recovery_seconds"]) for r in dok
                                     if "drill_recovery_seconds" in r["drill"].get("notes", {})]),
            # the drill against the BASELINE's restore (the issue: drill < pipeline restore)
            "drill_vs_base_restore": med([r["drill"]["wall_s"] / quiet_base[r["rep"]]["restore"]["wall_s"]
                                          for r in dok if quiet_base.get(r["rep"], {}).get("restore", {}).get("wall_s")]),
            "drill_problems": sorted({r["drill"].get("stderr_tail", "")[-200:].strip()
                                      for r in drills if not r["drill"]["ok"]})[:3],
        })
        peers_out[peer] = {"quiet": qs}
    load_out = {}
    for peer in ["(no backup)"] + a.peers:
        L = by(peer, "load")
        fin = [r for r in L if not r["backup"]["timed_out"] and r["backup"]["rc"] == 0]
        ws = [r["writer_window"] for r in L]
        # writer's worst latency in this backup's window / in the control window of the same repeat
        lat_ratios = [r["writer_window"]["max_ms"] / control[r["rep"]]["writer_window"]["max_ms"]
                      for r in L if r["rep"] in control and r["writer_window"].get("max_ms")
                      and control[r["rep"]]["writer_window"].get("max_ms")]
        load_out[peer] = {
            "finished": len(fin),
            "maxrss_mb": med([r["backup"]["maxrss_kb"] / 1024 for r in fin if "maxrss_kb" in r["backup"]]),
            "maxrss_mb_max": max((r["backup"].get("maxrss_kb", 0) / 1024 for r in fin), default=None),
            "writer_max_vs_idle": med(lat_ratios),
            "writer_max_vs_idle_worst": max(lat_ratios, default=None),
            "writer_failures_total": sum((r.get("writer_total") or {}).get("failures", 0) or 0 for r in L),
            "runs": len(L), "dnf": sum(1 for r in L if r["backup"]["timed_out"]),
            "failed": sum(1 for r in L if r["backup"]["rc"] != 0 and not r["backup"]["timed_out"]),
            "timeout_s": med([r["timeout_s"] for r in L]),
            "wall_s": med([r["backup"]["wall_s"] for r in fin]),
            "cpu_s": med([r["backup"].get("cpu_s") for r in fin]),
            "phases_s": {k: round(med([r["backup"]["phases"][k] for r in fin if k in r["backup"].get("phases", {})]), 4)
                         for k in dict.fromkeys(k for r in fin for k in r["backup"].get("phases", {}))},
            "window_tx": med([w["tx"] for w in ws]),
            "writer_p50_ms": med([w["p50_ms"] for w in ws]),
            "writer_p99_ms": med([w["p99_ms"] for w in ws]),
            "writer_max_ms": med([w["max_ms"] for w in ws]),
            "writer_max_ms_worst": max((w["max_ms"] or 0 for w in ws), default=None),
            "writer_max_lag_ms": med([w["max_lag_ms"] for w in ws]),
            "writer_failures": sum(w["failures"] for w in ws),
            "writer_rate": med([w["rate_achieved"] for w in ws]),
            "verify_ok": sum(1 for r in L if r.get("verify", {}).get("ok")),
            "integrity_fail": sum(1 for r in L if r.get("verify", {}).get("integrity") is False),
            "invariant_fail": sum(1 for r in L if r.get("verify", {}).get("invariant") is False),
            "problems": sorted({p[:160] for r in L for p in r.get("verify", {}).get("problems", [])})[:5],
            "notes": [r["backup"].get("notes") for r in L if r["backup"].get("notes")],
        }
    return {"baseline": base, "quiet": {p: v["quiet"] for p, v in peers_out.items()}, "load": load_out}


def failed(n: int) -> str:
    return f" ({n} failed)" if n else ""


def fmt(x, nd=2, unit=""):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def verdict(ok) -> str:
    return "–" if ok is None else ("**PASS**" if ok else "**FAIL**")


def xr(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def load_profiles(results_dir: str) -> dict:
    """summary of every results/PROFILE.json beside this one (for "RSS flat across profiles")."""
    out = {}
    for prof in ("small", "medium", "large"):
        p = os.path.join(results_dir, f"{prof}.json")
        try:
            with open(p) as f:
                d = json.load(f)
            out[prof] = {"summary": d["summary"], "date": d["meta"]["date"],
                         "input_bytes": d["workload"]["input_bytes"]}
        except (OSError, KeyError, ValueError):
            pass
    return out


def backup_rss_max(s: dict, peer: str) -> float | None:
    """Worst peak RSS (largest process, MiB) of any finished backup of peer, idle or under load."""
    q, l_ = s["quiet"].get(peer, {}), s["load"].get(peer, {})
    vals = [q.get("maxrss_mb_max", q.get("maxrss_mb")), l_.get("maxrss_mb_max")]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def targets_section(a, s: dict, profiles: dict, peer: str) -> list[str]:
    """The issue #6 targets for `peer` against the baseline, as one table."""
    base = s["baseline"]
    qT, qB = s["quiet"][peer], s["quiet"][base]
    lT, lB, lC = s["load"][peer], s["load"][base], s["load"]["(no backup)"]
    R = []
    R.append(f"## Targets (issue #6): `{peer}` against `{base}` at the same zstd level\n")
    R.append(f"Ratios are **ratios of medians** over the {a.repeats} interleaved repeats (the median of "
             "the per-repeat ratios follows in brackets). Profile "
             f"`{a.profile}`" + (" (the targets are set for `medium`)" if a.profile != "medium" else "") + ".\n")
    R.append("| target | goal | measured | verdict |")
    R.append("|---|---|---|---|")

    def row(name, goal, measured, ok):
        R.append(f"| {name} | {goal} | {measured} | {verdict(ok)} |")

    r = ratio_of_medians(qT["durable_s"], qB["durable_s"])
    row("backup, durable time (app idle; wall + syncfs)", "≤ 0.80×",
        f"{xr(r)} ({fmt(qT['durable_s'], 3)} s vs {fmt(qB['durable_s'], 3)} s) [{xr(qT['durable_ratio'])}]",
        None if r is None else r <= 0.80)
    r = ratio_of_medians(qT["restore_durable_s"], qB["restore_durable_s"])
    rw = ratio_of_medians(qT["restore_wall_s"], qB["restore_wall_s"])
    row("restore with verification (durable: wall + syncfs)", "≤ 0.80×",
        f"{xr(r)} ({fmt(qT['restore_durable_s'], 3)} s vs {fmt(qB['restore_durable_s'], 3)} s) "
        f"[{xr(qT['restore_durable_ratio'])}]; wall alone {xr(rw)} ({fmt(qT['restore_wall_s'], 3)} s vs "
        f"{fmt(qB['restore_wall_s'], 3)} s)", None if r is None else r <= 0.80)
    if qT.get("drill_runs"):
        r = ratio_of_medians(qT["drill_wall_s"], qB["restore_wall_s"])
        row(f"drill vs `{base}` restore (wall)", "< 1.00×",
            f"{xr(r)} ({fmt(qT['drill_wall_s'], 3)} s vs {fmt(qB['restore_wall_s'], 3)} s) "
            f"[{xr(qT['drill_vs_base_restore'])}]; drills passed {qT['drill_ok']}/{qT['drill_runs']}",
            None if r is None else (r < 1.0 and qT["drill_ok"] == qT["drill_runs"]))
    else:
        row(f"drill vs `{base}` restore (wall)", "< 1.00×", f"`{peer}` declares no drill", None)
    lw = ratio_of_medians(lT["wall_s"], lB["wall_s"])
    row(f"finishes under the writer ({a.rate:g} tx/s)", f"every run (issue: `{base}` never does)",
        f"`{peer}` {lT['finished']}/{lT['runs']} in {fmt(lT['wall_s'], 3)} s (idle {fmt(qT['wall_s'], 3)} s); "
        f"`{base}` {lB['finished']}/{lB['runs']}" + (f" ({lB['dnf']} DNF after {fmt(lB['timeout_s'], 1)} s)" if lB["dnf"] else "")
        + (f"; × wall {xr(lw)}" if lw is not None else ""),
        lT["runs"] > 0 and lT["finished"] == lT["runs"] and lT["verify_ok"] == lT["runs"])
    rss = backup_rss_max(s, peer)
    row("peak RSS of a backup (largest process, worst run idle or loaded)", "≤ 40 MiB",
        f"{fmt(rss, 1)} MiB (median idle {fmt(qT['maxrss_mb'], 1)}, whole tree {fmt(qT['tree_rss_mb'], 1)}); "
        f"`{base}` {fmt(backup_rss_max(s, base), 1)} MiB", None if rss is None else rss <= 40.0)
    med_p, lrg = profiles.get("medium"), profiles.get("large")
    if med_p and lrg and peer in med_p["summary"]["quiet"] and peer in lrg["summary"]["quiet"]:
        rm, rl = backup_rss_max(med_p["summary"], peer), backup_rss_max(lrg["summary"], peer)
        growth = None if not rm or rl is None else rl / rm - 1
        row("peak RSS flat: `large` vs `medium`", "within +10 %",
            f"{fmt(rl, 1)} vs {fmt(rm, 1)} MiB ({'–' if growth is None else f'{growth:+.1%}'}; runs of "
            f"{lrg['date']} and {med_p['date']})", None if growth is None else growth <= 0.10)
    else:
        have = ", ".join(sorted(profiles)) or "none"
        row("peak RSS flat: `large` vs `medium`", "within +10 %",
            f"needs results/medium.json and results/large.json (have: {have})", None)
    r = ratio_of_medians(lT["writer_max_ms"], lC["writer_max_ms"])
    row("writer's worst transaction latency during the backup vs no backup", "≤ 2×",
        f"{xr(r)} ({fmt(lT['writer_max_ms'], 1)} ms vs {fmt(lC['writer_max_ms'], 1)} ms) "
        f"[{xr(lT['writer_max_vs_idle'])}; worst repeat {xr(lT['writer_max_vs_idle_worst'])}]",
        None if r is None else r <= 2.0)
    row("failed writer transactions (SQLITE_BUSY or error, whole writer run)", "0",
        f"{lT['writer_failures_total']} in {lT['runs']} runs", lT["writer_failures_total"] == 0 if lT["runs"] else None)
    r = ratio_of_medians(qT["out_bytes"], qB["out_bytes"])
    row("archive size vs `" + base + "`", "within ±2 %",
        f"{xr(r)} ({fmt((qT['out_bytes'] or 0) / 1e6, 2)} MB vs {fmt((qB['out_bytes'] or 0) / 1e6, 2)} MB)",
        None if r is None else abs(r - 1) <= 0.02)
    row("CPU time per GB of input (user+sys): backup / restore / drill", "reported",
        f"`{peer}` {fmt(qT['cpu_s_per_gb'], 1)} / {fmt(qT['restore_cpu_s_per_gb'], 1)} / "
        f"{fmt(qT.get('drill_cpu_s_per_gb'), 1)} s/GB; `{base}` {fmt(qB['cpu_s_per_gb'], 1)} / "
        f"{fmt(qB['restore_cpu_s_per_gb'], 1)} s/GB", None)
    R.append("")
    return R


def write_markdown(a: argparse.Namespace, m: dict, s: dict, path: str, meta: dict,
                   profiles: dict | None = None) -> None:
    base = s["baseline"]
    profiles = profiles or {}
    L = []
    knobs = [f"BENCH_PEERS={','.join(a.peers)}", f"BENCH_REPEATS={a.repeats}"]
    if a.rate != 200:
        knobs.append(f"BENCH_WRITER_RATE={a.rate:g}")
    if getattr(a, "zstd_level", 3) != 3:
        knobs.append(f"BENCH_ZSTD_LEVEL={a.zstd_level}")
    L.append(f"# Backup benchmark: profile `{a.profile}`\n")
    L.append(f"Generated by `{' '.join(knobs)} bench/run.sh {a.profile}` on {meta['date']} ({meta['machine']['cpu']}, "
             f"{meta['machine']['cores']} cores, {meta['machine'].get('mem_gib', '?')} GiB, kernel "
             f"{meta['machine']['kernel']}; load average {', '.join(f'{x:.2f}' for x in meta['machine'].get('loadavg_start', []))} "
             f"at the start); {a.repeats} interleaved repeats (peer order rotated each repeat), "
             f"measuring {meta['elapsed_s']:.0f} s" + (f", {meta['total_s']:.0f} s in all with setup" if meta.get("total_s") else "")
             + f". **Medians**; the × columns are the median of the per-repeat "
             f"ratio against `{base}` (< 1 means less than `{base}`). Raw data: `{a.profile}.json`.\n")
    L.append(f"Workload: `app.db` {m['db']['bytes'] / 1e6:.2f} MB (WAL; "
             + ", ".join(f"{k} {v}" for k, v in m["db"]["rows"].items())
             + f"), `uploads/` {m['uploads']['bytes'] / 1e6:.2f} MB in {m['uploads']['files']} files / "
             f"{m['uploads']['dirs']} dirs ({m['uploads']['incompressible_bytes'] / m['uploads']['bytes']:.0%} "
             f"incompressible bytes, {m['uploads']['min_file'] / 1e3:.1f} KB – {m['uploads']['max_file'] / 1e6:.2f} MB); "
             f"input {m['input_bytes'] / 1e6:.2f} MB.\n")
    L.append(f"Setup: source data warm in the page cache (under /tmp); each OUTDIR on {a.dest_desc}; restores "
             f"and drills {getattr(a, 'restore_desc', None) or 'to /tmp'}. *durable* = wall + `sync -f` (syncfs) of the "
             "filesystem written to (the destination after a backup, the restore's after a restore), so peers that do not fsync (the shell ones) "
             "and peers that do (restic, borg, datavault) are compared at the same point. *Peak RSS "
             "(largest proc)* is /usr/bin/time -v's maximum resident set size (the largest single process); "
             "*whole tree* is the sampled (every 20 ms) sum over every process of the command at once, so "
             "it can miss short peaks. MiB = 2^20 bytes; MB and GB = 10^6 and 10^9 bytes; *CPU s/GB* = "
             "user+sys seconds per GB of input (app.db + uploads).\n")
    tp = getattr(a, "target_peer", "datavault")
    if tp in s["quiet"] and tp != base and base in s["quiet"]:
        L.extend(targets_section(a, s, profiles, tp))
    L.append("## Backup, app idle\n")
    L.append("| peer | encrypted | fsyncs itself | wall s (min–max) | × wall | durable s | × durable | CPU s (user+sys) | × CPU | "
             "CPU s/GB | peak RSS MiB (largest proc) | peak RSS MiB (whole tree) | output MB | output/input | × size | phases (s) | verified |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    yn = lambda q, cap: "yes" if cap in q.get("caps", []) else "no"  # noqa: E731
    for peer, q in s["quiet"].items():
        ph = ", ".join(f"{k} {v:.2f}" for k, v in q["phases_s"].items())
        spread = "" if q["wall_s_min"] is None else f" ({q['wall_s_min']:.3f}–{q['wall_s_max']:.3f})"
        L.append(f"| {peer} | {yn(q, 'encrypted')} | {yn(q, 'fsync')} | {fmt(q['wall_s'], 3)}{spread} | "
                 f"{fmt(q['wall_ratio'])} | {fmt(q['durable_s'], 3)} | {fmt(q['durable_ratio'])} | {fmt(q['cpu_s'])} | {fmt(q['cpu_ratio'])} | "
                 f"{fmt(q.get('cpu_s_per_gb'), 1)} | {fmt(q['maxrss_mb'], 1)} | "
                 f"{fmt(q['tree_rss_mb'], 1)} | {fmt((q['out_bytes'] or 0) / 1e6, 2)} | {fmt(q['out_ratio'], 3)} | "
                 f"{fmt(q['size_ratio'], 3)} | {ph or '–'} | "
                 f"{q['verify_ok']}/{q['runs']}{failed(q['runs'] - q['ok_runs'])} |")
    L.append("\n## Restore (to a fresh directory, with the tool's own verification), then verify.py\n")
    L.append("*durable* adds a syncfs of the restore's filesystem. *verify.py s* is the harness's own check "
             "(not part of any time above).\n")
    L.append("| peer | wall s | × wall | durable s | × durable | CPU s | CPU s/GB | peak RSS MiB (largest proc) | "
             "peak RSS MiB (whole tree) | verify.py s | verified |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for peer, q in s["quiet"].items():
        L.append(f"| {peer} | {fmt(q['restore_wall_s'], 3)} | {fmt(q['restore_wall_ratio'])} | "
                 f"{fmt(q.get('restore_durable_s'), 3)} | {fmt(q.get('restore_durable_ratio'))} | {fmt(q['restore_cpu_s'])} | "
                 f"{fmt(q.get('restore_cpu_s_per_gb'), 1)} | "
                 f"{fmt(q['restore_maxrss_mb'], 1)} | {fmt(q['restore_tree_rss_mb'], 1)} | {fmt(q.get('verify_s'), 2)} | "
                 f"{q['verify_ok']}/{q['runs']} |")
    drillers = [(p, q) for p, q in s["quiet"].items() if q.get("drill_runs")]
    if drillers:
        L.append(f"\n## Drill (prove the archive restores: extract to scratch, check, clean up), app idle\n")
        L.append(f"Run after the restore of the same backup. *× `{base}` restore* = drill wall / `{base}`'s "
                 "restore wall, per repeat, median. *reported* is the recovery time the tool itself prints.\n")
        L.append(f"| peer | wall s | × `{base}` restore | reported s | CPU s | CPU s/GB | peak RSS MiB (largest proc) | "
                 "peak RSS MiB (whole tree) | passed |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for peer, q in drillers:
            L.append(f"| {peer} | {fmt(q['drill_wall_s'], 3)} | {fmt(q['drill_vs_base_restore'])} | "
                     f"{fmt(q['drill_recovery_s'], 3)} | {fmt(q['drill_cpu_s'])} | {fmt(q['drill_cpu_s_per_gb'], 1)} | "
                     f"{fmt(q['drill_maxrss_mb'], 1)} | {fmt(q['drill_tree_rss_mb'], 1)} | {q['drill_ok']}/{q['drill_runs']} |")
    L.append(f"\n## Backup while the app writes ({a.rate:g} tx/s, busy_timeout 5 s)\n")
    L.append("Writer latency is over the backup's own window (BEGIN → COMMIT, including busy waits). "
             "`(no backup)` is the writer alone (the noise floor) for as long as the target peer's idle backup took in "
             f"the same repeat, at least {getattr(a, 'control_seconds', 3.0):g} s. "
             "*max × idle* = the writer's worst latency in the backup's window / its worst in the `(no backup)` "
             "window of the same repeat (median; worst repeat in brackets). "
             f"DNF = killed after the timeout (max({a.load_timeout_min:g} s, {a.load_timeout_factor:g} × idle wall)). "
             "*Failures* = SQLITE_BUSY or other failed transactions over the whole writer run (warm-up included). "
             "Verified = integrity_check ok, writer invariant holds, all uploads hashes equal.\n")
    L.append("| peer | finished | backup wall s | DNF | phases (s) | peak RSS MiB (largest proc) | writer tx in window | p50 ms | p99 ms | "
             "max ms (worst) | max × idle (worst) | max start lag ms | failures | achieved tx/s | verified | integrity / invariant failures |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for peer, l_ in s["load"].items():
        ctl = peer == "(no backup)"
        ph = ", ".join(f"{k} {v:.2f}" for k, v in l_["phases_s"].items()) or "–"
        L.append(f"| {peer} | {'–' if ctl else str(l_.get('finished', '?')) + '/' + str(l_['runs'])} | "
                 f"{fmt(l_['wall_s'], 3)} | {l_['dnf']}/{l_['runs']}{failed(l_['failed'])} | {ph} | "
                 f"{'–' if ctl else fmt(l_.get('maxrss_mb'), 1)} | {fmt(l_['window_tx'], 0)} | "
                 f"{fmt(l_['writer_p50_ms'], 2)} | {fmt(l_['writer_p99_ms'], 1)} | {fmt(l_['writer_max_ms'], 1)} "
                 f"({fmt(l_['writer_max_ms_worst'], 1)}) | "
                 + ("–" if ctl else f"{fmt(l_.get('writer_max_vs_idle'))} ({fmt(l_.get('writer_max_vs_idle_worst'))})")
                 + f" | {fmt(l_['writer_max_lag_ms'], 1)} | {l_.get('writer_failures_total', l_['writer_failures'])} | "
                 f"{fmt(l_['writer_rate'], 0)} | "
                 + (f"{l_['verify_ok']}/{l_['runs']}" if not ctl else "–") + " | "
                 + (f"{l_['integrity_fail']} / {l_['invariant_fail']}" if not ctl else "–") + " |")
    if tp in s["quiet"] and len(profiles) > 1:
        L.append(f"\n## `{tp}` across profiles (from the results/*.json present)\n")
        L.append("| profile | run | input MB | backup durable s | peak RSS MiB (worst backup) | CPU s/GB (backup) |")
        L.append("|---|---|---|---|---|---|")
        for prof, d in profiles.items():
            q = d["summary"]["quiet"].get(tp)
            if not q:
                continue
            L.append(f"| {prof} | {d['date']} | {d['input_bytes'] / 1e6:.1f} | {fmt(q.get('durable_s'), 3)} | "
                     f"{fmt(backup_rss_max(d['summary'], tp), 1)} | {fmt(q.get('cpu_s_per_gb'), 1)} |")
    notes = [(p, n) for p, l_ in s["load"].items() for n in l_["notes"]]
    if notes:
        L.append("\nNotes the peers recorded under load (per repeat):\n")
        for p, n in notes:
            L.append(f"- `{p}`: " + ", ".join(f"{k} = `{v}`" for k, v in n.items()))
    probs = [(p, l_["problems"]) for p, l_ in s["load"].items() if l_["problems"]]
    probs += [(p, q["problems"]) for p, q in s["quiet"].items() if q["problems"]]
    probs += [(p + " drill", q["drill_problems"]) for p, q in s["quiet"].items() if q.get("drill_problems")]
    if probs:
        L.append("\nProblems seen:\n")
        for p, ps in probs:
            for x in ps:
                L.append(f"- `{p}`: {x.strip()}")
    L.append("\n## Tools\n")
    L.append("| tool | version |")
    L.append("|---|---|")
    for k, v in meta["tools"].items():
        L.append(f"| {k} | {v} |")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", metavar="JSON", help="only re-render PROFILE.md from a results JSON")
    ap.add_argument("--profile")
    ap.add_argument("--workload", help="directory made by make_workload.py")
    ap.add_argument("--pristine", help="pristine copy of app.db, restored before each run")
    ap.add_argument("--data", help="scratch root (under /tmp)")
    ap.add_argument("--results")
    ap.add_argument("--dest", help="where OUTDIRs go (a separate filesystem, like the USB drive)")
    ap.add_argument("--dest-desc", default="a directory on the same filesystem")
    ap.add_argument("--restore-root", help="where restores and drills go (default: under --data)")
    ap.add_argument("--restore-desc", help="how the report describes --restore-root")
    ap.add_argument("--peers", default="all")
    ap.add_argument("--baseline", default="pipeline")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--warmup", type=float, default=1.0, help="writer warm-up before the backup, s")
    ap.add_argument("--control-seconds", type=float, default=3.0)
    ap.add_argument("--quiet-timeout", type=float, default=3600.0)
    ap.add_argument("--load-timeout-min", type=float, default=30.0)
    ap.add_argument("--load-timeout-factor", type=float, default=3.0)
    ap.add_argument("--target-peer", default="datavault", help="peer the issue #6 targets table is about")
    ap.add_argument("--zstd-level", type=int, default=int(os.environ.get("BENCH_ZSTD_LEVEL", "3")),
                    help="recorded only: the peers read BENCH_ZSTD_LEVEL themselves")
    ap.add_argument("--started", type=float, help="epoch seconds run.sh started (for the total time)")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            data = json.load(f)
        ra = argparse.Namespace(**data["meta"]["args"])
        s = summarize_runs(ra, data["runs"], data["workload"])
        data["summary"] = s
        with open(a.render, "w") as f:
            json.dump(data, f, indent=1)
        md = os.path.splitext(a.render)[0] + ".md"
        write_markdown(ra, data["workload"], s, md, data["meta"], load_profiles(os.path.dirname(os.path.abspath(a.render))))
        print(f"rendered {md}")
        return 0
    if not all((a.profile, a.workload, a.pristine, a.data, a.results)):
        ap.error("--profile, --workload, --pristine, --data and --results are required")
    pdir = os.path.join(BENCH, "peers")
    available = sorted(f[:-3] for f in os.listdir(pdir) if f.endswith(".sh") and not f.startswith("_"))
    if a.peers == "all":
        preferred = ["pipeline", "pipeline-vacuum", "clerivo", "restic", "restic-vacuum", "borg", "borg-vacuum"]
        a.peers = [p for p in preferred if p in available] + [p for p in available if p not in preferred]
    else:
        a.peers = [p.strip() for p in a.peers.split(",") if p.strip()]
        unknown = [p for p in a.peers if p not in available]
        if unknown:
            print(f"unknown peer(s) {unknown}; available: {available}", file=sys.stderr)
            return 2
    if a.repeats < 1:
        print("--repeats must be >= 1", file=sys.stderr)
        return 2
    h = Harness(a)
    log(f"profile {a.profile}: peers {a.peers}, {a.repeats} repeats, writer {a.rate:g} tx/s")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()
    h.run()
    s = summarize_runs(a, h.records, h.manifest)
    meta = {"date": date, "machine": dict(machine(), loadavg_start=load_start), "tools": tool_versions(a.peers),
            "elapsed_s": round(h.elapsed, 1), "args": vars(a)}
    if a.started:
        meta["total_s"] = round(time.time() - a.started, 1)
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, f"{a.profile}.json"), "w") as f:
        json.dump({"meta": meta, "workload": h.manifest, "summary": s, "runs": h.records}, f, indent=1)
    write_markdown(a, h.manifest, s, os.path.join(a.results, f"{a.profile}.md"), meta, load_profiles(a.results))
    log(f"wrote {a.results}/{a.profile}.md and .json (measuring {h.elapsed:.0f} s"
        + (f", {meta['total_s']:.0f} s with setup" if a.started else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
