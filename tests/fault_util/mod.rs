//! Shared by the fault and hostile-input suites: a seeded RNG, trial counts from the
//! environment, and archive bookkeeping. Every randomised test prints its seed and counts so
//! a failure can be replayed with `DATAVAULT_FAULT_SEED`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

/// xorshift64*: tiny, deterministic, good enough to pick delays and offsets.
pub struct Rng(u64);

impl Rng {
    /// The seed is `DATAVAULT_FAULT_SEED` if set, else `default` (fixed per test).
    pub fn new(test: &str, default: u64) -> Rng {
        let seed = std::env::var("DATAVAULT_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
        eprintln!("{test}: seed {seed} (replay with DATAVAULT_FAULT_SEED={seed})");
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Trials for one test: `DATAVAULT_FAULT_TRIALS` (a per-test count) overrides the default.
///
/// Under qemu emulation (`DATAVAULT_TEST_EMULATED`, set by scripts/ci-aarch64.sh after the
/// native run of the same CI) a tenth of the trials run: the point there is that the aarch64
/// build behaves the same, and each trial costs ten times more.
pub fn trials(default: usize) -> usize {
    let default = if std::env::var_os("DATAVAULT_TEST_EMULATED").is_some() {
        eprintln!(
            "under emulation: {} of {default} trials (all of them ran natively)",
            (default / 10).max(3)
        );
        (default / 10).max(3)
    } else {
        default
    };
    std::env::var("DATAVAULT_FAULT_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// `list --json` rows.
pub fn list(rows: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(rows).unwrap_or_else(|e| panic!("list --json: {e}: {rows}"));
    v.as_array().expect("list --json is an array").clone()
}

/// Complete archives on the target: name -> SHA-256 of the file as it is on disk now. For a
/// snapshot, of its encrypted tree: the part that never changes (its chunks may move to
/// another pack when a prune repacks; `verify` proves they are all still there).
pub fn complete_archives(target: &Path, rows: &[serde_json::Value]) -> BTreeMap<String, String> {
    rows.iter()
        .filter(|r| r["complete"] == true)
        .map(|r| {
            let name = r["name"].as_str().unwrap().to_string();
            let file = match r["format"].as_str() {
                Some("snapshot") => target.join("store/snapshots").join(format!("{name}.tree")),
                _ => target.join(&name),
            };
            let (sha, _) = datavault::fsutil::sha256_file(&file)
                .unwrap_or_else(|e| panic!("{name} is listed complete but {}: {e}", file.display()));
            (name, sha)
        })
        .collect()
}

/// Names in `dir` that an interrupted run may leave behind and the next run must remove.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.ends_with(".partial")
                || n.starts_with(".datavault-restore-")
                || n.starts_with(".datavault-old-")
        })
        .collect();
    // An archive without its manifest is an orphan too.
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for n in &names {
        if let Some(stem) = n.strip_suffix(".tar.zst.age") {
            if !names.contains(&format!("{stem}.json")) {
                v.push(n.clone());
            }
        }
    }
    // A snapshot store's half-written packs, index files and snapshots.
    v.extend(partials_under(&dir.join("store"), "store"));
    v.sort();
    v
}

fn partials_under(dir: &Path, shown: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let shown = format!("{shown}/{name}");
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            v.extend(partials_under(&e.path(), &shown));
        } else if name.ends_with(".partial") {
            v.push(shown);
        }
    }
    v
}
