#!/usr/bin/env python3
"""The second-day scenario (issue #9), run by `BENCH_SCENARIO=day2 bench/run.sh PROFILE`.

For each repeat and peer: a fresh copy of the workload and an empty OUTDIR on the
destination filesystem; backup 1; bench/day2.py (the day's changes, seeded); backup 2 into
the same OUTDIR (BENCH_INCREMENTAL=1, tool caches kept in BENCH_PEER_STATE); restore of
backup 2 checked by verify.py; prune to the newest backup. Measured: wall and peak RSS of
each step (/usr/bin/time -v), bytes in OUTDIR after each (synced). Writes
results/PROFILE-day2.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)


def du(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def syncfs(path: str) -> float:
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        subprocess.run(["sync", "-f", path], check=False)
    finally:
        os.close(fd)
    return time.monotonic() - t0


def timed(cmd: list, env: dict, log: str) -> dict:
    tv = log + ".time"
    t0 = time.monotonic()
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        rc = subprocess.run(["/usr/bin/time", "-v", "-o", tv] + cmd, env=env, stdout=out, stderr=err).returncode
    wall = time.monotonic() - t0
    rss = 0
    if os.path.exists(tv):
        for line in open(tv):
            if "Maximum resident set size" in line:
                rss = int(line.rsplit(":", 1)[1])
    return {"rc": rc, "wall": wall, "rss_mib": rss / 1024}


def newest_ctime(root: str) -> float:
    newest = 0.0
    for d, _, files in os.walk(root):
        for f in files:
            newest = max(newest, os.lstat(os.path.join(d, f)).st_ctime)
    return newest


def one(a, peer: str, rep: int) -> dict:
    run = os.path.join(a.data, "runs", f"day2-{peer}-{rep}")
    out = os.path.join(a.dest, f"day2-{peer}-{rep}")
    for d in (run, out):
        shutil.rmtree(d, ignore_errors=True)
    work, state, tmp = (os.path.join(run, x) for x in ("work", "state", "tmp"))
    for d in (work, state, tmp):
        os.makedirs(d)
    shutil.copytree(os.path.join(a.workload, "uploads"), os.path.join(work, "uploads"), symlinks=True)
    for f in ("workload.json", "uploads.sha256"):
        shutil.copy2(os.path.join(a.workload, f), work)
    shutil.copy2(a.pristine, os.path.join(work, "app.db"))
    # Day one's files were written long before its night's backup, not the instant before:
    # a tool that re-reads files changed less than a second before it started (datavault
    # does, against same-tick changes; restic and borg do not) would otherwise re-read
    # every upload on day two. Modelled time, for every peer alike; not a synchronisation.
    settle = 1.1 - (time.time() - newest_ctime(work))
    if settle > 0:
        time.sleep(settle)
    env = dict(os.environ, BENCH_INCREMENTAL="1", BENCH_PEER_STATE=state, TMPDIR=tmp)
    script = os.path.join(BENCH, "peers", f"{peer}.sh")
    r: dict = {"peer": peer, "repeat": rep}
    b1 = timed([script, "backup", work, out], env, os.path.join(run, "backup1"))
    b1["sync"] = syncfs(out)
    r["size1"] = du(out)
    t0 = time.monotonic()
    day2 = subprocess.run([sys.executable, os.path.join(BENCH, "day2.py"), work, "--seed", str(a.seed)],
                          capture_output=True, text=True)
    r["day2_s"] = time.monotonic() - t0
    if day2.returncode != 0:
        raise SystemExit(f"day2.py failed: {day2.stderr}")
    r["day2"] = json.loads(day2.stdout)
    b2 = timed([script, "backup", work, out], env, os.path.join(run, "backup2"))
    b2["sync"] = syncfs(out)
    r["size2"] = du(out)
    # on the restores' own filesystem when run.sh mounted one (a journaled ext4, like the SD card)
    rdir = os.path.join(a.restore_root, f"day2-{peer}-{rep}-restore") if a.restore_root else os.path.join(tmp, "restore")
    shutil.rmtree(rdir, ignore_errors=True)
    rs = timed([script, "restore", out, rdir], dict(env, BENCH_INCREMENTAL="0"), os.path.join(run, "restore"))
    rs["sync"] = syncfs(rdir) if os.path.isdir(rdir) else 0.0
    ver = subprocess.run([sys.executable, os.path.join(BENCH, "verify.py"), rdir, work, "--mode", "quiet"],
                         capture_output=True, text=True)
    r["verified"] = rs["rc"] == 0 and ver.returncode == 0
    if not r["verified"]:
        r["verify_output"] = (ver.stdout + ver.stderr)[-2000:]
    shutil.rmtree(rdir, ignore_errors=True)
    pr = timed([script, "prune", out], env, os.path.join(run, "prune"))
    pr["sync"] = syncfs(out)
    r["size3"] = du(out)
    r.update({"backup1": b1, "backup2": b2, "restore": rs, "prune": pr})
    ok = all(x["rc"] == 0 for x in (b1, b2, rs, pr))
    r["ok"] = ok
    if not ok:
        r["logs"] = {k: open(os.path.join(run, k + ".err")).read()[-1500:] for k in ("backup1", "backup2", "restore", "prune")}
    shutil.rmtree(out, ignore_errors=True)
    if ok:
        shutil.rmtree(run, ignore_errors=True)
    return r


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list, peers: list) -> dict:
    s = {}
    for p in peers:
        rs = [r for r in runs if r["peer"] == p and r.get("ok")]
        if not rs:
            s[p] = None
            continue
        s[p] = {
            "runs": len(rs),
            "first_wall": med([r["backup1"]["wall"] for r in rs]),
            "first_durable": med([r["backup1"]["wall"] + r["backup1"]["sync"] for r in rs]),
            "second_wall": med([r["backup2"]["wall"] for r in rs]),
            "second_over_first": med([r["backup2"]["wall"] / r["backup1"]["wall"] for r in rs]),
            "first_bytes": med([r["size1"] for r in rs]),
            "added_bytes": med([r["size2"] - r["size1"] for r in rs]),
            "added_share": med([(r["size2"] - r["size1"]) / r["size1"] for r in rs]),
            "second_rss_mib": max(r["backup2"]["rss_mib"] for r in rs),
            "first_rss_mib": max(r["backup1"]["rss_mib"] for r in rs),
            "restore_wall": med([r["restore"]["wall"] for r in rs]),
            "restore_durable": med([r["restore"]["wall"] + r["restore"].get("sync", 0.0) for r in rs]),
            "prune_wall": med([r["prune"]["wall"] for r in rs]),
            "freed_bytes": med([r["size2"] - r["size3"] for r in rs]),
            "after_prune_over_first": med([r["size3"] / r["size1"] for r in rs]),
            "verified": sum(1 for r in rs if r["verified"]),
        }
    return s


def render(meta: dict, s: dict, target: str) -> str:
    mb = lambda b: f"{b / 1e6:.2f}"  # noqa: E731
    out = [f"# Second day ({meta['profile']})", "",
           f"`BENCH_SCENARIO=day2 bench/run.sh {meta['profile']}` on {meta['date']}, {meta['machine']}; "
           f"{meta['repeats']} repeats, medians (ratios: median of per-run ratios); day two: bench/day2.py "
           f"seed {meta['seed']} ({meta.get('day2', '')}).", "",
           "| peer | 1st backup s | 1st durable s | 2nd backup s | 2nd / 1st | 1st MB | added MB | added / 1st | "
           "restore s | prune s | freed MB | after prune / 1st | peak RSS 1st / 2nd MiB | verified |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, x in s.items():
        if x is None:
            out.append(f"| {p} | failed | | | | | | | | | | | | |")
            continue
        out.append(
            f"| {p} | {x['first_wall']:.2f} | {x['first_durable']:.2f} | {x['second_wall']:.2f} | "
            f"{x['second_over_first']:.3f}× | {mb(x['first_bytes'])} | {mb(x['added_bytes'])} | "
            f"{100 * x['added_share']:.2f} % | {x['restore_wall']:.2f} | {x['prune_wall']:.2f} | "
            f"{mb(x['freed_bytes'])} | {x['after_prune_over_first']:.3f}× | "
            f"{x['first_rss_mib']:.1f} / {x['second_rss_mib']:.1f} | {x['verified']}/{x['runs']} |")
    t = s.get(target)
    if t:
        out += ["", f"## Targets (issue #9) for `{target}`", "", "| target | goal | measured |", "|---|---|---|",
                f"| second backup wall vs own first | ≤ 0.15× | {t['second_over_first']:.3f}× |"]
        for peer in ("restic", "borg"):
            if s.get(peer):
                out.append(f"| second backup wall vs {peer}'s second | < 1× | "
                           f"{t['second_wall'] / s[peer]['second_wall']:.3f}× ({t['second_wall']:.2f} s vs {s[peer]['second_wall']:.2f} s) |")
        p = s.get("pipeline")
        if p:
            out.append(f"| first backup durable vs pipeline's | ≤ 0.8× | {t['first_durable'] / p['first_durable']:.3f}× "
                       f"({t['first_durable']:.2f} s vs {p['first_durable']:.2f} s) |")
            out.append(f"| restore (verified) + syncfs vs pipeline's | ≤ 0.8× | "
                       f"{t['restore_durable'] / p['restore_durable']:.3f}× "
                       f"({t['restore_durable']:.2f} s vs {p['restore_durable']:.2f} s) |")
        out.append(f"| bytes added vs first backup | ≤ 5 % | {100 * t['added_share']:.2f} % |")
        if s.get("restic"):
            out.append(f"| bytes added vs restic's | ≤ 1.2× | {t['added_bytes'] / s['restic']['added_bytes']:.3f}× |")
        out.append(f"| drive after pruning to one snapshot vs one full backup | ≤ 1.1× | {t['after_prune_over_first']:.3f}× |")
        out.append(f"| peak RSS, first / second backup | ≤ 40 MiB (medium) | {t['first_rss_mib']:.1f} / {t['second_rss_mib']:.1f} MiB |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    for k in ("profile", "workload", "pristine", "data", "dest", "results", "peers", "target-peer", "machine"):
        ap.add_argument("--" + k, required=k not in ("machine",))
    ap.add_argument("--restore-root", help="where the restore goes (default: the run's TMPDIR)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=20260207)
    a = ap.parse_args()
    peers = a.peers.split(",")
    runs = []
    for rep in range(a.repeats):
        for p in peers:
            print(f"day2: repeat {rep + 1}/{a.repeats} {p} ...", flush=True)
            r = one(a, p, rep)
            print(f"  1st {r['backup1']['wall']:.2f} s, 2nd {r['backup2']['wall']:.2f} s, added "
                  f"{(r['size2'] - r['size1']) / 1e6:.2f} MB, prune {r['prune']['wall']:.2f} s, freed "
                  f"{(r['size2'] - r['size3']) / 1e6:.2f} MB, ok={r['ok']} verified={r['verified']}", flush=True)
            runs.append(r)
    s = summarize(runs, peers)
    meta = {"profile": a.profile, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": a.repeats,
            "seed": a.seed, "machine": a.machine or os.uname().machine,
            "day2": json.dumps(runs[0]["day2"]) if runs else ""}
    os.makedirs(a.results, exist_ok=True)
    base = os.path.join(a.results, f"{a.profile}-day2")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "summary": s, "runs": runs}, f, indent=1)
    md = render(meta, s, a.target_peer)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0 if all(r["ok"] and r["verified"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
