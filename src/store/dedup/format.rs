//! What the store's files contain, and the limits every reader enforces before trusting them.
//!
//! Everything here is described for people in `docs/format.md` (and read without datavault by
//! `scripts/emergency-restore`): change one, change the others. Secret-free files are JSON;
//! the tree is JSON lines inside zstd inside age; the refs file is binary.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::manifest::{CompressionInfo, DatabaseInfo, EncryptionInfo, Skipped, SourceInfo, TreeInfo};
use crate::retention::ArchiveKind;

/// Version of everything under `store/`. A reader refuses anything newer.
pub const STORE_FORMAT: u32 = 1;

pub const CONFIG_PATH: &str = "store/config.json";
pub const PACKS_DIR: &str = "store/packs";
pub const INDEX_DIR: &str = "store/index";
pub const SNAPSHOTS_DIR: &str = "store/snapshots";
pub const TREE_SUFFIX: &str = ".tree";
pub const REFS_SUFFIX: &str = ".refs";
pub const MANIFEST_SUFFIX: &str = ".json";
pub const REFS_MAGIC: &[u8; 8] = b"DVREFS1\n";

// ---- limits: what a hostile drive can make us allocate or decompress ------------------------

/// No chunk (plaintext) is ever bigger; a config asking for more is refused.
pub const MAX_CHUNK: u64 = 16 << 20;
/// A stored blob: the compressed chunk (zstd's bound is +0.4 %) plus age's header (about
/// 200 bytes per recipient) and 16 bytes per 64 KiB. 1 MiB of slack covers 4,000 recipients.
pub const MAX_BLOB: u64 = MAX_CHUNK + MAX_CHUNK / 128 + (1 << 20);
/// Packs close at the configured target (default 4 MiB); one blob may overshoot it.
pub const MAX_PACK: u64 = (64 << 20) + MAX_BLOB;
pub const MAX_CONFIG: u64 = 64 << 10;
pub const MAX_INDEX_FILE: u64 = 32 << 20;
/// Blobs per index file: the writer starts a new file before this; a reader refuses more.
pub const MAX_INDEX_BLOBS: usize = 120_000;
pub const MAX_MANIFEST: u64 = 64 << 20;
/// A tree line; long chunk lists continue on `more` lines of at most [`MAX_LINE_CHUNKS`].
pub const MAX_TREE_LINE: usize = 1 << 20;
pub const MAX_LINE_CHUNKS: usize = 8192;
/// A refs file holds at most this many ids (2^28 chunks: 256 TiB at 1 MiB a chunk).
pub const MAX_REFS: u64 = 1 << 28;

/// `store/config.json`: written once when the store is created, never changed after (the
/// chunker's parameters decide chunk boundaries: changing them would end deduplication).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub format: u32,
    /// Random, 32 hex digits: ties the local cache to this drive.
    pub store_id: String,
    pub created: DateTime<Utc>,
    pub chunker: ChunkerParams,
    /// A pack is closed once it holds this many bytes.
    pub pack_target: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    /// FastCDC (v2020) for uploads and raw files.
    pub files_min: u32,
    pub files_avg: u32,
    pub files_max: u32,
    /// The database's page stream is cut every this many bytes (a multiple of every SQLite
    /// page size up to it: pages never move, so fixed chunks line up with them).
    pub database_fixed: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        // docs/format.md, "Chunking": measured on bench medium's second day.
        ChunkerParams {
            files_min: 256 << 10,
            files_avg: 1 << 20,
            files_max: 2 << 20,
            database_fixed: 8 << 10,
        }
    }
}

