//! One stored chunk: `age(zstd(chunk))`, a complete, standard age file of its own, whose
//! file key is shared by every blob of its pack.
//!
//! Why one age file per chunk rather than one per pack: the Pi repacks (copies ciphertext
//! ranges from pack to pack) without any key, and in an emergency a blob cut out of a pack
//! with `dd` is `age -d | zstd -d` away from the chunk.
//!
//! Why one *file key* per pack ([`PackKey`]): an age file made by `age::Encryptor` draws a
//! fresh file key and wraps it for every recipient, an X25519 agreement each (ephemeral
//! key generation + Diffie-Hellman), and whoever opens it does one more. At 8 KiB database
//! chunks that was ~16,000 agreements for a medium first backup and as many for its restore:
//! the costliest step of both. A pack instead draws one random 16-byte file key K, wraps it
//! once per recipient, and writes the resulting age header (stanzas and header MAC, which
//! depend only on K and the stanzas) in front of every blob it holds. Each blob then carries
//! its own fresh 16-byte nonce and the STREAM payload under
//! `HKDF-SHA-256(ikm = K, salt = nonce, info = "payload")`, exactly as age's spec lays out a
//! file (C2SP age, "Payload"), so each blob stays a file any age implementation opens.
//!
//! Why sharing K is safe: age itself derives the payload key from the file key and a random
//! nonce precisely so that the payload key is fresh per file; the spec's file key is
//! single-use only in the sense that (K, nonce) must never repeat. Here the nonce is 128
//! random bits per blob, so two blobs of a pack get the same payload key with probability
//! about n²/2¹²⁹ (for a 4 MiB pack of 8 KiB chunks, n ≈ 1,000: ~10⁻³³), and HKDF makes
//! payload keys of different nonces independent. ChaCha20-Poly1305 nonces inside a payload
//! are its STREAM counter, unique per key. The header MAC is the same for every blob of a
//! pack because the header is: it authenticates the stanzas under K, as in any age file.
//! What K's reuse does reveal: that blobs share a pack, which their offsets in the
//! (secret-free) index say anyway. Whoever holds an identity can open every blob of the
//! pack, as they could before. Tests check that no two blobs of a store share a nonce.
//!
//! Decryption uses age's own [`age::Decryptor`] (it checks the header MAC and the STREAM);
//! [`KeyCache`] is an [`age::Identity`] that remembers which file key a stanza unwraps to,
//! so opening the blobs of a pack costs one agreement, not one per blob. Once age has
//! accepted a header, the next blobs that start with the very same bytes have only their
//! payload opened ([`Opener`]), under age's STREAM rules; a test checks that these open
//! exactly when age's own reader would open them.
//!
//! Every chunk is a zstd frame, also the incompressible ones, so that readers (ours, the
//! emergency script's `zstd -d`) have one path. A chunk of 64 KiB or more whose middle 16 KiB
//! zstd cannot shrink by 2 % (photos, PDFs, archives: most uploads) is framed in raw blocks
//! directly (`raw_frame`): zstd would store it raw anyway, after searching it for matches.
//! Sealing random data in 1 MiB chunks went from 1.04 to 0.85 CPU s/GB here (2026-12-06,
//! `bench/stages.sh`); likely more on a Pi, where the search costs more per byte (not measured).
//! What the probe can miss costs size, never correctness: a chunk compressible elsewhere than
//! in its middle is stored without the gain.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use age_core::format::{FileKey, Stanza, FILE_KEY_BYTES};
use age_core::secrecy::{ExposeSecret, SecretBox};
use base64::prelude::{Engine, BASE64_STANDARD_NO_PAD};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use zeroize::Zeroizing;

use super::key::{ChunkId, ChunkKey};
use super::Identities;

/// age's STREAM chunk: 64 KiB of plaintext, 16 bytes of tag.
const STREAM_CHUNK: usize = 64 << 10;
const TAG: usize = 16;
/// The per-file nonce in front of the payload.
pub const NONCE_BYTES: usize = 16;

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

/// The file key of one pack, and the age header (with its MAC) every blob of it starts with.
pub struct PackKey {
    file_key: FileKey,
    header: Vec<u8>,
}

impl PackKey {
    /// A random file key wrapped once for each recipient.
    pub fn new(recipients: &[age::x25519::Recipient]) -> std::io::Result<PackKey> {
        if recipients.is_empty() {
            return Err(std::io::Error::other("cannot set up encryption: no recipients"));
        }
        let file_key = FileKey::init_with_mut(|k| super::key::getrandom_bytes(k));
        let mut stanzas = Vec::new();
        for r in recipients {
            let (s, _labels) = age::Recipient::wrap_file_key(r, &file_key)
                .map_err(|e| std::io::Error::other(format!("cannot set up encryption: {e}")))?;
            stanzas.extend(s);
        }
        let header = header_bytes(&file_key, &stanzas);
        Ok(PackKey { file_key, header })
    }

