//! The CPU cost of each stage of a backup and a restore, one stage at a time on one thread,
//! in seconds per GB of the stage's input (#14). `bench/stages.sh` runs it twice: as built,
//! and with the sha2 crate forced to its portable code (`--cfg sha2_backend="soft"`, what a
//! Pi 4's Cortex-A72 runs: it has no SHA instructions), and writes the table that the Pi
//! estimates in the README rest on.
//!
//! ```text
//! stage_costs [MIB [DB]]   MIB of input per stage (default 256); a markdown table on stdout
//! ```
//! Two inputs: incompressible bytes (most uploads: photos, PDFs) and database pages: the
//! first MIB of the SQLite file DB (bench/stages.sh passes the bench's generated app.db),
//! or, without DB, generated pages of records.
//! Each stage is timed on the thread's own CPU clock (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`),
//! best of three runs, so other work on the machine changes the figures little.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use datavault::store::dedup::chunker::CdcChunker;
use datavault::store::dedup::{ChunkKey, ChunkerParams};
use sha2::Digest;

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Best of three: (CPU seconds, wall seconds) of `f`.
fn measure(mut f: impl FnMut()) -> (f64, f64) {
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let (c0, w0) = (thread_cpu(), Instant::now());
        f();
        let (c, w) = ((thread_cpu() - c0).as_secs_f64(), w0.elapsed().as_secs_f64());
        if c < best.0 {
            best = (c, w);
        }
    }
    best
}