impl ChunkerParams {
    /// Within what fastcdc accepts and what our readers allow.
    pub fn check(&self) -> Result<(), String> {
        use fastcdc::v2020 as cdc;
        let f = (self.files_min as usize, self.files_avg as usize, self.files_max as usize);
        let cdc_ok = (cdc::MINIMUM_MIN..=cdc::MINIMUM_MAX).contains(&f.0)
            && (cdc::AVERAGE_MIN..=cdc::AVERAGE_MAX).contains(&f.1)
            && (cdc::MAXIMUM_MIN..=cdc::MAXIMUM_MAX).contains(&f.2)
            && f.0 <= f.1
            && f.1 <= f.2
            && [f.0, f.1, f.2].iter().all(|v| v % 2 == 0)
            && f.2 as u64 <= MAX_CHUNK;
        let db = self.database_fixed;
        let db_ok = db.is_power_of_two() && (512..=(1 << 24)).contains(&db) && u64::from(db) <= MAX_CHUNK;
        if cdc_ok && db_ok {
            Ok(())
        } else {
            Err(format!("chunker parameters out of range: {self:?}"))
        }
    }
}

/// `store/index/<sha256>.json`: where chunks are. Secret-free: read without any key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IndexFile {
    pub format: u32,
    pub packs: Vec<IndexPack>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IndexPack {
    /// The pack's SHA-256 (its file name under `store/packs/<first 2>/`).
    pub pack: String,
    pub size: u64,
    /// In offset order, not overlapping, within `size`.
    pub blobs: Vec<IndexBlob>,
}

/// `[chunk id, offset, length, plaintext length]`: an array, 90-odd bytes a chunk. The id is
/// held as its 32 bytes and written as 64 hex digits: the indexer holds up to
/// [`MAX_INDEX_BLOBS`] of these between two index files, and a hex `String` each (64 bytes
/// and the allocator's header, beside the entry) made them about 9 MiB more of the large
/// bench's peak heap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexBlob(#[serde(with = "hex_id")] pub [u8; 32], pub u64, pub u64, pub u64);

/// A chunk id as 64 lowercase hex digits in JSON, its 32 bytes in memory.
mod hex_id {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(id, &mut buf).expect("64 digits for 32 bytes");
        s.serialize_str(std::str::from_utf8(&buf).expect("hex is ASCII"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        struct Id;
        impl de::Visitor<'_> for Id {
            type Value = [u8; 32];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chunk id (64 lowercase hex digits)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<[u8; 32], E> {
                // Not the string itself in the message: an index file can hold a long one.
                super::parse_hex32(v)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Other("another string"), &self))
            }
        }
        d.deserialize_str(Id)
    }
}

/// A file's size and SHA-256, as recorded in a snapshot's manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub size: u64,
    pub sha256: String,
}

/// `store/snapshots/<stem>.json`: written last, it is what makes a snapshot exist. The same
/// facts as an archive's [`crate::manifest::Manifest`] (so listing, status, the catalog and
/// the metrics need no key), plus how the snapshot is stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    pub format: u32,
    pub tool: String,
    pub tool_version: String,
    pub kind: ArchiveKind,
    /// `backup-YYYYMMDDTHHMMSS.mmmZ` or `pre-restore-...`: the file names' stem.
    pub snapshot: String,
    pub store_id: String,
    pub created: DateTime<Utc>,
    pub host: String,
    pub user: String,
    pub trigger: String,
    pub comment: Option<String>,
    pub source: SourceInfo,
    pub database: Option<DatabaseInfo>,
    pub uploads: Option<TreeInfo>,
    /// Regular files and symlinks (database included), as in an archive's manifest.
    pub files: u64,
    /// Bytes of file content.
    pub plain_bytes: u64,
    /// Tree entries (files, folders, symlinks).
    pub entries: u64,
    /// Chunk references in the tree, repeats included.
    pub chunk_refs: u64,
    /// Distinct chunks (ids in the refs file).
    pub chunks: u64,
    /// Stored bytes of those chunks: what this snapshot alone would occupy in packs.
    pub stored_bytes: u64,
    /// What this backup added to the drive: new packs, index files, tree and refs.
    pub added_bytes: u64,
    pub added_chunks: u64,
    pub tree: ObjectRef,
    pub refs: ObjectRef,
    pub compression: CompressionInfo,
    pub encryption: EncryptionInfo,
    pub duration_ms: u64,
    pub changed_during_backup: Vec<String>,
    pub skipped: Vec<Skipped>,
}