    /// The header bytes (`age-encryption.org/v1` to the MAC line's newline).
    pub fn header(&self) -> &[u8] {
        &self.header
    }
}

/// age v1 header: version line, one stanza per recipient (body base64 wrapped at 64
/// columns, last line short, possibly empty), then `---` and the MAC:
/// HMAC-SHA-256 keyed with HKDF-SHA-256(ikm = file key, salt = "", info = "header") over
/// everything up to and including `---`.
fn header_bytes(file_key: &FileKey, stanzas: &[Stanza]) -> Vec<u8> {
    use hmac::Mac;
    let mut h = b"age-encryption.org/v1\n".to_vec();
    for s in stanzas {
        h.extend_from_slice(b"->");
        for word in std::iter::once(&s.tag).chain(&s.args) {
            h.push(b' ');
            h.extend_from_slice(word.as_bytes());
        }
        h.push(b'\n');
        let body = BASE64_STANDARD_NO_PAD.encode(&s.body);
        let mut rest = body.as_bytes();
        while rest.len() >= 64 {
            h.extend_from_slice(&rest[..64]);
            h.push(b'\n');
            rest = &rest[64..];
        }
        h.extend_from_slice(rest);
        h.push(b'\n');
    }
    h.extend_from_slice(b"---");
    let mac_key = Zeroizing::new(age_core::primitives::hkdf(&[], b"header", file_key.expose_secret()));
    let mut mac = <hmac::Hmac<sha2_10::Sha256> as Mac>::new_from_slice(&mac_key[..]).expect("any key length");
    mac.update(&h);
    h.push(b' ');
    h.extend_from_slice(BASE64_STANDARD_NO_PAD.encode(mac.finalize().into_bytes()).as_bytes());
    h.push(b'\n');
    h
}

/// Compression and encryption of chunks, with the compressor's context and buffers kept
/// between them.
pub struct Sealer {
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

impl Sealer {
    pub fn new(level: i32) -> std::io::Result<Sealer> {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        // The content size in the frame header lets `zstd -d` and our reader size the output;
        // no frame checksum: the keyed hash checks every byte anyway.
        compressor.include_contentsize(true)?;
        compressor.include_checksum(false)?;
        Ok(Sealer { compressor, compressed: Vec::new() })
    }

    /// Write the blob for `chunk` (under the pack's key) to `out`; returns its length.
    pub fn seal_into(&mut self, pack: &PackKey, chunk: &[u8], out: &mut dyn Write) -> std::io::Result<u64> {
        self.compress(chunk)?;
        out.write_all(&pack.header)?;
        let mut nonce = [0u8; NONCE_BYTES];
        super::key::getrandom_bytes(&mut nonce);
        out.write_all(&nonce)?;
        let payload_key =
            Zeroizing::new(age_core::primitives::hkdf(&nonce, b"payload", pack.file_key.expose_secret()));
        let stream = stream_seal(&payload_key, &mut self.compressed, out)?;
        Ok((pack.header.len() + NONCE_BYTES) as u64 + stream)
    }

    /// `chunk` as one zstd frame in `self.compressed`: raw blocks if its middle looks
    /// incompressible (module doc), zstd's output otherwise.
    fn compress(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.compressed.clear();
        if chunk.len() >= PROBE_MIN {
            let mid = chunk.len() / 2;
            let sample = &chunk[mid - PROBE_BYTES / 2..mid + PROBE_BYTES / 2];
            self.compressed.reserve(zstd::zstd_safe::compress_bound(sample.len()));
            self.compressor.compress_to_buffer(sample, &mut self.compressed)?;
            let incompressible = self.compressed.len() * 100 >= sample.len() * (100 - PROBE_MIN_GAIN_PCT);
            self.compressed.clear();
            if incompressible && raw_frame(chunk, &mut self.compressed) {
                return Ok(());
            }
        }
        self.compressed.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
        self.compressor.compress_to_buffer(chunk, &mut self.compressed)?;
        Ok(())
    }

