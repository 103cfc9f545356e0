//! Where chunks are cut.
//!
//! * Files (uploads, raw): FastCDC v2020 (crate `fastcdc`), so an insertion in the middle of
//!   a file moves only the chunks around it. 256 KiB / 1 MiB / 4 MiB: most uploads are a
//!   single chunk; big ones dedupe by the MiB.
//! * The database: its page stream cut every `database_fixed` bytes. SQLite never moves a
//!   page, so fixed, page-aligned chunks see a changed page as one changed chunk and never
//!   shift; CDC finds the same boundaries at more cost (docs/format.md has the measurement).

use std::io::{self, Read};

use super::format::ChunkerParams;

/// Content-defined chunks of a stream.
pub fn content_defined<R: Read>(source: R, p: &ChunkerParams) -> fastcdc::v2020::StreamCDC<R> {
    fastcdc::v2020::StreamCDC::new(source, p.files_min as usize, p.files_avg as usize, p.files_max as usize)
}

/// Fill `buf` from `r` as far as it goes: a short count only at the end of the stream.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The error inside a fastcdc error, as an `io::Error`.
pub fn cdc_error(e: fastcdc::v2020::Error) -> io::Error {
    match e {
        fastcdc::v2020::Error::IoError(io) => io,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insertion_moves_only_nearby_chunks() {
        let p = ChunkerParams { files_min: 4096, files_avg: 16384, files_max: 65536, database_fixed: 4096 };
        let mut data = vec![0u8; 1 << 20];
        let mut x = 1u64;
        for b in data.iter_mut() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        let cuts = |d: &[u8]| -> Vec<Vec<u8>> { content_defined(d, &p).map(|c| c.unwrap().data).collect() };
        let before = cuts(&data);
        let mut edited = data.clone();
        edited.splice(500_000..500_000, b"inserted".iter().copied());
        let after = cuts(&edited);
        let same = after.iter().filter(|c| before.contains(c)).count();
        assert!(same + 3 >= before.len(), "{same} of {} chunks kept", before.len());
        assert_eq!(before.concat(), data);
    }
}