impl SnapshotManifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }
}

/// One line of a tree (after age and zstd). The first is a `header`, the last an `end`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "t", rename_all = "lowercase", deny_unknown_fields)]
pub enum TreeLine {
    Header {
        format: u32,
        snapshot: String,
        store_id: String,
        /// The chunk key (hex): a restore on a new machine, whose key file is gone, still
        /// checks every chunk's id. Only ever written inside the encrypted tree.
        chunk_key: String,
    },
    Entry(TreeEntry),
    /// More chunk ids of the file entry just before.
    More {
        chunks: Vec<String>,
    },
    End {
        entries: u64,
        chunk_refs: u64,
        bytes: u64,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TreeKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TreeEntry {
    /// `db/app.db`, `uploads/a/b.jpg`: escaped with [`crate::manifest::escape_path`].
    pub path: String,
    pub kind: TreeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    #[serde(default)]
    pub mtime_ns: u32,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Files: the first chunk ids; `more` lines follow when there are more than
    /// [`MAX_LINE_CHUNKS`]; `nchunks` is the total.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
    #[serde(default)]
    pub nchunks: u64,
}

/// The file names of a snapshot.
pub fn tree_path(stem: &str) -> String {
    format!("{SNAPSHOTS_DIR}/{stem}{TREE_SUFFIX}")
}
pub fn refs_path(stem: &str) -> String {
    format!("{SNAPSHOTS_DIR}/{stem}{REFS_SUFFIX}")
}
pub fn manifest_path(stem: &str) -> String {
    format!("{SNAPSHOTS_DIR}/{stem}{MANIFEST_SUFFIX}")
}
pub fn pack_path(hex: &str) -> String {
    format!("{PACKS_DIR}/{}/{hex}", &hex[..2])
}
/// Where a pack is written until its SHA-256 (its name) is known: the backend's `.partial`
/// of this path (gc removes a killed run's).
/// The 256 folders packs sit in, by the first two hex digits of their name.
pub fn pack_dirs() -> impl Iterator<Item = String> {
    (0..=255u8).map(|i| format!("{PACKS_DIR}/{i:02x}"))
}

pub fn pack_tmp_path(random_hex: &str) -> String {
    format!("{PACKS_DIR}/tmp-{random_hex}")
}
pub fn index_path(hex: &str) -> String {
    format!("{INDEX_DIR}/{hex}.json")
}

/// Is this a 64-digit lowercase hex name (a SHA-256 or a chunk id)?
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if !is_hex64(s) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// A snapshot stem made by datavault: `backup-` or `pre-restore-`, then a safe file name.
pub fn is_snapshot_stem(s: &str) -> bool {
    (s.starts_with("backup-") || s.starts_with("pre-restore-"))
        && s.len() <= 100
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !s.contains("..")
}

/// Inverse of [`crate::manifest::escape_path`]. Only the canonical spelling is accepted
/// (`\\` and `\xNN` for bytes that are not valid UTF-8 there), so one path has exactly one
/// spelling and duplicates cannot hide behind two.
pub fn unescape_path(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hx = s.get(i + 2..i + 4)?;
                if !hx.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
                    return None;
                }
                out.push(u8::from_str_radix(hx, 16).ok()?);
                i += 4;
            }
            _ => return None,
        }
    }
    (crate::manifest::escape_path(&out) == s).then_some(out)
}