    /// The blob for `chunk` in a buffer of its own (tests, small uses).
    pub fn seal(&mut self, pack: &PackKey, chunk: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(chunk.len() + pack.header.len() + 64);
        self.seal_into(pack, chunk, &mut out)?;
        Ok(out)
    }
}

/// Chunks smaller than this are always compressed: the database's pages and small files,
/// which compress well, and where a probe would be a large share of the work.
const PROBE_MIN: usize = 64 << 10;
/// The probe: this much from the chunk's middle (a file's first chunk starts with its
/// headers, often compressible in an otherwise incompressible file).
const PROBE_BYTES: usize = 16 << 10;
/// A probe that zstd shrinks by less than this is incompressible.
const PROBE_MIN_GAIN_PCT: usize = 2;
/// Zstandard's largest block (RFC 8878, 3.1.1.2.4: `Block_Maximum_Size`).
const ZSTD_MAX_BLOCK: usize = 128 << 10;

/// Append `data` to `out` as one Zstandard frame of raw blocks (RFC 8878, 3.1.1): what zstd
/// itself writes for data it cannot compress, without the search. The frame header gives the
/// content size (4 bytes, `Single_Segment`: the window is the content, so readers allocate
/// exactly the chunk); no checksum and no dictionary, like the frames the compressor makes
/// here. Returns false (and writes nothing) for data whose size does not fit in 4 bytes.
fn raw_frame(data: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(size) = u32::try_from(data.len()) else { return false };
    let blocks = data.len().div_ceil(ZSTD_MAX_BLOCK).max(1);
    out.reserve(4 + 1 + 4 + 3 * blocks + data.len());
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    // Frame_Header_Descriptor: Frame_Content_Size_Flag 2 (4 bytes), Single_Segment_Flag.
    out.push(0b1010_0000);
    out.extend_from_slice(&size.to_le_bytes());
    let mut pieces = data.chunks(ZSTD_MAX_BLOCK).peekable();
    if pieces.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]); // one empty raw block, the last
    }
    while let Some(piece) = pieces.next() {
        // Block_Header, 3 bytes little-endian: Last_Block (bit 0), Block_Type 0 = Raw
        // (bits 1-2), Block_Size (bits 3-23).
        let header = u32::from(pieces.peek().is_none()) | ((piece.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(piece);
    }
    true
}

/// age's STREAM (C2SP age, "Payload"): ChaCha20-Poly1305 over 64 KiB chunks, nonce = 11-byte
/// big-endian counter || 0x01 for the last chunk, 0x00 otherwise. The last chunk is never
/// empty unless the whole plaintext is. Encrypts `plain` in place (it is scratch).
fn stream_seal(key: &[u8; 32], plain: &mut [u8], out: &mut dyn Write) -> std::io::Result<u64> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let pieces = plain.len().div_ceil(STREAM_CHUNK).max(1);
    let mut written = 0u64;
    let mut rest = plain;
    for counter in 0..pieces as u64 {
        let take = rest.len().min(STREAM_CHUNK);
        let (piece, tail) = rest.split_at_mut(take);
        rest = tail;
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&counter.to_be_bytes());
        nonce[11] = u8::from(counter + 1 == pieces as u64);
        let tag = cipher
            .encrypt_in_place_detached((&nonce).into(), &[], piece)
            .map_err(|_| std::io::Error::other("encryption failed"))?;
        out.write_all(piece)?;
        out.write_all(&tag)?;
        written += (piece.len() + TAG) as u64;
    }
    Ok(written)
}

/// age's STREAM, opened: the mirror of [`stream_seal`] after the blob's header, checked as
/// age's own reader checks it. `payload` is the 16-byte nonce, then 64 KiB pieces of
/// ciphertext each with its tag, the last one (and only it) sealed as last, and empty only if
/// it is the only one. Appends the plaintext to `out`.
fn stream_open(file_key: &[u8; FILE_KEY_BYTES], payload: &[u8], out: &mut Vec<u8>) -> Result<(), BlobError> {
    let damaged = |why: &str| BlobError::Damaged(format!("does not decrypt ({why})"));
    if payload.len() < NONCE_BYTES + TAG {
        return Err(damaged("age file is truncated"));
    }
    let (nonce, sealed) = payload.split_at(NONCE_BYTES);
    let payload_key = Zeroizing::new(age_core::primitives::hkdf(nonce, b"payload", file_key));
    let cipher = ChaCha20Poly1305::new((&*payload_key).into());
    let pieces = sealed.len().div_ceil(STREAM_CHUNK + TAG);
    for (counter, piece) in sealed.chunks(STREAM_CHUNK + TAG).enumerate() {
        let last = counter + 1 == pieces;
        if piece.len() < TAG || (last && piece.len() == TAG && counter > 0) {
            return Err(damaged(if piece.len() < TAG {
                "age file is truncated"
            } else {
                "last STREAM chunk is empty"
            }));
        }
        let (ct, tag) = piece.split_at(piece.len() - TAG);
        let mut n = [0u8; 12];
        n[3..11].copy_from_slice(&(counter as u64).to_be_bytes());
        n[11] = u8::from(last);
        let start = out.len();
        out.extend_from_slice(ct);
        cipher
            .decrypt_in_place_detached((&n).into(), &[], &mut out[start..], tag.into())
            .map_err(|_| damaged("decryption error"))?;
    }
    Ok(())
}

/// The length of an age header at the start of `blob`, to the newline that ends its MAC line
/// (`--- <mac>`): the first line that starts with `---`, since stanza lines start with `->`
/// and their bodies are base64. Used only on a blob age has just accepted whole.
fn header_len(blob: &[u8]) -> Option<usize> {
    let mac_line = blob.windows(4).position(|w| w == b"\n---")? + 1;
    let end = blob[mac_line..].iter().position(|&b| b == b'\n')?;
    Some(mac_line + end + 1)
}

