//! Bounded newline-delimited framing, generic over any `AsyncRead`.
//!
//! Owns: turning a byte stream into lines of at most `max_len` bytes. It does
//! not parse JSON (that is `jsonrpc`) and does not write (writers batch their
//! own output, see `session::writer`).
//!
//! Idle wallets are the common case, so a reader waiting with nothing
//! buffered holds no buffer at all: it reads into a stack buffer that lives
//! only during the read call and keeps just the bytes that arrived. The heap
//! buffer exists while part of a line is waiting for the rest (it grows
//! while a long line is being assembled) and is released once it is empty.

use std::ops::Range;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// What a read attempt produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One line, without its `\n` (and without a trailing `\r`), borrowed
    /// from the reader's buffer until the next call.
    Line(&'a [u8]),
    /// The peer closed the stream cleanly. A partial last line without `\n`
    /// is returned as a `Line` first.
    Eof,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("line longer than {max} bytes")]
    TooLong { max: usize },
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What a transport that frames messages itself (WebSocket) returns, inside
/// an `io::Error`, for a message over its limit: the reader reports it as
/// [`CodecError::TooLong`], so the session answers it as it answers a line
/// that is too long.
#[derive(Debug, thiserror::Error)]
#[error("message longer than {max} bytes")]
pub struct MessageTooLong {
    pub max: usize,
}

impl CodecError {
    fn from_read(e: std::io::Error) -> CodecError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<MessageTooLong>())
        {
            Some(too_long) => CodecError::TooLong { max: too_long.max },
            None => CodecError::Io(e),
        }
    }
}

/// Minimum room for a read into a buffer that holds part of a line.
const MIN_READ: usize = 512;
/// A read into an empty buffer goes through this much stack.
const STACK_READ: usize = 4096;

/// A line reader with a hard maximum line length.
///
/// Lines are handed out as slices of one buffer (no allocation or
/// reference count per line): `buf[start..]` is what has not been handed
/// out yet, and what was handed out is dropped from the front only before
/// the next read.
///
/// `next_frame` is cancel-safe: bytes already read stay in the buffer, so it
/// can sit in a `select!` next to a shutdown branch.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as lines (with their newlines).
    start: usize,
    /// How far `buf` has already been scanned for `\n` without finding one.
    scanned: usize,
    max_len: usize,
    /// Capacity kept while nothing is buffered; 0 (client sessions): the
    /// buffer is released, so an idle reader holds none.
    keep: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// A reader that holds no buffer while nothing is buffered (many idle
    /// clients).
    pub fn new(inner: R, max_len: usize) -> Self {
        Self::keeping(inner, max_len, 0)
    }

    /// A reader that keeps a buffer of `keep` bytes between reads and reads
    /// up to that much at once (few busy upstream connections).
    pub fn keeping(inner: R, max_len: usize, keep: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max_len,
            keep,
            eof: false,
        }
    }

    /// Read the next line. Empty lines (keep-alive newlines) are skipped.
    pub async fn next_frame(&mut self) -> Result<Frame<'_>, CodecError> {
        loop {
            if let Some(line) = self.take_line()? {
                return Ok(Frame::Line(&self.buf[line]));
            }
            if self.eof {
                // A last line without its newline: hand it out as a line.
                let line = trim_cr(&self.buf, self.start..self.buf.len());
                self.start = self.buf.len();
                self.scanned = self.start;
                if line.is_empty() {
                    return Ok(Frame::Eof);
                }
                return Ok(Frame::Line(&self.buf[line]));
            }
            self.drop_handed_out();
            let n = if self.buf.is_empty() && self.keep == 0 {
                read_fresh(&mut self.inner, &mut self.buf).await
            } else {
                let room = if self.buf.is_empty() {
                    self.keep
                } else {
                    self.buf.len().max(MIN_READ)
                };
                if self.buf.capacity() - self.buf.len() < MIN_READ / 2 {
                    self.buf.reserve(room);
                }
                self.inner.read_buf(&mut self.buf).await
            };
            let n = n.map_err(CodecError::from_read)?;
            if n == 0 {
                self.eof = true;
            }
        }
    }

    /// The next complete line already in the buffer, without reading:
    /// lets a caller handle everything one read brought in one go.
    pub fn next_buffered(&mut self) -> Result<Option<&[u8]>, CodecError> {
        Ok(self.take_line()?.map(|line| &self.buf[line]))
    }

    /// Hand out the next complete non-empty line in the buffer, if there is
    /// one: its range in `buf`.
    fn take_line(&mut self) -> Result<Option<Range<usize>>, CodecError> {
        loop {
            let Some(offset) = memchr::memchr(b'\n', &self.buf[self.scanned..]) else {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.max_len {
                    return Err(CodecError::TooLong { max: self.max_len });
                }
                return Ok(None);
            };
            let end = self.scanned + offset;
            if end - self.start > self.max_len {
                return Err(CodecError::TooLong { max: self.max_len });
            }
            let line = trim_cr(&self.buf, self.start..end);
            self.start = end + 1;
            self.scanned = self.start;
            if !line.is_empty() {
                return Ok(Some(line));
            }
        }
    }

    /// Before a read: drop the lines handed out from the front of the
    /// buffer. Once empty, a reader that keeps nothing releases the buffer
    /// (the wait that follows may be long); otherwise the part of a line
    /// still waiting for its rest moves to the front.
    fn drop_handed_out(&mut self) {
        if self.start == self.buf.len() {
            if self.keep == 0 || self.buf.capacity() > self.keep * 4 {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        } else if self.start > 0 {
            self.buf.drain(..self.start);
        }
        self.scanned -= self.start;
        self.start = 0;
    }

    /// Bytes received but not yet returned as a line.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Read once into a stack buffer (part of the poll call's frame, not of the
/// future, which would hold it across the wait) and append what arrived to
/// `buf`, which is allocated to that size only now.
async fn read_fresh<R: AsyncRead + Unpin>(
    inner: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut read = ReadBuf::uninit(&mut stack);
        std::task::ready!(std::pin::Pin::new(&mut *inner).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        std::task::Poll::Ready(Ok(read.filled().len()))
    })
    .await
}

