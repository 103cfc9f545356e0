#!/usr/bin/env python3
"""The benchmark's second day: what changes between two nightly backups (issue #9).

    day2.py WORKDIR [--seed N] [--transactions N]

Mutates a copy of a workload made by make_workload.py, in place and deterministically
(same workload + seed => same bytes):
  uploads   +1 % of the uploads' bytes in new files (85 % of them incompressible, like the
            rest), 0.5 % of the files modified (a third overwritten in the middle, a third
            with bytes inserted in the middle, a third appended to), 0.2 % deleted
  app.db    N write transactions (default 3000) of the writer's shape (bench/writer.py):
            an audit_log row, a candidate update, every 10th a new candidate, the counter
Then rewrites uploads.sha256 and workload.json (row counts, logical hash, a "day2" record)
so that verify.py checks a restore of the second backup. Never run it on the cached
workload itself: run.sh copies it first (BENCH_SCENARIO=day2).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_workload import COMP_KINDS, INCOMP_KINDS, STATUSES, Text, compressible_content, logical_db_hash  # noqa: E402

DAY2_TIME = 1767225600  # 2026-01-01T00:00:00Z: mtimes of what day two writes
DAY2_VERSION = 1


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def mutate_uploads(work: str, rng: random.Random, text: Text) -> dict:
    up = os.path.join(work, "uploads")
    files = []
    for root, _dirs, names in os.walk(up):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), up))
    files.sort()
    total = sum(os.path.getsize(os.path.join(up, f)) for f in files)
    picked = rng.sample(files, max(1, round(len(files) * 0.007)))
    n_del = max(1, round(len(files) * 0.002))
    deleted, modified = picked[:n_del], picked[n_del:]
    for f in deleted:
        os.remove(os.path.join(up, f))
    kinds = {"overwrite": 0, "insert": 0, "append": 0}
    for i, f in enumerate(modified):
        path = os.path.join(up, f)
        with open(path, "rb") as fh:
            data = bytearray(fh.read())
        compressible = f.rsplit(".", 1)[-1] in COMP_KINDS
        piece_len = rng.randint(1024, 16384)
        piece = (text.prose(rng, piece_len).encode()[:piece_len] if compressible else rng.randbytes(piece_len))
        mid = len(data) // 2
        kind = ("overwrite", "insert", "append")[i % 3]
        kinds[kind] += 1
        if kind == "overwrite":
            data[mid:mid + len(piece)] = piece
        elif kind == "insert":
            data[mid:mid] = piece
        else:
            data += piece
        with open(path, "wb") as fh:
            fh.write(data)
        os.utime(path, (DAY2_TIME, DAY2_TIME))
    # New files: 1 % of the bytes, sizes like the rest (log-normal), 85 % incompressible.
    budget, added, n = int(total * 0.01), 0, 0
    while added < budget:
        size = min(budget - added, max(1000, int(rng.lognormvariate(11.5, 1.2))))
        folder = os.path.join(up, "inbox", "day2", f"{n // 10:03d}")
        os.makedirs(folder, exist_ok=True)
        if rng.random() < 0.85:
            ext, magic = rng.choice(INCOMP_KINDS)
            data = (magic + rng.randbytes(size))[:size]
        else:
            ext = rng.choice(COMP_KINDS)
            data = compressible_content(text, rng, ext, size)
        path = os.path.join(folder, f"new-{n:04d}.{ext}")
        with open(path, "wb") as fh:
            fh.write(data)
        os.utime(path, (DAY2_TIME, DAY2_TIME))
        added += size
        n += 1
    return {"files_before": len(files), "bytes_before": total, "deleted": len(deleted),
            "modified": len(modified), "modified_kinds": kinds, "new_files": n, "new_bytes": added}


def transactions(db: str, rng: random.Random, count: int) -> None:
    """The writer's transaction (bench/writer.py), `count` times, at full speed."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    max_id = con.execute("SELECT max(id) FROM candidates").fetchone()[0] or 1
    for i in range(count):
        now_s = DAY2_TIME + i
        cid = rng.randint(1, max_id)
        con.execute("BEGIN IMMEDIATE")
        con.execute(
            "INSERT INTO audit_log(ts, actor, action, entity, entity_id, ip, details_json) VALUES (?,?,?,?,?,?,?)",
            (now_s, "bench-writer", "candidate.update", "candidate", cid, "10.0.0.2",
             json.dumps({"tx": i, "status": rng.choice(STATUSES), "score": rng.randint(0, 100),
                         "user_agent": "Mozilla/5.0 (X11; Linux aarch64; rv:128.0) Firefox/128.0",
                         "comment": "%032x" % rng.getrandbits(128)})))
        con.execute("UPDATE candidates SET status=?, score=?, updated_at=? WHERE id=?",
                    (rng.choice(STATUSES), rng.randint(0, 100), now_s, cid))
        if i % 10 == 0:
            max_id += 1
            con.execute(
                "INSERT INTO candidates(id, uuid, first_name, last_name, email, status, score, "
                "profile_json, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (max_id, "%032x" % rng.getrandbits(128), "Bench", f"Writer{i}",
                 f"bench.writer{max_id}@example.org", "new", 0,
                 json.dumps({"skills": ["rust", "sqlite"], "source": "bench"}), now_s, now_s))
        con.execute("UPDATE settings SET value = CAST(value AS INTEGER) + 1 WHERE key='writer_tx'")
        con.execute("COMMIT")
    con.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--seed", type=int, default=20260207)
    ap.add_argument("--transactions", type=int, default=3000)
    a = ap.parse_args()
    man_path = os.path.join(a.workdir, "workload.json")
    with open(man_path) as f:
        man = json.load(f)
    if "day2" in man:
        print("day2.py: this workload already had its second day", file=sys.stderr)
        return 1
    rng = random.Random(a.seed)
    stats = mutate_uploads(a.workdir, rng, Text(random.Random(a.seed + 1)))
    db = os.path.join(a.workdir, "app.db")
    transactions(db, rng, a.transactions)
    up = os.path.join(a.workdir, "uploads")
    lines = []
    for root, _dirs, names in os.walk(up):
        for n in names:
            p = os.path.join(root, n)
            lines.append(f"{sha256_file(p)}  {os.path.relpath(p, a.workdir)}\n")
    with open(os.path.join(a.workdir, "uploads.sha256"), "w") as f:
        f.writelines(sorted(lines, key=lambda l: l.split("  ", 1)[1]))
    con = sqlite3.connect(db)
    man["db"]["rows"] = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in man["db"]["rows"]}
    con.close()
    man["db"]["logical_sha256"] = logical_db_hash(db)
    stats.update({"version": DAY2_VERSION, "seed": a.seed, "transactions": a.transactions})
    man["day2"] = stats
    with open(man_path, "w") as f:
        json.dump(man, f, indent=2)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