/// A refs file: the magic, then every id once, in ascending order.
pub fn encode_refs(sorted_unique: &[[u8; 32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 32 * sorted_unique.len());
    out.extend_from_slice(REFS_MAGIC);
    for id in sorted_unique {
        out.extend_from_slice(id);
    }
    out
}

/// Parse a refs file, refusing anything but strictly ascending ids behind the magic.
pub fn decode_refs(bytes: &[u8]) -> Result<Vec<[u8; 32]>, String> {
    let body = bytes.strip_prefix(REFS_MAGIC.as_slice()).ok_or("not a refs file (bad magic)")?;
    if body.len() % 32 != 0 {
        return Err("refs file length is not a whole number of ids".into());
    }
    let mut out: Vec<[u8; 32]> = Vec::with_capacity(body.len() / 32);
    for c in body.chunks_exact(32) {
        let id: [u8; 32] = c.try_into().expect("32 bytes");
        if out.last().is_some_and(|last| *last >= id) {
            return Err("refs file ids are not strictly ascending".into());
        }
        out.push(id);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id is held as bytes but written as before: index files from earlier versions read
    /// back, and the files written now are byte for byte what they were.
    #[test]
    fn an_index_blob_is_written_as_a_hex_id_and_three_numbers_and_refuses_a_bad_id() {
        let mut id = [0u8; 32];
        id[0] = 0xab;
        id[31] = 0x07;
        let hex_id = hex::encode(id);
        let json = format!("[\"{hex_id}\",12,34,56]");
        assert_eq!(serde_json::to_string(&IndexBlob(id, 12, 34, 56)).unwrap(), json);
        assert_eq!(serde_json::from_str::<IndexBlob>(&json).unwrap(), IndexBlob(id, 12, 34, 56));
        for bad in [hex_id.to_uppercase(), hex_id[..62].to_string(), format!("{}zz", &hex_id[..62])] {
            let err = serde_json::from_str::<IndexBlob>(&format!("[\"{bad}\",1,2,3]")).unwrap_err();
            assert!(err.to_string().contains("chunk id") && !err.to_string().contains(&bad), "{err}");
        }
    }

    #[test]
    fn paths_unescape_only_in_their_canonical_spelling() {
        for raw in [&b"uploads/a b/c.txt"[..], b"bad\xff\\x", b"caf\xc3\xa9", b"\\xff"] {
            let s = crate::manifest::escape_path(raw);
            assert_eq!(unescape_path(&s).as_deref(), Some(raw), "{s}");
        }
        // \x41 is "A", which escape_path never writes as \x41; \xC3\xA9 is valid UTF-8.
        for bad in ["\\x41", "\\xc3\\xa9", "a\\", "\\q", "\\x4", "\\xFF"] {
            assert_eq!(unescape_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn refs_round_trip_and_refuse_disorder() {
        let ids = [[1u8; 32], [2u8; 32], [9u8; 32]];
        assert_eq!(decode_refs(&encode_refs(&ids)).unwrap(), ids);
        assert!(decode_refs(&encode_refs(&[[2u8; 32], [1u8; 32]])).is_err());
        assert!(decode_refs(&encode_refs(&[[2u8; 32], [2u8; 32]])).is_err());
        assert!(decode_refs(b"DVREFS1\nxx").is_err());
        assert!(decode_refs(b"nope").is_err());
    }

    #[test]
    fn tree_lines_are_tagged_and_strict() {
        let l: TreeLine = serde_json::from_str(r#"{"t":"more","chunks":[]}"#).unwrap();
        assert_eq!(l, TreeLine::More { chunks: vec![] });
        assert!(serde_json::from_str::<TreeLine>(r#"{"t":"more","chunks":[],"x":1}"#).is_err());
        assert!(serde_json::from_str::<TreeLine>(r#"{"t":"nope"}"#).is_err());
        let e = r#"{"t":"entry","path":"uploads","kind":"dir","mode":493,"uid":0,"gid":0,"mtime":1}"#;
        assert!(matches!(serde_json::from_str::<TreeLine>(e).unwrap(), TreeLine::Entry(_)));
        let extra = r#"{"t":"entry","path":"u","kind":"dir","mode":1,"uid":0,"gid":0,"mtime":1,"evil":2}"#;
        assert!(serde_json::from_str::<TreeLine>(extra).is_err());
        assert!(ChunkerParams::default().check().is_ok());
        assert!(ChunkerParams { database_fixed: 3000, ..Default::default() }.check().is_err());
    }
}
