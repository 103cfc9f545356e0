//! Shared by the archive targets: a fixed test identity (not a secret: it protects nothing
//! but the seed corpus) and a listing for an archive file with a matching manifest.
#![allow(dead_code)]

use std::path::Path;
use std::str::FromStr;

use std::sync::Arc;

use datavault::keys::Identities;
use datavault::manifest::Manifest;
use datavault::store::{Listing, Store};
use sha2::Digest;

pub const TEST_IDENTITY: &str = "AGE-SECRET-KEY-145FN57GE4TGMHK0DH7WKJSPEKUJUNGK79MSAP9GHK57SZ7J9RUAQY89L87";
pub const TEST_RECIPIENT: &str = "age1u4mdyn90u92r6mk784spwqz8xnstsyg2df86ey7r2d4z67nju94s0ujnnn";
const TEMPLATE: &[u8] = include_bytes!("../seeds/manifest_parse/tiny.json");
pub const NAME: &str = "backup-20261123T032320.804Z.tar.zst.age";

pub fn identities() -> Identities {
    vec![Box::new(age::x25519::Identity::from_str(TEST_IDENTITY).unwrap())]
}

/// Write `bytes` as the archive in `dir`, with a manifest whose size and SHA-256 match them,
/// so the reader gets past the outer checks and into age, zstd, tar and the entry rules.
pub fn listing(dir: &Path, bytes: &[u8]) -> Listing {
    let archive_path = dir.join(NAME);
    std::fs::write(&archive_path, bytes).unwrap();
    let mut m = Manifest::parse(NAME, TEMPLATE).expect("the template parses");
    m.archive_size = bytes.len() as u64;
    m.archive_sha256 = hex::encode(sha2::Sha256::digest(bytes));
    Listing { name: NAME.into(), location: dir.display().to_string(), manifest: Some(m), problem: None, snapshot: false }
}

/// Read (and, with `extract`, unpack into a fresh folder). Must return, never panic; on
/// error nothing may exist outside the staging folder.
pub fn read(bytes: &[u8], extract: bool) {
    let dir = tempfile::tempdir().unwrap();
    let l = listing(dir.path(), bytes);
    let store = Store::open_local(dir.path()).unwrap();
    let stage = dir.path().join("stage");
    let plan = datavault::archive::read::ExtractPlan::into_dir(&stage);
    let _ = datavault::archive::read::read_archive(
        &store,
        &l,
        &Arc::new(identities()),
        Path::new("fuzz-identity.txt"),
        extract.then_some(&plan),
        &datavault::progress::NoProgress,
    );
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let n = e.file_name();
        assert!(n == "stage" || n == NAME, "written outside staging: {n:?}");
    }
}