/// `line` without a trailing `\r`.
fn trim_cr(buf: &[u8], line: Range<usize>) -> Range<usize> {
    if line.end > line.start && buf[line.end - 1] == b'\r' {
        line.start..line.end - 1
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A frame, owned.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Line(Vec<u8>),
        Eof,
    }

    fn got(frame: Frame<'_>) -> Got {
        match frame {
            Frame::Line(l) => Got::Line(l.to_vec()),
            Frame::Eof => Got::Eof,
        }
    }

    async fn frames(input: &[u8], max: usize) -> Vec<Result<Got, String>> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        loop {
            match reader.next_frame().await {
                Ok(Frame::Eof) => {
                    out.push(Ok(Got::Eof));
                    return out;
                }
                Ok(f) => out.push(Ok(got(f))),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    fn line(s: &str) -> Result<Got, String> {
        Ok(Got::Line(s.as_bytes().to_vec()))
    }

    #[tokio::test]
    async fn splits_lines_and_strips_cr() {
        let got = frames(b"a\r\nbb\n\n\nccc", 100).await;
        assert_eq!(got, vec![line("a"), line("bb"), line("ccc"), Ok(Got::Eof)]);
    }

    #[tokio::test]
    async fn rejects_too_long_line_with_newline() {
        let got = frames(b"12345678901\nok\n", 10).await;
        assert_eq!(got, vec![Err("line longer than 10 bytes".into())]);
    }

    #[tokio::test]
    async fn rejects_too_long_line_without_newline() {
        let input = vec![b'x'; 5000];
        let got = frames(&input, 1000).await;
        assert_eq!(got, vec![Err("line longer than 1000 bytes".into())]);
    }

    #[tokio::test]
    async fn exact_limit_is_accepted() {
        let got = frames(b"1234567890\n", 10).await;
        assert_eq!(got, vec![line("1234567890"), Ok(Got::Eof)]);
    }

    #[tokio::test]
    async fn next_buffered_takes_only_what_one_read_brought() {
        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        tx.write_all(b"a\n\nbb\ncc").await.unwrap();
        let mut reader = LineReader::new(rx, 100);
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line(b"a"));
        // "bb" is buffered (the empty line skipped); "cc" has no newline yet.
        assert_eq!(reader.next_buffered().unwrap(), Some(&b"bb"[..]));
        assert_eq!(reader.next_buffered().unwrap(), None);
        tx.write_all(b"\n").await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line(b"cc"));
    }

    #[tokio::test]
    async fn a_transport_refusing_a_long_message_reads_as_a_long_line() {
        struct Refusing;
        impl AsyncRead for Refusing {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let e =
                    std::io::Error::new(std::io::ErrorKind::InvalidData, MessageTooLong { max: 7 });
                std::task::Poll::Ready(Err(e))
            }
        }
        let mut reader = LineReader::new(Refusing, 100);
        assert!(matches!(
            reader.next_frame().await,
            Err(CodecError::TooLong { max: 7 })
        ));
    }

    #[tokio::test]
    async fn a_reader_with_nothing_buffered_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        let mut reader = LineReader::new(rx, 100);
        assert_eq!(reader.buf.capacity(), 0);
        tx.write_all(b"a\nb").await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line(b"a"));
        tx.write_all(b"b\n").await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line(b"bb"));
        // The next read finds nothing: it waits without a buffer.
        let waiting = tokio::time::timeout(Duration::from_millis(1), reader.next_frame()).await;
        assert!(waiting.is_err());
        assert_eq!(reader.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_keeping_reader_reads_much_at_once_and_keeps_its_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        use tokio::io::AsyncWriteExt;
        let lines: Vec<u8> = (0..1000)
            .flat_map(|i| format!("line {i:04}\n").into_bytes())
            .collect();
        tx.write_all(&lines).await.unwrap();
        let mut keeping = LineReader::keeping(rx, 100, 1 << 15);
        assert_eq!(
            keeping.next_frame().await.unwrap(),
            Frame::Line(b"line 0000")
        );
        // One read took all 10,000 bytes (a fresh reader's stack read
        // takes 4,096).
        assert_eq!(keeping.buffered(), lines.len() - 10);
        let mut n = 1;
        while keeping.next_buffered().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 1000);
        tx.write_all(b"more\n").await.unwrap();
        assert_eq!(keeping.next_frame().await.unwrap(), Frame::Line(b"more"));
        assert!(keeping.buf.capacity() >= 1 << 15);

        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&lines).await.unwrap();
        let mut fresh = LineReader::new(rx, 100);
        assert_eq!(fresh.next_frame().await.unwrap(), Frame::Line(b"line 0000"));
        assert_eq!(fresh.buffered(), STACK_READ - 10);
    }

    #[tokio::test]
    async fn a_line_waiting_for_its_rest_moves_to_the_front() {
        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        tx.write_all(b"one\ntw").await.unwrap();
        let mut reader = LineReader::keeping(rx, 100, 16);
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line(b"one"));
        assert_eq!(reader.next_buffered().unwrap(), None);
        tx.write_all(b"o\r\nthree\n").await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line(b"two"));
        assert_eq!(reader.start, 5);
        assert_eq!(reader.next_buffered().unwrap(), Some(&b"three"[..]));
        assert_eq!(reader.buffered(), 0);
    }

    #[tokio::test]
    async fn line_split_across_reads() {
        let (mut tx, rx) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(b"{\"id\":1,\"method\":\"x\"}\n{\"id\":2}\n")
                .await
                .unwrap();
        });
        let mut reader = LineReader::new(rx, 100);
        assert_eq!(
            reader.next_frame().await.unwrap(),
            Frame::Line(b"{\"id\":1,\"method\":\"x\"}")
        );
        assert_eq!(
            reader.next_frame().await.unwrap(),
            Frame::Line(b"{\"id\":2}")
        );
        writer.await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Eof);
    }
}
