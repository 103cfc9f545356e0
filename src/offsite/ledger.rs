//! The upload ledger: for every object a push uploaded, its size and the SHA-256 computed
//! while its bytes were streamed to the server. It lives **in the bucket**, beside what it
//! describes (`offsite-ledger/<push start>-p<pid>-<n>.json`, small immutable objects, so a
//! put-only credential can write them), so a new Pi with no state at all can still check the
//! remote copy without downloading it: `verify --offsite` compares each object's listed size
//! with the record, and the record's hash with what the object must be (an archive's SHA-256
//! from its manifest, a pack's from its name).
//!
//! A push writes a ledger object after each backup or snapshot it makes visible, every
//! [`FLUSH_EVERY`] records and at the end, so a killed push loses at most a few records:
//! the next push finds those objects present but unrecorded, reads them back, and records
//! them if they match the local file ("adopted"). `offsite prune` (delete-capable) merges the
//! ledger objects into one and drops the records of deleted objects.

use std::collections::HashMap;
use std::io::{self, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::backend::{join, Backend};

pub const LEDGER_DIR: &str = "offsite-ledger";
pub const FLUSH_EVERY: usize = 200;
/// A ledger object larger than this is not ours (about 150 bytes a record).
const MAX_LEDGER: u64 = 64 << 20;
const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    format: u32,
    tool_version: String,
    written: DateTime<Utc>,
    objects: Vec<Record>,
}

/// Every record in the bucket's ledger objects (the newest record of a path wins).
#[derive(Debug, Default)]
pub struct Ledger {
    pub records: HashMap<String, Record>,
    /// Names of the ledger objects read (inside [`LEDGER_DIR`]).
    pub files: Vec<String>,
    /// Ledger objects that could not be read or parsed: reported, not fatal.
    pub unreadable: Vec<String>,
}

impl Ledger {
    pub fn load(b: &dyn Backend) -> io::Result<Ledger> {
        let mut names: Vec<String> =
            b.list(LEDGER_DIR)?.into_iter().map(|o| o.name).filter(|n| n.ends_with(".json")).collect();
        // Names start with the push's start time: sorted, later records win.
        names.sort();
        let mut ledger = Ledger::default();
        for name in names {
            let parsed = b
                .read_small(&join(LEDGER_DIR, &name), MAX_LEDGER)
                .and_then(|bytes| serde_json::from_slice::<LedgerFile>(&bytes).map_err(io::Error::other));
            match parsed {
                Ok(f) if f.format <= FORMAT => {
                    for r in f.objects {
                        ledger.records.insert(r.path.clone(), r);
                    }
                    ledger.files.push(name);
                }
                Ok(f) => {
                    log::warn!(
                        "{LEDGER_DIR}/{name}: format {} is newer than this datavault understands",
                        f.format
                    );
                    ledger.unreadable.push(name);
                }
                Err(e) if crate::offsite::remote_error::class_of(&e).is_some() => return Err(e),
                Err(e) => {
                    log::warn!(
                        "{LEDGER_DIR}/{name} in {} cannot be read ({e}); its records are ignored",
                        b.location()
                    );
                    ledger.unreadable.push(name);
                }
            }
        }
        Ok(ledger)
    }

    pub fn get(&self, path: &str) -> Option<&Record> {
        self.records.get(path)
    }

    /// The shallow check of one remote object: its listed size against the record, and the
    /// record's hash against what the object must hash to, when known.
    pub fn check(&self, path: &str, remote_size: u64, expected_sha256: Option<&str>) -> Shallow {
        match self.get(path) {
            None => Shallow::NotRecorded,
            Some(r) if r.size != remote_size => {
                Shallow::SizeDiffers { recorded: r.size, remote: remote_size }
            }
            Some(r) if expected_sha256.is_some_and(|e| !e.eq_ignore_ascii_case(&r.sha256)) => {
                Shallow::HashDiffers { recorded: r.sha256.clone() }
            }
            Some(_) => Shallow::Ok,
        }
    }
}

/// The outcome of [`Ledger::check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Shallow {
    Ok,
    /// Uploaded by something else, or by a push killed before it wrote its record.
    NotRecorded,
    SizeDiffers {
        recorded: u64,
        remote: u64,
    },
    /// The bytes sent were not what the manifest or the pack name says.
    HashDiffers {
        recorded: String,
    },
}

/// Collects the records of one push and writes them out as ledger objects.
pub struct LedgerWriter {
    stem: String,
    seq: u32,
    pending: Vec<Record>,
}

impl LedgerWriter {
    pub fn new(started: DateTime<Utc>) -> LedgerWriter {
        LedgerWriter {
            stem: format!("{}-p{}", started.format("%Y%m%dT%H%M%S%.3fZ"), std::process::id()),
            seq: 0,
            pending: Vec::new(),
        }
    }

    pub fn add(&mut self, r: Record) {
        self.pending.push(r);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Write the pending records as one new ledger object (nothing if none are pending).
    pub fn flush(&mut self, b: &dyn Backend) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.seq += 1;
        let name = join(LEDGER_DIR, &format!("{}-{:04}.json", self.stem, self.seq));
        write_ledger(b, &name, &self.pending)?;
        self.pending.clear();
        Ok(())
    }
}

/// Write `records` as the ledger object `path` (create, then commit).
pub fn write_ledger(b: &dyn Backend, path: &str, records: &[Record]) -> io::Result<()> {
    let file = LedgerFile {
        format: FORMAT,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        written: Utc::now(),
        objects: records.to_vec(),
    };
    let mut bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let mut o = b.create(path)?;
    o.write_all(&bytes)?;
    o.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::MemoryBackend;

    #[test]
    fn records_round_trip_through_ledger_objects_and_check_shallowly() {
        let b = MemoryBackend::new();
        let t = Utc::now();
        let mut w = LedgerWriter::new(t);
        w.add(Record { path: "a".into(), size: 3, sha256: "aa".into() });
        w.flush(&b).unwrap();
        w.flush(&b).unwrap(); // nothing pending: no empty object
        w.add(Record { path: "b".into(), size: 5, sha256: "bb".into() });
        w.flush(&b).unwrap();
        b.put(&join(LEDGER_DIR, "zz-garbage.json"), b"not json".to_vec());
        let l = Ledger::load(&b).unwrap();
        assert_eq!(l.files.len(), 2);
        assert_eq!(l.unreadable, ["zz-garbage.json"]);
        assert_eq!(l.check("a", 3, Some("AA")), Shallow::Ok);
        assert_eq!(l.check("a", 4, None), Shallow::SizeDiffers { recorded: 3, remote: 4 });
        assert_eq!(l.check("b", 5, Some("cc")), Shallow::HashDiffers { recorded: "bb".into() });
        assert_eq!(l.check("c", 1, None), Shallow::NotRecorded);
    }
}
