//! The chunked content stream of a transfer (see `sandboxd_protocol::files`): a reader that
//! yields the bytes of incoming chunks until the empty one, and a writer that sends what it is
//! given in chunks of at most `MAX_CHUNK` bytes. Neither holds more than one chunk.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use sandboxd_protocol::files::{chunk_header, chunk_len, MAX_CHUNK};

/// Reads the content the daemon uploads.
pub struct ChunkReader<'a> {
    conn: &'a UnixStream,
    /// Bytes left in the current chunk.
    left: usize,
    done: bool,
}

impl<'a> ChunkReader<'a> {
    pub fn new(conn: &'a UnixStream) -> Self {
        ChunkReader {
            conn,
            left: 0,
            done: false,
        }
    }

    /// Read and discard everything up to the end of the data (after a tar stream's end marker
    /// the daemon may still send padding).
    pub fn drain(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while self.read(&mut buf)? > 0 {}
        Ok(())
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut prefix = [0u8; 4];
            let mut conn = self.conn;
            conn.read_exact(&mut prefix)?;
            self.left = chunk_len(prefix).map_err(io::Error::other)?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let mut conn = self.conn;
        let n = conn.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upload ended before its last chunk",
            ));
        }
        self.left -= n;
        Ok(n)
    }
}

/// Sends content to the daemon.
pub struct ChunkWriter<'a> {
    conn: &'a UnixStream,
    buf: Vec<u8>,
}

impl<'a> ChunkWriter<'a> {
    pub fn new(conn: &'a UnixStream) -> Self {
        ChunkWriter {
            conn,
            buf: Vec::with_capacity(MAX_CHUNK),
        }
    }

    /// Send what is buffered and the empty chunk that ends the data.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        let mut conn = self.conn;
        conn.write_all(&chunk_header(0))
    }
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = MAX_CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn;
        conn.write_all(&chunk_header(self.buf.len()))?;
        conn.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chunks_carry_bytes_exactly_and_end_with_an_empty_one() {
        let (a, b) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..(3 * MAX_CHUNK + 77)).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        #[allow(
            clippy::disallowed_methods,
            reason = "a test thread plays the other end; the helper process itself never runs one"
        )]
        let writer = std::thread::spawn(move || {
            let mut w = ChunkWriter::new(&a);
            for piece in sent.chunks(1000) {
                w.write_all(piece).unwrap();
            }
            w.finish().unwrap();
            // Whatever follows the data is not part of it.
            (&a).write_all(b"after").unwrap();
        });
        let mut r = ChunkReader::new(&b);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got == data);
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);
        let mut rest = [0u8; 5];
        (&b).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"after");
        writer.join().unwrap();
    }

    #[test]
    fn an_oversized_or_truncated_chunk_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&((MAX_CHUNK + 1) as u32).to_le_bytes())
            .unwrap();
        assert!(ChunkReader::new(&b).read(&mut [0u8; 16]).is_err());
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&chunk_header(10)).unwrap();
        (&a).write_all(b"abc").unwrap();
        drop(a);
        let mut got = Vec::new();
        assert!(ChunkReader::new(&b).read_to_end(&mut got).is_err());
    }
}
