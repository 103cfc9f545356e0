//! Where chunks are cut.
//!
//! * Files (uploads, raw): FastCDC v2020 (crate `fastcdc`), so an insertion in the middle of
//!   a file moves only the chunks around it. 256 KiB / 1 MiB / 2 MiB: most uploads are a
//!   single chunk; big ones dedupe by the MiB.
//! * The database: its page stream cut every `database_fixed` bytes. SQLite never moves a
//!   page, so fixed, page-aligned chunks see a changed page as one changed chunk and never
//!   shift; CDC finds the same boundaries at more cost (docs/format.md has the measurement).

use std::io::{self, Read};

use super::format::ChunkerParams;

/// Content-defined chunks of one stream after another, through one buffer.
///
/// fastcdc's `StreamCDC` allocates and zeroes a `max_size` buffer per stream: 4 MiB for each
/// of the medium bench's 3,000 uploads, 12 GB of memset and page faults that took most of a
/// first backup's time. Same cut points (the same v2020 gear hash, level 1, seed 0).
pub struct CdcChunker {
    buf: Vec<u8>,
    len: usize,
    consumed: usize,
    eof: bool,
    params: ChunkerParams,
}

impl CdcChunker {
    pub fn new(params: &ChunkerParams) -> CdcChunker {
        CdcChunker {
            buf: vec![0; params.files_max as usize],
            len: 0,
            consumed: 0,
            eof: false,
            params: *params,
        }
    }

    /// Start on a new stream.
    pub fn reset(&mut self) {
        (self.len, self.consumed, self.eof) = (0, 0, false);
    }

    /// The next chunk of `r`, `None` at its end. The slice is valid until the next call.
    pub fn next_chunk(&mut self, r: &mut dyn Read) -> io::Result<Option<&[u8]>> {
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.len, 0);
            self.len -= self.consumed;
            self.consumed = 0;
        }
        while self.len < self.buf.len() && !self.eof {
            match r.read(&mut self.buf[self.len..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.len == 0 {
            return Ok(None);
        }
        let p = &self.params;
        let cdc = fastcdc::v2020::FastCDC::new(
            &self.buf[..self.len],
            p.files_min as usize,
            p.files_avg as usize,
            p.files_max as usize,
        );
        let (_, count) = cdc.cut(0, self.len);
        self.consumed = count.clamp(1, self.len);
        Ok(Some(&self.buf[..self.consumed]))
    }
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
        let mut chunker = CdcChunker::new(&p);
        let mut cuts = |d: &[u8]| -> Vec<Vec<u8>> {
            chunker.reset();
            let mut r = d;
            let mut out = Vec::new();
            while let Some(c) = chunker.next_chunk(&mut r).unwrap() {
                out.push(c.to_vec());
            }
            // The same cut points as fastcdc's own streaming chunker.
            let theirs: Vec<Vec<u8>> =
                fastcdc::v2020::StreamCDC::new(d, 4096, 16384, 65536).map(|c| c.unwrap().data).collect();
            assert_eq!(out, theirs);
            out
        };
        let before = cuts(&data);
        let mut edited = data.clone();
        edited.splice(500_000..500_000, b"inserted".iter().copied());
        let after = cuts(&edited);
        let same = after.iter().filter(|c| before.contains(c)).count();
        assert!(same + 3 >= before.len(), "{same} of {} chunks kept", before.len());
        assert_eq!(before.concat(), data);
        // A stream no bigger than the smallest chunk is one chunk, whole: the snapshot
        // writer reads such files straight into a chunk of their own.
        for len in [0, 1, 4095, 4096] {
            let mut r = &data[..len];
            chunker.reset();
            let mut streamed = Vec::new();
            while let Some(c) = chunker.next_chunk(&mut r).unwrap() {
                streamed.push(c.to_vec());
            }
            let whole: Vec<Vec<u8>> = if len == 0 { vec![] } else { vec![data[..len].to_vec()] };
            assert_eq!(streamed, whole, "{len} bytes");
        }
    }
}
