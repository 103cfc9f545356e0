//! Markers that keep a push and a prune of the bucket's snapshot store apart (#10).
//!
//! Object storage has no lock, and the two run on different machines (the Pi pushes with a
//! put-only key; a trusted machine prunes). What must not happen: the prune's collection
//! deletes a pack that a push found present and counts on, or a snapshot's tree and refs that
//! a push has sent but not yet made visible.
//!
//! So each writes a marker in `store/locks/` **before** it looks for the other's: a push about
//! to send snapshot data writes `push-<time>-<random>.json`, a prune writes
//! `prune-<time>-<random>.json`. S3 lists an object once its PUT has returned (strong
//! read-after-write consistency, on AWS since 2020 and on the S3-compatible servers DataVault
//! documents), so of two runs that overlap at least one sees the other and stands back: the
//! push sends no snapshot this time (the next one does), the prune forgets snapshots but
//! collects no pack. The Pi's key cannot delete, so a push marks its end with a second object,
//! `push-<...>.done`; the prune deletes the markers nobody needs any more. A marker whose run
//! died is ignored after a while: a push's after [`PUSH_STALE_HOURS`], a prune's after
//! [`PRUNE_STALE_HOURS`].

use std::io;

use chrono::{DateTime, Duration, NaiveDateTime, Utc};

use crate::store::backend::{join, Backend};

pub const LOCKS_DIR: &str = "store/locks";
/// A push marker without its `.done` younger than this holds the collection back: a push of
/// a first backup over a home link can take hours.
pub const PUSH_STALE_HOURS: i64 = 24;
/// A prune marker younger than this holds snapshot pushes back.
pub const PRUNE_STALE_HOURS: i64 = 6;

const STARTED: &str = ".json";
const DONE: &str = ".done";

/// A marker this run wrote.
#[derive(Debug, Clone)]
pub struct Marker {
    /// `push-20261205T013000.000Z-1a2b3c4d` (no suffix).
    pub stem: String,
}

/// A marker found in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub stem: String,
    pub push: bool,
    pub started: DateTime<Utc>,
    /// A push that wrote its `.done`.
    pub done: bool,
}

/// Write this run's marker (`kind` is `push` or `prune`).
pub fn write(b: &dyn Backend, kind: &str, t: DateTime<Utc>) -> io::Result<Marker> {
    let mut r = [0u8; 4];
    crate::store::dedup::key::getrandom_bytes(&mut r);
    let stem = format!("{kind}-{}-{}", t.format("%Y%m%dT%H%M%S%.3fZ"), hex::encode(r));
    let body = format!("{{\"kind\":\"{kind}\",\"started\":\"{}\"}}\n", t.to_rfc3339());
    crate::store::dedup::write::put(b, &join(LOCKS_DIR, &format!("{stem}{STARTED}")), body.as_bytes())?;
    Ok(Marker { stem })
}

/// A push is over (with or without errors): its marker no longer holds the collection back.
pub fn finish_push(b: &dyn Backend, m: &Marker) -> io::Result<()> {
    crate::store::dedup::write::put(b, &join(LOCKS_DIR, &format!("{}{DONE}", m.stem)), b"done\n")
}

/// Every marker in the bucket; names that are not markers are ignored.
pub fn list(b: &dyn Backend) -> io::Result<Vec<Seen>> {
    let names: Vec<String> = b.list(LOCKS_DIR)?.into_iter().map(|o| o.name).collect();
    let mut out = Vec::new();
    for n in &names {
        let Some(stem) = n.strip_suffix(STARTED) else { continue };
        let Some((push, started)) = parse_stem(stem) else { continue };
        let done = names.iter().any(|d| d.strip_suffix(DONE) == Some(stem));
        out.push(Seen { stem: stem.to_string(), push, started, done });
    }
    Ok(out)
}

fn parse_stem(stem: &str) -> Option<(bool, DateTime<Utc>)> {
    let (push, rest) = match stem.split_once('-')? {
        ("push", r) => (true, r),
        ("prune", r) => (false, r),
        _ => return None,
    };
    let (ts, random) = rest.rsplit_once('-')?;
    if random.len() != 8 || !random.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let t = NaiveDateTime::parse_from_str(ts.strip_suffix('Z')?, "%Y%m%dT%H%M%S%.3f").ok()?;
    Some((push, t.and_utc()))
}

/// Younger than `hours` at `now`. A marker dated ahead (another machine's clock) is young.
fn young(s: &Seen, now: DateTime<Utc>, hours: i64) -> bool {
    now - s.started < Duration::hours(hours)
}

/// The start of an unfinished push that holds the collection back, if any.
pub fn push_running(seen: &[Seen], now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    seen.iter().filter(|s| s.push && !s.done && young(s, now, PUSH_STALE_HOURS)).map(|s| s.started).max()
}

/// The start of a prune (other than `mine`) that holds snapshot pushes back, if any.
pub fn prune_running(seen: &[Seen], now: DateTime<Utc>, mine: Option<&Marker>) -> Option<DateTime<Utc>> {
    seen.iter()
        .filter(|s| !s.push && young(s, now, PRUNE_STALE_HOURS))
        .filter(|s| mine.is_none_or(|m| m.stem != s.stem))
        .map(|s| s.started)
        .max()
}

/// The objects a prune removes at its end: its own marker, finished pushes' markers, and
/// markers of runs that died long ago.
pub fn no_longer_needed(seen: &[Seen], now: DateTime<Utc>, mine: &Marker) -> Vec<String> {
    let mut out = Vec::new();
    for s in seen {
        let stale = if s.push {
            s.done || !young(s, now, PUSH_STALE_HOURS)
        } else {
            !young(s, now, PRUNE_STALE_HOURS)
        };
        if s.stem == mine.stem || stale {
            out.push(join(LOCKS_DIR, &format!("{}{STARTED}", s.stem)));
            if s.done {
                out.push(join(LOCKS_DIR, &format!("{}{DONE}", s.stem)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::MemoryBackend;

    fn at(h: u32) -> DateTime<Utc> {
        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 5, h, 0, 0).unwrap()
    }

    #[test]
    fn a_push_holds_the_collection_back_until_done_or_stale_and_a_prune_holds_pushes_back() {
        let b = MemoryBackend::new();
        assert_eq!(list(&b).unwrap(), vec![]);
        let push = write(&b, "push", at(1)).unwrap();
        b.put("store/locks/README.txt", b"not a marker".to_vec());
        let seen = list(&b).unwrap();
        assert_eq!(push_running(&seen, at(2)), Some(at(1)));
        assert_eq!(push_running(&seen, at(1) + Duration::hours(PUSH_STALE_HOURS)), None, "stale");
        finish_push(&b, &push).unwrap();
        let seen = list(&b).unwrap();
        assert_eq!(push_running(&seen, at(2)), None, "done");

        let prune = write(&b, "prune", at(3)).unwrap();
        let seen = list(&b).unwrap();
        assert_eq!(prune_running(&seen, at(4), None), Some(at(3)));
        assert_eq!(prune_running(&seen, at(4), Some(&prune)), None, "its own marker");
        assert_eq!(prune_running(&seen, at(3) + Duration::hours(PRUNE_STALE_HOURS), None), None);
        let mut gone = no_longer_needed(&seen, at(4), &prune);
        gone.sort();
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert!(gone.iter().all(|g| g.starts_with("store/locks/") && !g.contains("README")));
    }
}
