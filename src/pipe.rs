//! Two-stage pipelines across threads: one side of a `Write` or `Read` chain runs on its own
//! thread, connected by a bounded channel of large chunks.
//!
//! Why: a backup is tar + zstd + SHA-256 of every file on one side and age encryption +
//! SHA-256 of the archive + the disk write on the other. Serially that is one busy core while
//! the other (a Pi has four) idles; split, the two halves overlap. The channel is bounded
//! (`depth` chunks), so memory stays fixed whatever the data size.

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// A `Write` whose bytes are written to `inner` by a background thread.
/// Call [`PipeWriter::finish`] to flush and get `inner` back; dropping it discards the tail.
pub struct PipeWriter<W: Write + Send + 'static> {
    tx: Option<SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
    chunk: usize,
    handle: Option<JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> PipeWriter<W> {
    pub fn new(mut inner: W, chunk: usize, depth: usize) -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(depth);
        let handle = std::thread::Builder::new()
            .name("datavault-writer".into())
            .spawn(move || {
                for chunk in rx {
                    inner.write_all(&chunk)?;
                }
                Ok(inner)
            })
            .expect("the OS can start a thread");
        PipeWriter { tx: Some(tx), buf: Vec::with_capacity(chunk), chunk, handle: Some(handle) }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        let tx = self.tx.as_ref().expect("sender present until finish");
        if tx.send(full).is_err() {
            // The writer thread stopped: it has the real error.
            return Err(self.join().err().unwrap_or_else(|| io::Error::other("the writer thread stopped")));
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<W> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked"))),
            None => Err(io::Error::other("the writer thread already stopped")),
        }
    }

    /// Send what is buffered, wait for the thread, and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.send()?;
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for PipeWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.send()?;
        }
        Ok(n)
    }

    /// Only hands the buffer to the thread; durability comes from `finish` and fsync.
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl<W: Write + Send + 'static> Drop for PipeWriter<W> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A `Read` fed by a background thread reading `inner` in chunks.
pub struct PipeReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
    _handle: JoinHandle<()>,
}

impl PipeReader {
    pub fn new<R: Read + Send + 'static>(mut inner: R, chunk: usize, depth: usize) -> Self {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(depth);
        let handle = std::thread::Builder::new()
            .name("datavault-reader".into())
            .spawn(move || loop {
                let mut buf = vec![0u8; chunk];
                let mut filled = 0;
                // Fill whole chunks: fewer, larger hand-overs.
                let res = loop {
                    match inner.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == chunk {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(filled);
                let eof = filled < chunk;
                if filled > 0 && tx.send(Ok(buf)).is_err() {
                    return;
                }
                if let Err(e) = res {
                    let _ = tx.send(Err(e));
                    return;
                }
                if eof {
                    return;
                }
            })
            .expect("the OS can start a thread");
        PipeReader { rx, cur: Vec::new(), pos: 0, done: false, _handle: handle }
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_delivers_every_byte_in_order() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = PipeWriter::new(Vec::new(), 4096, 2);
        for piece in data.chunks(1000) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.finish().unwrap(), data);
    }

    struct Failing(usize);
    impl Write for Failing {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.0 < b.len() {
                return Err(io::Error::from_raw_os_error(28));
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writer_reports_the_threads_error() {
        let mut w = PipeWriter::new(Failing(10_000), 4096, 1);
        let mut err = None;
        for _ in 0..100 {
            if let Err(e) = w.write_all(&[0u8; 1000]) {
                err = Some(e);
                break;
            }
        }
        let err = err.or_else(|| w.finish().err()).expect("the error surfaces");
        assert_eq!(err.raw_os_error(), Some(28));
    }

    #[test]
    fn reader_delivers_every_byte_then_eof_or_the_error() {
        let data: Vec<u8> = (0..300_001u32).map(|i| (i % 253) as u8).collect();
        let mut r = PipeReader::new(io::Cursor::new(data.clone()), 4096, 2);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);

        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk"))
            }
        }
        let mut r = PipeReader::new(io::Cursor::new(vec![1u8; 10]).chain(Broken), 4096, 2);
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(got, vec![1u8; 10]);
    }
}
