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

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// What a read attempt produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One line, without its `\n` (and without a trailing `\r`).
    Line(BytesMut),
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
/// `next_frame` is cancel-safe: bytes already read stay in the buffer, so it
/// can sit in a `select!` next to a shutdown branch.
pub struct LineReader<R> {
    inner: R,
    buf: BytesMut,
    max_len: usize,
    /// How far `buf` has already been scanned for `\n` without finding one.
    scanned: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max_len: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            max_len,
            scanned: 0,
            eof: false,
        }
    }

    /// Read the next line. Empty lines (keep-alive newlines) are skipped.
    pub async fn next_frame(&mut self) -> Result<Frame, CodecError> {
        loop {
            if let Some(line) = self.next_buffered()? {
                return Ok(Frame::Line(line));
            }
            if self.eof {
                if self.buf.is_empty() {
                    return Ok(Frame::Eof);
                }
                // A last line without its newline: hand it out as a line.
                let line = self.buf.split();
                self.scanned = 0;
                let trimmed = trim_cr(line);
                if trimmed.is_empty() {
                    return Ok(Frame::Eof);
                }
                return Ok(Frame::Line(trimmed));
            }
            let n = if self.buf.is_empty() {
                // Whatever capacity is left (shared with lines already
                // handed out) is released before the wait.
                self.buf = BytesMut::new();
                read_fresh(&mut self.inner, &mut self.buf).await
            } else {
                if self.buf.capacity() - self.buf.len() < MIN_READ / 2 {
                    self.buf.reserve(self.buf.len().max(MIN_READ));
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
    pub fn next_buffered(&mut self) -> Result<Option<BytesMut>, CodecError> {
        while let Some(line) = self.take_line()? {
            if !line.is_empty() {
                return Ok(Some(line));
            }
        }
        Ok(None)
    }

    /// Split one complete line off the buffer, if there is one.
    fn take_line(&mut self) -> Result<Option<BytesMut>, CodecError> {
        let found = memchr::memchr(b'\n', &self.buf[self.scanned..]);
        match found {
            Some(offset) => {
                let end = self.scanned + offset;
                if end > self.max_len {
                    return Err(CodecError::TooLong { max: self.max_len });
                }
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                self.scanned = 0;
                Ok(Some(trim_cr(line)))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_len {
                    return Err(CodecError::TooLong { max: self.max_len });
                }
                Ok(None)
            }
        }
    }

    /// Bytes received but not yet returned as a line.
    pub fn buffered(&self) -> usize {
        self.buf.remaining()
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
    buf: &mut BytesMut,
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

fn trim_cr(mut line: BytesMut) -> BytesMut {
    if line.last() == Some(&b'\r') {
        line.truncate(line.len() - 1);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn frames(input: &[u8], max: usize) -> Vec<Result<Frame, String>> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        loop {
            match reader.next_frame().await {
                Ok(Frame::Eof) => {
                    out.push(Ok(Frame::Eof));
                    return out;
                }
                Ok(f) => out.push(Ok(f)),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    fn line(s: &str) -> Result<Frame, String> {
        Ok(Frame::Line(BytesMut::from(s)))
    }

    #[tokio::test]
    async fn splits_lines_and_strips_cr() {
        let got = frames(b"a\r\nbb\n\n\nccc", 100).await;
        assert_eq!(
            got,
            vec![line("a"), line("bb"), line("ccc"), Ok(Frame::Eof)]
        );
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
        assert_eq!(got, vec![line("1234567890"), Ok(Frame::Eof)]);
    }

    #[tokio::test]
    async fn next_buffered_takes_only_what_one_read_brought() {
        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        tx.write_all(b"a\n\nbb\ncc").await.unwrap();
        let mut reader = LineReader::new(rx, 100);
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line("a".into()));
        // "bb" is buffered (the empty line skipped); "cc" has no newline yet.
        assert_eq!(reader.next_buffered().unwrap(), Some("bb".into()));
        assert_eq!(reader.next_buffered().unwrap(), None);
        tx.write_all(b"\n").await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line("cc".into()));
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
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line("a".into()));
        tx.write_all(b"b\n").await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Line("bb".into()));
        // The next read finds nothing: it waits without a buffer.
        let waiting = tokio::time::timeout(Duration::from_millis(1), reader.next_frame()).await;
        assert!(waiting.is_err());
        assert_eq!(reader.buf.capacity(), 0);
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
            Frame::Line(BytesMut::from("{\"id\":1,\"method\":\"x\"}"))
        );
        assert_eq!(
            reader.next_frame().await.unwrap(),
            Frame::Line(BytesMut::from("{\"id\":2}"))
        );
        writer.await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap(), Frame::Eof);
    }
}