/// Passes stanzas to `identity` and keeps the file key it unwrapped, for [`Opener`].
struct KeyRecorder<'a> {
    identity: &'a dyn age::Identity,
    key: std::cell::RefCell<Option<Zeroizing<[u8; FILE_KEY_BYTES]>>>,
}

impl age::Identity for KeyRecorder<'_> {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        self.unwrap_stanzas(std::slice::from_ref(stanza))
    }

    fn unwrap_stanzas(&self, stanzas: &[Stanza]) -> Option<Result<FileKey, age::DecryptError>> {
        let res = self.identity.unwrap_stanzas(stanzas);
        if let Some(Ok(k)) = &res {
            *self.key.borrow_mut() = Some(Zeroizing::new(*k.expose_secret()));
        }
        res
    }
}

/// An [`age::Identity`] over the given identities that remembers, for each stanza it has
/// seen, the file key it unwraps to (or that none of them opens it). All blobs of a pack
/// share their header, so a pack costs one X25519 agreement per restore instead of one per
/// blob. Sound because unwrapping is a pure function of the identity and the stanza's bytes
/// (tag, arguments, body): the same stanza always gives the same file key, and age's
/// Decryptor still checks the header MAC with it (once per header: [`Opener`]) and every
/// payload is authenticated. The file keys stay in secret (zeroized) boxes and go when the
/// cache is dropped with its reader; at most [`KeyCache::MAX_KEYS`] are kept (the reader
/// meets packs in order, so forgetting all at that point costs at most one agreement per
/// pack again).
pub struct KeyCache {
    identities: Arc<Identities>,
    keys: Mutex<KeyMap>,
}

/// Stanza bytes -> the file key it unwraps to, or `None`: none of our identities opens it.
type KeyMap = HashMap<Vec<u8>, Option<SecretBox<[u8; FILE_KEY_BYTES]>>>;

impl KeyCache {
    pub const MAX_KEYS: usize = 4096;

    pub fn new(identities: Arc<Identities>) -> KeyCache {
        KeyCache { identities, keys: Mutex::new(HashMap::new()) }
    }

    fn slot(stanza: &Stanza) -> Vec<u8> {
        // NUL never occurs in a tag or an argument (printable ASCII): an unambiguous key.
        let mut k = Vec::with_capacity(stanza.tag.len() + 64 + stanza.body.len());
        for word in std::iter::once(&stanza.tag).chain(&stanza.args) {
            k.extend_from_slice(word.as_bytes());
            k.push(0);
        }
        k.push(0);
        k.extend_from_slice(&stanza.body);
        k
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyMap> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl age::Identity for KeyCache {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        let slot = KeyCache::slot(stanza);
        if let Some(known) = self.lock().get(&slot) {
            return known
                .as_ref()
                .map(|k| Ok(FileKey::init_with_mut(|fk| fk.copy_from_slice(k.expose_secret()))));
        }
        // Not under the lock: two threads may both do this agreement once; no harm.
        let res = self.identities.iter().find_map(|i| i.unwrap_stanza(stanza));
        let remembered = match &res {
            Some(Ok(fk)) => Some(Some(SecretBox::new(Box::new(*fk.expose_secret())))),
            None => Some(None),
            Some(Err(_)) => None,
        };
        if let Some(r) = remembered {
            let mut keys = self.lock();
            if keys.len() >= KeyCache::MAX_KEYS {
                keys.clear();
            }
            keys.insert(slot, r);
        }
        res
    }
}

/// Opens blobs, keeping zstd's decompression context between them (making one per blob
/// was 5 % of a restore's CPU), and the last age header age accepted with its file key.
///
/// Every blob of a pack starts with the same header, so a reader meets the same one
/// hundreds of times in a row. Once age's own [`age::Decryptor`] has opened a blob (parsed
/// its header, unwrapped the file key, checked the header MAC with it, decrypted and
/// authenticated the payload), a later blob whose header is the same bytes would pass the
/// same parse and the same MAC with the same key: only its payload is new. That payload is
/// opened here, with age's STREAM rules ([`stream_open`]). Parsing each blob's header and
/// stanza again cost 7 % of a drill's CPU.
pub struct Opener {
    dctx: zstd::bulk::Decompressor<'static>,
    /// The header bytes (to the MAC line's newline) of the last blob age opened, and its key.
    verified: Option<(Vec<u8>, Zeroizing<[u8; FILE_KEY_BYTES]>)>,
    /// The decrypted, still compressed chunk (kept between small blobs: no allocation each).
    compressed: Vec<u8>,
}

/// The largest decrypt buffer an [`Opener`] keeps between blobs.
const KEEP_BUFFER: usize = 256 << 10;

impl Opener {
    pub fn new() -> std::io::Result<Opener> {
        Ok(Opener { dctx: zstd::bulk::Decompressor::new()?, verified: None, compressed: Vec::new() })
    }