fn incompressible(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = vec![0u8; n];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// 4 KiB pages of records: ids, amounts, names and words from small vocabularies, like the
/// bench's generated app.db (compresses ~3.5x with zstd 3).
fn database_like(n: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "candidate",
        "document",
        "approved",
        "pending",
        "rejected",
        "invoice",
        "paris",
        "lyon",
        "contract",
        "review",
        "signed",
        "upload",
        "audit",
        "session",
        "renewal",
        "archive",
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = Vec::with_capacity(n + 4096);
    let mut id = 1u64;
    while v.len() < n {
        let page_end = v.len() + 4096;
        while v.len() + 120 < page_end {
            let r = rnd();
            let rec = format!(
                "{id}|{}|{}.{:02}|{} {} {}|2026-{:02}-{:02}T{:02}:{:02}:00Z|",
                r % 100_000,
                r % 5000,
                (r >> 20) % 100,
                WORDS[(r >> 8) as usize % 16],
                WORDS[(r >> 12) as usize % 16],
                WORDS[(r >> 16) as usize % 16],
                1 + (r >> 24) % 12,
                1 + (r >> 28) % 28,
                (r >> 32) % 24,
                (r >> 36) % 60
            );
            v.extend_from_slice(rec.as_bytes());
            id += 1;
        }
        v.resize(page_end, 0);
    }
    v.truncate(n);
    v
}

struct Row {
    stage: &'static str,
    input: &'static str,
    cpu_s_per_gb: f64,
    mb_per_s: f64,
}

fn row(stage: &'static str, input: &'static str, bytes: usize, f: impl FnMut()) -> Row {
    let (cpu, wall) = measure(f);
    let gb = bytes as f64 / 1e9;
    eprintln!("{stage} ({input}): {:.2} CPU s/GB", cpu / gb);
    Row { stage, input, cpu_s_per_gb: cpu / gb, mb_per_s: bytes as f64 / 1e6 / wall }
}

fn main() -> io::Result<()> {
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let n = mib << 20;
    let db = match std::env::args().nth(2) {
        Some(path) => {
            let mut bytes = Vec::with_capacity(n);
            std::fs::File::open(&path)?.take(n as u64).read_to_end(&mut bytes)?;
            assert!(bytes.len() == n, "{path} holds less than {mib} MiB");
            bytes
        }
        None => database_like(n),
    };
    let inputs = [("incompressible", incompressible(n)), ("database", db)];
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public();
    let key = ChunkKey::from_bytes([7; 32]);
    let params = ChunkerParams::default();
    let mut rows = Vec::new();
    for (name, data) in &inputs {
        let data = data.as_slice();
        rows.push(row("SHA-256 (sha2)", name, n, || {
            std::hint::black_box(sha2::Sha256::digest(data));
        }));
        rows.push(row("keyed BLAKE3 chunk id, 1 MiB chunks", name, n, || {
            for c in data.chunks(1 << 20) {
                std::hint::black_box(key.id(c));
            }
        }));
        rows.push(row("FastCDC cut points (files)", name, n, || {
            let mut ch = CdcChunker::new(&params);
            let mut r = data;
            let mut k = 0usize;
            while let Some(c) = ch.next_chunk(&mut r).unwrap() {
                k += c.len();
            }
            assert_eq!(k, data.len());
        }));
        let mut compressed = Vec::new();
        rows.push(row("zstd -3 compress", name, n, || {
            compressed = zstd::bulk::compress(data, 3).unwrap();
        }));
        eprintln!("zstd -3 ratio ({name}): {:.2}", n as f64 / compressed.len() as f64);
        rows.push(row("zstd decompress (per GB of output)", name, n, || {
            std::hint::black_box(zstd::bulk::decompress(&compressed, n).unwrap());
        }));
        // What a snapshot's sealer does to a files' chunk: zstd (or, for a chunk whose middle
        // zstd cannot shrink, a raw zstd frame) then age's STREAM under the pack's key.
        let pack = datavault::store::dedup::blob::PackKey::new(std::slice::from_ref(&recipient))?;
        let mut sealer = datavault::store::dedup::blob::Sealer::new(3)?;
        let mut blob = Vec::with_capacity((1 << 20) + 4096);
        rows.push(row("snapshot sealer (zstd -3 + age), 1 MiB chunks", name, n, || {
            for c in data.chunks(1 << 20) {
                blob.clear();
                sealer.seal_into(&pack, c, &mut blob).unwrap();
                std::hint::black_box(&blob);
            }
        }));
        let mut sealed = Vec::with_capacity(n + n / 1000 + 1024);
        rows.push(row("age encrypt (ChaCha20-Poly1305)", name, n, || {
            sealed.clear();
            let e =
                age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient)).unwrap();
            let mut w = e.wrap_output(&mut sealed).unwrap();
            for c in data.chunks(256 << 10) {
                w.write_all(c).unwrap();
            }
            w.finish().unwrap();
        }));
        rows.push(row("age decrypt (per GB of output)", name, n, || {
            let d = age::Decryptor::new_buffered(&sealed[..]).unwrap();
            let mut r = d.decrypt(std::iter::once(&identity as &dyn age::Identity)).unwrap();
            let mut buf = vec![0u8; 256 << 10];
            let mut k = 0;
            loop {
                match r.read(&mut buf).unwrap() {
                    0 => break,
                    m => k += m,
                }
            }
            assert_eq!(k, n);
        }));
        if *name == "incompressible" {
            // Page-cache writes and reads through 256 KiB syscalls (no fsync: the device's
            // time is not CPU), as the archive writer and the extractor do them.
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("f");
            rows.push(row("write(2), 256 KiB, page cache", name, n, || {
                let mut f = std::fs::File::create(&path).unwrap();
                for c in data.chunks(256 << 10) {
                    f.write_all(c).unwrap();
                }
            }));
            rows.push(row("read(2), 256 KiB, page cache", name, n, || {
                let mut f = std::fs::File::open(&path).unwrap();
                let mut buf = vec![0u8; 256 << 10];
                while f.read(&mut buf).unwrap() > 0 {}
            }));
            rows.push(row("tar framing (tar crate, 1 MiB entries)", name, n, || {
                let mut b = tar::Builder::new(io::sink());
                for (i, c) in data.chunks(1 << 20).enumerate() {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, format!("uploads/{i}.bin"), c).unwrap();
                }
                b.finish().unwrap();
            }));
        }
    }
    // bench/stages.sh says which sha2 backend this build has (a cfg set through RUSTFLAGS).
    let sha = std::env::var("STAGE_COSTS_SHA2").unwrap_or_else(|_| "as built".into());
    println!("| stage | input | CPU s/GB | MB/s (one core) |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {:.2} | {:.0} |", r.stage, r.input, r.cpu_s_per_gb, r.mb_per_s);
    }
    println!();
    println!("sha2 backend: {sha}; {mib} MiB per stage and input, best of 3, one thread.");
    Ok(())
}
