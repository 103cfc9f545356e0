//! Hostile and damaged stores, at engine level: every tampering is refused with an
//! integrity error (exit 4) and nothing is written outside the staging folder.

mod dedup_util;

use std::fs;
use std::io::{Read, Write};

use datavault::store::backend::MemoryBackend;
use datavault::store::dedup::format;
use datavault::store::dedup::{Cache, ChunkKey, Store};
use dedup_util::*;
use serde_json::Value;

struct Ctx {
    mem: MemoryBackend,
    store: Store,
    keys: Keys,
    stem: String,
}

fn fresh() -> Ctx {
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let (mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let keys = Keys::new();
    let (m, _) =
        backup(&store, &mut cache, &ChunkKey::random(), &keys, src.path(), time("2026-11-23T04:00:00.000Z"))
            .unwrap();
    Ctx { mem, store, keys, stem: m.snapshot }
}

impl Ctx {
    fn file(&self, path: &str) -> Vec<u8> {
        self.mem.snapshot()[path].clone()
    }
    fn first(&self, prefix: &str) -> String {
        self.mem.snapshot().keys().find(|k| k.starts_with(prefix)).unwrap().clone()
    }
    fn tree_lines(&self) -> Vec<String> {
        let bytes = self.file(&format::tree_path(&self.stem));
        let dec = age::Decryptor::new(&bytes[..]).unwrap();
        let mut r = dec.decrypt(std::iter::once(&self.keys.identity as &dyn age::Identity)).unwrap();
        let mut z = Vec::new();
        r.read_to_end(&mut z).unwrap();
        String::from_utf8(zstd::decode_all(&z[..]).unwrap()).unwrap().lines().map(str::to_string).collect()
    }
    /// Replace the tree (validly encrypted, manifest updated to match: only the content is hostile).
    fn put_tree(&self, lines: &[String]) {
        let mut plain = lines.join("\n").into_bytes();
        plain.push(b'\n');
        let z = zstd::encode_all(&plain[..], 3).unwrap();
        let enc =
            age::Encryptor::with_recipients(std::iter::once(&self.keys.recipient as &dyn age::Recipient))
                .unwrap();
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        w.write_all(&z).unwrap();
        w.finish().unwrap();
        self.edit_manifest(|m| {
            m["tree"]["size"] = out.len().into();
            m["tree"]["sha256"] = sha(&out).into();
        });
        self.mem.put(&format::tree_path(&self.stem), out);
    }
    fn edit_tree(&self, f: impl FnOnce(&mut Vec<Value>)) {
        let mut v: Vec<Value> = self.tree_lines().iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        f(&mut v);
        self.put_tree(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
    }
    fn edit_manifest(&self, f: impl FnOnce(&mut Value)) {
        let p = format::manifest_path(&self.stem);
        let mut m: Value = serde_json::from_slice(&self.file(&p)).unwrap();
        f(&mut m);
        self.mem.put(&p, serde_json::to_vec(&m).unwrap());
    }
    /// Rewrite the one index file and store it under its new SHA-256 name.
    fn edit_index(&self, f: impl FnOnce(&mut Value)) {
        let old = self.first("store/index/");
        let mut v: Value = serde_json::from_slice(&self.file(&old)).unwrap();
        f(&mut v);
        let bytes = serde_json::to_vec(&v).unwrap();
        self.mem.remove_for_test(&old);
        self.mem.put(&format::index_path(&sha(&bytes)), bytes);
    }
    fn entry_index(lines: &[Value], path: &str) -> usize {
        lines.iter().position(|l| l["path"] == path).unwrap()
    }
}

trait RemoveForTest {
    fn remove_for_test(&self, path: &str);
}
impl RemoveForTest for MemoryBackend {
    fn remove_for_test(&self, path: &str) {
        use datavault::store::backend::Backend;
        self.remove(path).unwrap();
    }
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn flip(ctx: &Ctx, path: &str, at: usize) {
    let mut b = ctx.file(path);
    let i = at.min(b.len() - 1);
    b[i] ^= 0x20;
    ctx.mem.put(path, b);
}

fn truncate(ctx: &Ctx, path: &str) {
    let b = ctx.file(path);
    ctx.mem.put(path, b[..b.len() / 2].to_vec());
}

type Tamper = Box<dyn Fn(&Ctx)>;

fn cases() -> Vec<(&'static str, Tamper)> {
    vec![
        ("flipped byte in a pack", Box::new(|c: &Ctx| flip(c, &c.first("store/packs/"), 500))),
        ("flipped byte in an index file", Box::new(|c: &Ctx| flip(c, &c.first("store/index/"), 60))),
        ("flipped byte in the tree", Box::new(|c: &Ctx| flip(c, &format::tree_path(&c.stem), 300))),
        ("flipped byte in the refs", Box::new(|c: &Ctx| flip(c, &format::refs_path(&c.stem), 40))),
        ("flipped byte in the manifest", Box::new(|c: &Ctx| flip(c, &format::manifest_path(&c.stem), 5))),
        ("truncated pack", Box::new(|c: &Ctx| truncate(c, &c.first("store/packs/")))),
        ("truncated tree", Box::new(|c: &Ctx| truncate(c, &format::tree_path(&c.stem)))),
        ("missing pack", Box::new(|c: &Ctx| c.mem.remove_for_test(&c.first("store/packs/")))),
        ("missing index", Box::new(|c: &Ctx| c.mem.remove_for_test(&c.first("store/index/")))),
        (
            "index offset beyond the pack",
            Box::new(|c: &Ctx| c.edit_index(|v| v["packs"][0]["blobs"][0][1] = (1u64 << 40).into())),
        ),
        (
            "index length beyond the pack",
            Box::new(|c: &Ctx| {
                c.edit_index(|v| {
                    let size = v["packs"][0]["size"].as_u64().unwrap();
                    let n = v["packs"][0]["blobs"].as_array().unwrap().len();
                    v["packs"][0]["blobs"][n - 1][2] = (size + 1).into();
                })
            }),
        ),
        (
            "index says a chunk is where another one is",
            Box::new(|c: &Ctx| {
                c.edit_index(|v| {
                    let b = v["packs"][0]["blobs"].as_array_mut().unwrap();
                    let id0 = b[0][0].clone();
                    b[0][0] = b[1][0].clone();
                    b[1][0] = id0;
                })
            }),
        ),
        (
            "index declares a smaller plaintext (decompression bomb)",
            Box::new(|c: &Ctx| {
                c.edit_index(|v| {
                    for b in v["packs"][0]["blobs"].as_array_mut().unwrap() {
                        b[3] = 100.into();
                    }
                })
            }),
        ),
        (
            "duplicate path",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    let dup = l[i].clone();
                    l.insert(i, dup);
                    let (size, n) = (l[i]["size"].as_u64().unwrap(), l[i]["nchunks"].as_u64().unwrap());
                    let end = l.len() - 1;
                    for (k, add) in [("entries", 1), ("chunk_refs", n), ("bytes", size)] {
                        l[end][k] = (l[end][k].as_u64().unwrap() + add).into();
                    }
                    c.edit_manifest(|m| {
                        for (k, add) in
                            [("entries", 1), ("files", 1), ("chunk_refs", n), ("plain_bytes", size)]
                        {
                            m[k] = (m[k].as_u64().unwrap() + add).into();
                        }
                    });
                })
            }),
        ),
        (
            "path with ..",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l[i]["path"] = "uploads/../../etc/passwd".into();
                })
            }),
        ),
        (
            "absolute path",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l[i]["path"] = "/etc/passwd".into();
                })
            }),
        ),
        (
            "unknown top-level folder",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l[i]["path"] = "zzz".into();
                })
            }),
        ),
        (
            "a file below a symlink",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    let mut e = l[i].clone();
                    e["path"] = "uploads/link/evil".into();
                    let j = Ctx::entry_index(l, "uploads/link");
                    l.insert(j + 1, e);
                })
            }),
        ),
        (
            "a file below a file",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/a/text.txt");
                    let mut e = l[i].clone();
                    e["path"] = "uploads/a/text.txt/x".into();
                    l.insert(i + 1, e);
                })
            }),
        ),
        (
            "entries reordered",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/a");
                    let j = Ctx::entry_index(l, "uploads/top.pdf");
                    l.swap(i, j);
                })
            }),
        ),
        (
            "huge declared size",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l[i]["size"] = (1u64 << 50).into();
                })
            }),
        ),
        (
            "huge chunk count",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l[i]["nchunks"] = (1u64 << 50).into();
                })
            }),
        ),
        (
            "manifest claims huge counts",
            Box::new(|c: &Ctx| {
                c.edit_manifest(|m| {
                    m["entries"] = (1u64 << 60).into();
                    m["plain_bytes"] = (1u64 << 60).into();
                })
            }),
        ),
        (
            "an entry missing",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l.remove(i);
                })
            }),
        ),
        (
            "a chunk from another file",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    let j = Ctx::entry_index(l, "uploads/a/b/big.bin");
                    l[i]["chunks"][0] = l[j]["chunks"][0].clone();
                })
            }),
        ),
        (
            "a chunk id not in the refs",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l[i]["chunks"][0] = "ab".repeat(32).into();
                })
            }),
        ),
        (
            "a tree of another snapshot",
            Box::new(|c: &Ctx| c.edit_tree(|l| l[0]["snapshot"] = "backup-20200101T000000.000Z".into())),
        ),
        (
            "a tree line far too long",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "uploads/top.pdf");
                    l[i]["path"] = format!("uploads/{}", "x".repeat(2 << 20)).into();
                })
            }),
        ),
        (
            "a tree without its end",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    l.pop();
                })
            }),
        ),
        (
            "a database SHA-256 that differs",
            Box::new(|c: &Ctx| c.edit_manifest(|m| m["database"]["sha256"] = "00".repeat(32).into())),
        ),
        (
            "refs with an extra chunk",
            Box::new(|c: &Ctx| {
                let p = format::refs_path(&c.stem);
                let mut b = c.file(&p);
                b.extend_from_slice(&[0xff; 32]);
                c.mem.put(&p, b.clone());
                c.edit_manifest(|m| {
                    m["refs"]["size"] = b.len().into();
                    m["refs"]["sha256"] = sha(&b).into();
                    m["chunks"] = (m["chunks"].as_u64().unwrap() + 1).into();
                });
            }),
        ),
        (
            "a symlink in the database folder",
            Box::new(|c: &Ctx| {
                c.edit_tree(|l| {
                    let i = Ctx::entry_index(l, "db/app.db");
                    l[i]["kind"] = "symlink".into();
                    l[i]["target"] = "/etc/shadow".into();
                })
            }),
        ),
    ]
}