    /// Open a blob: decrypt, decompress exactly `plain_len` bytes, check the keyed hash
    /// against `id`. Nothing comes back unless every check passed.
    pub fn open(
        &mut self,
        blob: &[u8],
        id: &ChunkId,
        plain_len: u64,
        key: &ChunkKey,
        identity: &dyn age::Identity,
    ) -> Result<Vec<u8>, BlobError> {
        let mut compressed = std::mem::take(&mut self.compressed);
        let plain = self
            .decrypt(blob, identity, &mut compressed)
            .and_then(|()| self.decompress_capped(&compressed, plain_len));
        // Kept for the next blob only while small (database chunks): a files' chunk of up to
        // 2 MiB per read-ahead thread, kept, was +7 MiB of a large drill's peak RSS.
        self.compressed = if compressed.capacity() > KEEP_BUFFER { Vec::new() } else { compressed };
        let plain = plain?;
        if key.id(&plain) != *id {
            return Err(BlobError::Damaged("its content does not match its id (keyed BLAKE3)".into()));
        }
        Ok(plain)
    }

    /// The blob's payload, decrypted and authenticated, into `out`.
    fn decrypt(
        &mut self,
        blob: &[u8],
        identity: &dyn age::Identity,
        out: &mut Vec<u8>,
    ) -> Result<(), BlobError> {
        out.clear();
        if let Some((header, file_key)) = &self.verified {
            if let Some(payload) = blob.strip_prefix(header.as_slice()) {
                return stream_open(file_key, payload, out);
            }
        }
        let recorder = KeyRecorder { identity, key: std::cell::RefCell::new(None) };
        let decryptor = age::Decryptor::new(blob).map_err(age_error)?;
        let mut reader =
            decryptor.decrypt(std::iter::once(&recorder as &dyn age::Identity)).map_err(age_error)?;
        // The compressed form is never longer than the blob: a bound a hostile blob cannot move.
        out.reserve(blob.len());
        reader
            .by_ref()
            .take(blob.len() as u64)
            .read_to_end(out)
            .map_err(|e| BlobError::Damaged(format!("does not decrypt ({e})")))?;
        drop(reader);
        // age accepted all of it: remember the header it parsed and the key that opened it.
        if let (Some(key), Some(len)) = (recorder.key.into_inner(), header_len(blob)) {
            self.verified = Some((blob[..len].to_vec(), key));
        }
        Ok(())
    }

