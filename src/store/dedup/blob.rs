//! One stored chunk: `age(zstd(chunk))`, a complete age file of its own.
//!
//! Why one age file per chunk rather than one per pack: the Pi repacks (copies ciphertext
//! ranges from pack to pack) without any key, and in an emergency a blob cut out of a pack
//! with `dd` is `age -d | zstd -d` away from the chunk. The price is age's header (about
//! 200 bytes and one X25519 agreement per recipient) per chunk.
//!
//! Every chunk is compressed, also the incompressible ones: zstd 3 passes random data at
//! 2.8 GB/s here (and stores it in raw blocks, +0.002 %), so a "stored raw" marker would save
//! about 0.15 s on the medium bench's 350 MB of random uploads and cost a second code path in
//! the format and in the emergency script (docs/format.md).

use std::io::{Read, Write};

use super::key::{ChunkId, ChunkKey};
use super::Identities;

/// Why a blob did not open. The reader turns these into integrity errors naming the chunk.
#[derive(Debug)]
pub enum BlobError {
    /// None of our identities opens it: a blob made for other recipients.
    WrongKey,
    /// Not a valid age file, failed authentication, bad zstd, wrong length or wrong hash.
    Damaged(String),
}

impl std::fmt::Display for BlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobError::WrongKey => f.write_str("wrong key: no identity given opens it"),
            BlobError::Damaged(m) => f.write_str(m),
        }
    }
}

/// Compression and encryption of chunks, with the compressor's context kept between them.
pub struct Sealer {
    compressor: zstd::bulk::Compressor<'static>,
    recipients: Vec<age::x25519::Recipient>,
}

impl Sealer {
    pub fn new(recipients: &[age::x25519::Recipient], level: i32) -> std::io::Result<Sealer> {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        // The content size in the frame header lets `zstd -d` and our reader size the output;
        // no frame checksum: the keyed hash checks every byte anyway.
        compressor.include_contentsize(true)?;
        compressor.include_checksum(false)?;
        Ok(Sealer { compressor, recipients: recipients.to_vec() })
    }

    /// The blob for `chunk`, ready to be appended to a pack.
    pub fn seal(&mut self, chunk: &[u8]) -> std::io::Result<Vec<u8>> {
        let compressed = self.compressor.compress(chunk)?;
        let encryptor =
            age::Encryptor::with_recipients(self.recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| std::io::Error::other(format!("cannot set up encryption: {e}")))?;
        let mut out = Vec::with_capacity(compressed.len() + 256 * self.recipients.len() + 64);
        let mut w = encryptor.wrap_output(&mut out)?;
        w.write_all(&compressed)?;
        w.finish()?;
        Ok(out)
    }
}

/// Open a blob: decrypt, decompress at most `plain_len` bytes, check the keyed hash against
/// `id`. Nothing comes back unless every check passed.
pub fn open_blob(
    blob: &[u8],
    id: &ChunkId,
    plain_len: u64,
    key: &ChunkKey,
    identities: &Identities,
) -> Result<Vec<u8>, BlobError> {
    let decryptor = age::Decryptor::new(blob).map_err(age_error)?;
    let mut reader =
        decryptor.decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity)).map_err(age_error)?;
    // The compressed form is never longer than the blob: a bound a hostile blob cannot move.
    let mut compressed = Vec::with_capacity(blob.len());
    reader
        .by_ref()
        .take(blob.len() as u64)
        .read_to_end(&mut compressed)
        .map_err(|e| BlobError::Damaged(format!("does not decrypt ({e})")))?;
    let plain = decompress_capped(&compressed, plain_len)?;
    if key.id(&plain) != *id {
        return Err(BlobError::Damaged("its content does not match its id (keyed BLAKE3)".into()));
    }
    Ok(plain)
}

/// Decompress a single zstd frame into exactly `expected` bytes. A frame that would produce
/// more (a decompression bomb) is stopped at `expected + 1` bytes.
pub fn decompress_capped(compressed: &[u8], expected: u64) -> Result<Vec<u8>, BlobError> {
    if expected > super::format::MAX_CHUNK {
        return Err(BlobError::Damaged(format!("declares {expected} bytes, more than any chunk")));
    }
    let mut dec = zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(|e| BlobError::Damaged(format!("not zstd ({e})")))?
        .single_frame();
    let mut out = Vec::with_capacity(expected as usize);
    (&mut dec)
        .take(expected + 1)
        .read_to_end(&mut out)
        .map_err(|e| BlobError::Damaged(format!("does not decompress ({e})")))?;
    if out.len() as u64 != expected {
        return Err(BlobError::Damaged(format!(
            "decompresses to {}{} bytes, the index says {expected}",
            out.len(),
            if out.len() as u64 > expected { " or more" } else { "" }
        )));
    }
    // Trailing bytes after the frame: not what we write.
    let rest = dec.finish();
    if !rest.is_empty() {
        return Err(BlobError::Damaged("bytes after the compressed chunk".into()));
    }
    Ok(out)
}

fn age_error(e: age::DecryptError) -> BlobError {
    use age::DecryptError as D;
    match e {
        D::NoMatchingKeys => BlobError::WrongKey,
        D::InvalidHeader | D::UnknownFormat => BlobError::Damaged("not a readable age file".into()),
        D::InvalidMac => BlobError::Damaged("its age header failed authentication".into()),
        other => BlobError::Damaged(format!("does not decrypt ({other})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (age::x25519::Identity, Identities) {
        let id = age::x25519::Identity::generate();
        let ids: Identities = vec![Box::new(id.clone())];
        (id, ids)
    }

    #[test]
    fn a_blob_opens_only_whole_and_with_its_id() {
        let (id, ids) = keys();
        let key = ChunkKey::random();
        let mut sealer = Sealer::new(&[id.to_public()], 3).unwrap();
        let chunk = b"hello hello hello hello".repeat(100);
        let blob = sealer.seal(&chunk).unwrap();
        let cid = key.id(&chunk);
        assert_eq!(open_blob(&blob, &cid, chunk.len() as u64, &key, &ids).unwrap(), chunk);
        assert!(matches!(
            open_blob(&blob, &[0; 32], chunk.len() as u64, &key, &ids),
            Err(BlobError::Damaged(_))
        ));
        assert!(open_blob(&blob, &cid, chunk.len() as u64 - 1, &key, &ids).is_err());
        assert!(open_blob(&blob, &cid, chunk.len() as u64 + 1, &key, &ids).is_err());
        assert!(open_blob(&blob[..blob.len() - 1], &cid, chunk.len() as u64, &key, &ids).is_err());
        let mut flipped = blob.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        assert!(open_blob(&flipped, &cid, chunk.len() as u64, &key, &ids).is_err());
        let (_, other) = keys();
        assert!(matches!(open_blob(&blob, &cid, chunk.len() as u64, &key, &other), Err(BlobError::WrongKey)));
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_declared_size() {
        let zeros = vec![0u8; 8 << 20];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        assert!(bomb.len() < 4096);
        match decompress_capped(&bomb, 1000) {
            Err(BlobError::Damaged(m)) => assert!(m.contains("or more"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(decompress_capped(&bomb, super::super::format::MAX_CHUNK + 1).is_err());
    }
}