#[test]
fn hostile_stores_are_refused_with_exit_4_and_nothing_outside_staging() {
    let mut failures = Vec::new();
    for (name, tamper) in cases() {
        let c = fresh();
        tamper(&c);
        let parent = tempfile::tempdir().unwrap();
        let staging = parent.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let mut cache = Cache::open_private().unwrap();
        match restore(&c.store, &mut cache, &c.stem, &c.keys.ids(), &staging) {
            Ok(n) => failures.push(format!("{name}: accepted ({n} entries)")),
            Err(e) if e.exit_code() != 4 => failures.push(format!("{name}: exit {} ({e})", e.exit_code())),
            Err(e) => eprintln!("{name}: {e}"),
        }
        let outside: Vec<_> = fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        if outside.len() != 1 {
            failures.push(format!("{name}: wrote outside staging: {outside:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_store_made_for_another_key_says_wrong_key() {
    let c = fresh();
    let other = Keys::new();
    let mut cache = Cache::open_private().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let e = restore(&c.store, &mut cache, &c.stem, &other.ids(), staging.path()).unwrap_err();
    assert_eq!(e.exit_code(), 4);
    assert!(e.to_string().contains("wrong key") && e.to_string().contains("age1"), "{e}");
}

#[test]
fn listing_reports_damaged_and_incomplete_snapshots_without_a_key() {
    let c = fresh();
    flip(&c, &format::manifest_path(&c.stem), 3);
    let stem2 = "backup-20261124T040000.000Z";
    c.mem.put(&format::tree_path(stem2), b"half a tree".to_vec());
    let l = c.store.list_snapshots().unwrap();
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|x| !x.is_complete()), "{l:?}");
    assert!(l.iter().any(|x| x.problem.as_deref().unwrap_or("").starts_with("incomplete")));
    // A tree truncated under a valid manifest shows in the listing too.
    let d = fresh();
    truncate(&d, &format::tree_path(&d.stem));
    let l = d.store.list_snapshots().unwrap();
    assert!(l[0].problem.as_deref().unwrap_or("").contains("truncated"), "{l:?}");
}