    /// Decompress a single zstd frame into exactly `expected` bytes. The output buffer holds
    /// `expected` bytes and zstd never writes past it: a frame that would produce more (a
    /// decompression bomb) fails there.
    pub fn decompress_capped(&mut self, compressed: &[u8], expected: u64) -> Result<Vec<u8>, BlobError> {
        if expected > super::format::MAX_CHUNK {
            return Err(BlobError::Damaged(format!("declares {expected} bytes, more than any chunk")));
        }
        // One frame and nothing after it: what we write.
        match zstd::zstd_safe::find_frame_compressed_size(compressed) {
            Ok(n) if n == compressed.len() => {}
            Ok(_) => return Err(BlobError::Damaged("bytes after the compressed chunk".into())),
            Err(_) => return Err(BlobError::Damaged("not zstd".into())),
        }
        let too_big = |n: u64| {
            BlobError::Damaged(format!("decompresses to {n} bytes or more, the index says {expected}"))
        };
        if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(compressed) {
            if n > expected {
                return Err(too_big(n));
            }
        }
        let mut out = Vec::with_capacity(expected as usize);
        self.dctx.decompress_to_buffer(compressed, &mut out).map_err(|e| {
            if out.capacity() as u64 == expected && e.to_string().contains("too small") {
                too_big(expected + 1)
            } else {
                BlobError::Damaged(format!("does not decompress ({e})"))
            }
        })?;
        if out.len() as u64 != expected {
            return Err(BlobError::Damaged(format!(
                "decompresses to {} bytes, the index says {expected}",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// [`Opener::open`] with a fresh context (tests, single blobs).
pub fn open_blob(
    blob: &[u8],
    id: &ChunkId,
    plain_len: u64,
    key: &ChunkKey,
    identity: &dyn age::Identity,
) -> Result<Vec<u8>, BlobError> {
    let mut opener = Opener::new().map_err(|e| BlobError::Damaged(format!("no decompressor ({e})")))?;
    opener.open(blob, id, plain_len, key, identity)
}

/// [`Opener::decompress_capped`] with a fresh context.
pub fn decompress_capped(compressed: &[u8], expected: u64) -> Result<Vec<u8>, BlobError> {
    let mut opener = Opener::new().map_err(|e| BlobError::Damaged(format!("no decompressor ({e})")))?;
    opener.decompress_capped(compressed, expected)
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

    fn keys() -> (age::x25519::Identity, Arc<Identities>) {
        let id = age::x25519::Identity::generate();
        let ids: Identities = vec![Box::new(id.clone())];
        (id, Arc::new(ids))
    }

    /// age's own reader, no cache: what any age implementation sees.
    fn plain_age(blob: &[u8], id: &age::x25519::Identity) -> Result<Vec<u8>, age::DecryptError> {
        let d = age::Decryptor::new(blob)?;
        let mut r = d.decrypt(std::iter::once(id as &dyn age::Identity))?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(age::DecryptError::from)?;
        Ok(out)
    }

    #[test]
    fn a_blob_opens_only_whole_and_with_its_id() {
        let (id, ids) = keys();
        let cache = KeyCache::new(ids);
        let key = ChunkKey::random();
        let pack = PackKey::new(&[id.to_public()]).unwrap();
        let mut sealer = Sealer::new(3).unwrap();
        let chunk = b"hello hello hello hello".repeat(100);
        let blob = sealer.seal(&pack, &chunk).unwrap();
        assert!(blob.starts_with(pack.header()));
        let cid = key.id(&chunk);
        let n = chunk.len() as u64;
        assert_eq!(open_blob(&blob, &cid, n, &key, &cache).unwrap(), chunk);
        assert!(matches!(open_blob(&blob, &[0; 32], n, &key, &cache), Err(BlobError::Damaged(_))));
        assert!(open_blob(&blob, &cid, n - 1, &key, &cache).is_err());
        assert!(open_blob(&blob, &cid, n + 1, &key, &cache).is_err());
        assert!(open_blob(&blob[..blob.len() - 1], &cid, n, &key, &cache).is_err());
        let (_, other) = keys();
        let other = KeyCache::new(other);
        assert!(matches!(open_blob(&blob, &cid, n, &key, &other), Err(BlobError::WrongKey)));
    }

    #[test]
    fn blobs_of_a_pack_share_the_header_and_differ_in_nonce_and_open_with_plain_age() {
        let (id, _) = keys();
        let pack = PackKey::new(&[id.to_public()]).unwrap();
        let mut sealer = Sealer::new(3).unwrap();
        let mut nonces = std::collections::HashSet::new();
        let h = pack.header().len();
        // Sizes around STREAM's 64 KiB boundaries, compressible and not.
        let mut rnd = vec![0u8; (3 * STREAM_CHUNK) + 7];
        super::super::key::getrandom_bytes(&mut rnd);
        for len in [1, 100, STREAM_CHUNK - 20, STREAM_CHUNK, STREAM_CHUNK + 1, 2 * STREAM_CHUNK, rnd.len()] {
            for chunk in [rnd[..len].to_vec(), vec![7u8; len]] {
                let blob = sealer.seal(&pack, &chunk).unwrap();
                assert_eq!(&blob[..h], pack.header());
                assert!(nonces.insert(blob[h..h + NONCE_BYTES].to_vec()), "nonce reused");
                let z = plain_age(&blob, &id).unwrap();
                assert_eq!(zstd::bulk::decompress(&z, len).unwrap(), chunk);
            }
        }
        // Another pack: another file key, another header.
        let pack2 = PackKey::new(&[id.to_public()]).unwrap();
        assert_ne!(pack.header(), pack2.header());
    }

    /// The zstd frame inside a sealed blob.
    fn frame_of(sealer: &mut Sealer, chunk: &[u8]) -> Vec<u8> {
        let (id, _) = keys();
        let pack = PackKey::new(&[id.to_public()]).unwrap();
        plain_age(&sealer.seal(&pack, chunk).unwrap(), &id).unwrap()
    }

    #[test]
    fn an_incompressible_chunk_is_framed_raw_and_any_zstd_reads_it_back() {
        let mut sealer = Sealer::new(3).unwrap();
        let mut rnd = vec![0u8; 3 * ZSTD_MAX_BLOCK + 5];
        super::super::key::getrandom_bytes(&mut rnd);
        // From the probe's threshold up, across the 128 KiB block boundaries.
        for len in [PROBE_MIN, ZSTD_MAX_BLOCK, ZSTD_MAX_BLOCK + 1, 2 * ZSTD_MAX_BLOCK, rnd.len()] {
            let chunk = &rnd[..len];
            let z = frame_of(&mut sealer, chunk);
            // Magic, descriptor, 4-byte size, then 3 bytes of header per block: nothing else.
            assert_eq!(z.len(), 9 + 3 * len.div_ceil(ZSTD_MAX_BLOCK) + len, "len {len}");
            assert_eq!(zstd::zstd_safe::get_frame_content_size(&z).unwrap(), Some(len as u64));
            assert_eq!(zstd::bulk::decompress(&z, len).unwrap(), chunk, "len {len}");
            assert_eq!(decompress_capped(&z, len as u64).unwrap(), chunk);
            assert!(decompress_capped(&z, len as u64 - 1).is_err());
            // zstd's streaming reader (the emergency script's `zstd -d` is the same library).
            let mut back = Vec::new();
            zstd::stream::read::Decoder::new(&z[..]).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, chunk);
        }
        // The empty frame is well formed too (not used by the sealer: empty chunks are none).
        let mut empty = Vec::new();
        assert!(raw_frame(&[], &mut empty));
        assert_eq!(zstd::bulk::decompress(&empty, 0).unwrap(), b"");
        // Below the threshold, zstd compresses as always (its own frame: a window descriptor).
        let z = frame_of(&mut sealer, &rnd[..PROBE_MIN - 1]);
        assert_eq!(zstd::bulk::decompress(&z, PROBE_MIN - 1).unwrap(), &rnd[..PROBE_MIN - 1]);
    }

    #[test]
    fn the_probe_looks_at_the_middle_and_compresses_what_it_can() {
        let mut sealer = Sealer::new(3).unwrap();
        let mut rnd = vec![0u8; 512 << 10];
        super::super::key::getrandom_bytes(&mut rnd);
        let text = b"bonjour le monde, the quick brown fox ".repeat((512 << 10) / 38 + 1);
        // Random head (a photo's first chunk after its headers), text in the middle and after:
        // compressed, and well.
        let mut mixed = rnd[..128 << 10].to_vec();
        mixed.extend_from_slice(&text[..384 << 10]);
        let z = frame_of(&mut sealer, &mixed);
        assert!(z.len() < (128 << 10) + (16 << 10), "{}", z.len());
        assert_eq!(zstd::bulk::decompress(&z, mixed.len()).unwrap(), mixed);
        // A text header (EXIF, XMP) before random bytes: framed raw, the header's gain lost.
        let mut photo = text[..8 << 10].to_vec();
        photo.extend_from_slice(&rnd[..504 << 10]);
        let z = frame_of(&mut sealer, &photo);
        assert_eq!(z.len(), 9 + 3 * 4 + photo.len());
        assert_eq!(zstd::bulk::decompress(&z, photo.len()).unwrap(), photo);
        // Data zstd shrinks by a little more than the threshold is still compressed: random
        // bytes from 192 values of 256 (7.58 bits each, a gain of 5 % for Huffman alone).
        let slightly: Vec<u8> = rnd.iter().map(|b| b % 192).collect();
        let z = frame_of(&mut sealer, &slightly);
        assert!(z.len() < slightly.len() * 97 / 100, "{}", z.len());
        assert_eq!(zstd::bulk::decompress(&z, slightly.len()).unwrap(), slightly);
    }

    #[test]
    fn a_flipped_byte_in_header_nonce_or_payload_fails() {
        let (id, ids) = keys();
        let key = ChunkKey::random();
        let pack = PackKey::new(&[id.to_public()]).unwrap();
        let mut sealer = Sealer::new(3).unwrap();
        let chunk = vec![42u8; 100_000];
        let blob = sealer.seal(&pack, &chunk).unwrap();
        let cid = key.id(&chunk);
        let h = pack.header().len();
        // In the stanza's body, in the MAC, in the nonce, in the payload, in the last tag.
        let body_at = blob.iter().position(|&b| b == b'\n').unwrap() + 60;
        for at in [30, body_at, h - 5, h + 3, h + NONCE_BYTES + 10, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 0x01;
            let cache = KeyCache::new(ids.clone());
            assert!(open_blob(&bad, &cid, chunk.len() as u64, &key, &cache).is_err(), "flip at {at}");
            assert!(plain_age(&bad, &id).is_err(), "plain age, flip at {at}");
        }
    }

    #[test]
    fn a_header_for_two_recipients_opens_with_each_and_the_cache_unwraps_once() {
        let (a, _) = keys();
        let (b, _) = keys();
        let key = ChunkKey::random();
        let pack = PackKey::new(&[a.to_public(), b.to_public()]).unwrap();
        let mut sealer = Sealer::new(3).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 9000]).collect();
        let blobs: Vec<Vec<u8>> = chunks.iter().map(|c| sealer.seal(&pack, c).unwrap()).collect();
        for who in [&a, &b] {
            let counting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let ids: Identities = vec![Box::new(Counting(who.clone(), counting.clone()))];
            let cache = KeyCache::new(Arc::new(ids));
            for (c, blob) in chunks.iter().zip(&blobs) {
                assert_eq!(&open_blob(blob, &key.id(c), c.len() as u64, &key, &cache).unwrap(), c);
                assert!(plain_age(blob, who).is_ok());
            }
            // Two stanzas, each tried once at most; then every blob from the cache.
            assert!(counting.load(std::sync::atomic::Ordering::SeqCst) <= 2);
        }
    }

    /// Opens nothing: a blob that opens anyway was opened with the key remembered from age.
    struct NoKey;
    impl age::Identity for NoKey {
        fn unwrap_stanza(&self, _: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
            None
        }
    }

    #[test]
    fn after_age_accepted_a_header_the_pack_s_other_blobs_open_exactly_when_age_would_open_them() {
        let (id, _) = keys();
        let pack = PackKey::new(&[id.to_public()]).unwrap();
        let mut sealer = Sealer::new(3).unwrap();
        let mut opener = Opener::new().unwrap();
        let mut out = Vec::new();
        let primer = sealer.seal(&pack, b"first blob of the pack").unwrap();
        assert!(opener.decrypt(&primer, &NoKey, &mut out).is_err(), "nothing remembered yet");
        opener.decrypt(&primer, &id, &mut out).unwrap();
        assert_eq!(opener.verified.as_ref().unwrap().0, pack.header(), "the whole header, MAC line included");
        let h = pack.header().len() + NONCE_BYTES;
        let piece = STREAM_CHUNK + TAG;
        let mut rnd = vec![0u8; 3 * STREAM_CHUNK + 7];
        super::super::key::getrandom_bytes(&mut rnd);
        let mut cases = 0;
        for len in [0, 1, STREAM_CHUNK - 1, STREAM_CHUNK, STREAM_CHUNK + 1, 2 * STREAM_CHUNK, rnd.len()] {
            // Incompressible, so that the payload has as many pieces as the chunk.
            let blob = sealer.seal(&pack, &rnd[..len]).unwrap();
            let pieces = (blob.len() - h).div_ceil(piece);
            let mut variants = vec![blob.clone()];
            for k in 0..pieces {
                for at in [h + k * piece, (h + (k + 1) * piece).min(blob.len()) - 1] {
                    let mut bad = blob.clone();
                    bad[at] ^= 0x80;
                    variants.push(bad);
                }
                variants.push(blob[..h + k * piece].to_vec());
                variants.push(blob[..h + k * piece + TAG - 1].to_vec());
            }
            let mut bad = blob.clone();
            bad[h - 1] ^= 1; // the nonce
            variants.push(bad);
            variants.push(blob[..blob.len() - 1].to_vec());
            for extra in [&[0u8][..], &[0u8; TAG][..], &blob[blob.len() - TAG..]] {
                variants.push([&blob[..], extra].concat());
            }
            let last = h + (pieces - 1) * piece;
            variants.push([&blob[..], &blob[last..]].concat()); // the last piece twice
            if pieces > 2 {
                variants.push([&blob[..h + piece], &blob[h + 2 * piece..]].concat()); // one gone
                variants.push(
                    [
                        &blob[..h],
                        &blob[h + piece..h + 2 * piece],
                        &blob[h..h + piece],
                        &blob[h + 2 * piece..],
                    ]
                    .concat(),
                );
            }
            for (i, v) in variants.iter().enumerate() {
                let ours = opener.decrypt(v, &NoKey, &mut out).map(|()| out.clone());
                let age = plain_age(v, &id);
                assert_eq!(ours.is_ok(), age.is_ok(), "len {len}, variant {i}: ours {ours:?}");
                if let (Ok(a), Ok(b)) = (&ours, &age) {
                    assert_eq!(a, b, "len {len}, variant {i}");
                }
                cases += 1;
            }
            assert_eq!(
                zstd::bulk::decompress(
                    &opener.decrypt(&blob, &NoKey, &mut out).map(|()| out.clone()).unwrap(),
                    len.max(1)
                )
                .unwrap(),
                &rnd[..len]
            );
        }
        assert!(cases > 100);
        // Another pack's header is new: age again, with a key that opens it, or none.
        let other = PackKey::new(&[id.to_public()]).unwrap();
        let blob = sealer.seal(&other, b"x").unwrap();
        assert!(matches!(opener.decrypt(&blob, &NoKey, &mut out), Err(BlobError::WrongKey)));
        opener.decrypt(&blob, &id, &mut out).unwrap();
        assert_eq!(opener.verified.as_ref().unwrap().0, other.header());
    }

    struct Counting(age::x25519::Identity, Arc<std::sync::atomic::AtomicUsize>);
    impl age::Identity for Counting {
        fn unwrap_stanza(&self, s: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.unwrap_stanza(s)
        }
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
        // Without the content size in its header, zstd stops at the end of the buffer.
        let mut streamed = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut streamed, 3).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&zeros).unwrap();
        enc.finish().unwrap();
        assert!(zstd::zstd_safe::get_frame_content_size(&streamed).unwrap().is_none());
        match decompress_capped(&streamed, 1000) {
            Err(BlobError::Damaged(m)) => assert!(m.contains("or more"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Trailing bytes, a second frame, garbage.
        let small = zstd::bulk::compress(b"abc", 3).unwrap();
        let mut two = small.clone();
        two.extend_from_slice(&small);
        assert!(decompress_capped(&two, 3).is_err());
        assert!(decompress_capped(&two, 6).is_err());
        assert!(decompress_capped(b"not zstd at all", 3).is_err());
        assert_eq!(decompress_capped(&small, 3).unwrap(), b"abc");
        assert!(decompress_capped(&small, 2).is_err());
        assert!(decompress_capped(&small, 4).is_err());
    }
}
