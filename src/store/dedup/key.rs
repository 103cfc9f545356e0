//! The chunk key: 32 random bytes that make chunk ids keyed BLAKE3 hashes.
//!
//! Why keyed: a plain hash of a chunk, readable by anyone with the drive (the index is
//! secret-free), would let them confirm a guess ("is this known document on the drive?").
//! Keyed, the ids say nothing without the key. The key decrypts nothing: it sits on the Pi
//! beside the config (0600), and a copy travels inside every encrypted tree, so a restore on
//! a new machine still checks every chunk. Losing the key file only costs deduplication
//! against older snapshots (a new key makes new ids).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// A chunk's id: the keyed BLAKE3 of its plaintext.
pub type ChunkId = [u8; 32];

#[derive(Clone)]
pub struct ChunkKey([u8; 32]);

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

const KEY_FILE_HEADER: &str =
    "# DataVault chunk key: makes chunk ids unguessable; decrypts nothing. Keep it 0600.\n";

impl ChunkKey {
    pub fn from_bytes(b: [u8; 32]) -> ChunkKey {
        ChunkKey(b)
    }

    pub fn random() -> ChunkKey {
        let mut b = [0u8; 32];
        getrandom_bytes(&mut b);
        ChunkKey(b)
    }

    pub fn id(&self, data: &[u8]) -> ChunkId {
        *blake3::keyed_hash(&self.0, data).as_bytes()
    }

    /// The key in hex: only ever written to the key file and inside encrypted trees.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<ChunkKey> {
        super::format::parse_hex32(s).map(ChunkKey)
    }

    /// A name for the key that reveals nothing of it, to tie the local cache to it.
    pub fn fingerprint(&self) -> String {
        hex::encode(&blake3::keyed_hash(&self.0, b"datavault chunk key fingerprint").as_bytes()[..8])
    }
}

/// Random bytes from the OS.
pub(crate) fn getrandom_bytes(out: &mut [u8]) {
    getrandom::getrandom(out).expect("the OS random source works");
}

/// Load the chunk key from `path`, creating it (mode 0600, never overwriting) if missing.
/// Like an identity file, it must be owned by us and readable by nobody else: refused
/// (exit 2) otherwise.
pub fn load_or_create_chunk_key(path: &Path) -> Result<ChunkKey> {
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            check_permissions(path, &meta)?;
            read_key(path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(path),
        Err(e) => Err(Error::key(path, format!("cannot read the chunk key: {e}"))),
    }
}

fn check_permissions(path: &Path, meta: &fs::Metadata) -> Result<()> {
    if !meta.is_file() {
        return Err(Error::key(path, "the chunk key is not a regular file (a symlink?); remove it"));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::key(
            path,
            format!(
                "the chunk key is readable by others (mode {mode:04o}); run `chmod 600 {}`",
                path.display()
            ),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::key(
            path,
            format!(
                "the chunk key is owned by uid {} but datavault runs as uid {me}; run `chown {me} {}`",
                meta.uid(),
                path.display()
            ),
        ));
    }
    Ok(())
}

fn read_key(path: &Path) -> Result<ChunkKey> {
    let mut text = String::new();
    let flags = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| Error::key(path, format!("cannot read the chunk key: {e}")))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(ChunkKey::from_hex)
        .ok_or_else(|| {
            Error::key(path, "is not a chunk key (64 hex digits); move it away and a new one is made (only deduplication against older snapshots is lost)")
        })
}

fn create_key(path: &Path) -> Result<ChunkKey> {
    let key = ChunkKey::random();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::key(path, format!("cannot create its folder: {e}")))?;
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(crate::fsutil::PARTIAL_SUFFIX);
    let partial = std::path::PathBuf::from(partial);
    let _ = fs::remove_file(&partial);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&partial)
        .and_then(|mut f| {
            f.write_all(format!("{KEY_FILE_HEADER}{}\n", key.to_hex()).as_bytes())?;
            f.sync_all()
        });
    written.map_err(|e| Error::key(path, format!("cannot create the chunk key: {e}")))?;
    // A hard link fails if another run created the key meanwhile: never two keys.
    match fs::hard_link(&partial, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(&partial);
            return load_or_create_chunk_key(path);
        }
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(Error::key(path, format!("cannot create the chunk key: {e}")));
        }
    }
    let _ = fs::remove_file(&partial);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = crate::fsutil::fsync_dir(parent);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_created_private_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/chunk.key");
        let a = load_or_create_chunk_key(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let b = load_or_create_chunk_key(&path).unwrap();
        assert_eq!(a.to_hex(), b.to_hex());
        assert_ne!(a.to_hex(), ChunkKey::random().to_hex());
        assert_eq!(a.id(b"x"), b.id(b"x"));
        assert_ne!(a.id(b"x"), ChunkKey::random().id(b"x"));
        assert!(!format!("{a:?}").contains(&a.to_hex()[..8]));
    }

    #[test]
    fn a_key_readable_by_others_or_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk.key");
        load_or_create_chunk_key(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_chunk_key(&path).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::USAGE);
        assert!(e.to_string().contains("chmod 600"), "{e}");
        fs::write(&path, "nonsense\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_or_create_chunk_key(&path).unwrap_err().exit_code(), crate::error::exit::USAGE);
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(load_or_create_chunk_key(&link).is_err(), "a symlinked key is refused");
    }
}
