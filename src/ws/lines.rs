//! The adapter that puts a session on a WebSocket: [`WsLines`] reads each
//! data message a client sends as one line, and sends each line the session
//! writes as one text message, so the session (bounded line framing, the
//! batching writer, backpressure) runs over WebSocket unchanged.
//!
//! Owns: message <-> line conversion, outgoing fragmentation, keep-alive
//! pings, and the close frame (its code says why: 1000 normal, 1002
//! protocol error, 1007 text that is not UTF-8, 1009 message too big).
//! Frames, masking, fragment reassembly, size limits and answering the
//! client's pings and close are tungstenite's.
//!
//! Framing follows ElectrumX (aiorpcx's WebSocket transport) and Fulcrum:
//! one JSON-RPC message (a request, or a batch as one array) per WebSocket
//! message, text or binary, with no newline needed; every answer and
//! notification goes out as one text message without a newline. A newline
//! inside a message (pretty-printed JSON) is whitespace to JSON, so it
//! becomes a space here instead of splitting the message in two.

use crate::codec::MessageTooLong;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Outgoing messages longer than this go out in fragments of this size, so
/// tungstenite's write buffer (which keeps its largest size for the life of
/// the connection) stays small however large one answer is.
pub const FRAGMENT: usize = 16 * 1024;

/// At most this much is read and thrown away while closing, so that what
/// the client sent meanwhile does not turn the close into a reset that
/// could destroy the last answer and the close frame before it reads them.
const DRAIN: usize = 64 * 1024;

/// A WebSocket connection seen as a byte stream of lines.
pub struct WsLines<S> {
    ws: WebSocketStream<S>,
    /// The message being handed to the reader; its `\n` follows.
    incoming: Bytes,
    newline_due: bool,
    /// The writer is inside a message (its first fragment has gone out).
    in_message: bool,
    /// The writer waits for the socket (a write or flush returned
    /// `Pending`): then only the writer may flush, since a flush registers
    /// the flushing task as the one woken when the socket drains.
    writer_waiting: bool,
    keepalive: Option<KeepAlive>,
    /// The close frame to send when the session ends (`None`: normal).
    close: Option<CloseFrame>,
    /// Shutdown progress: close frame queued, write side shut, bytes drained.
    close_sent: bool,
    write_shut: bool,
    drained: usize,
}

struct KeepAlive {
    every: Duration,
    timer: Pin<Box<Sleep>>,
    /// Something came from the client since the timer last fired.
    heard: bool,
    /// A ping is queued but not yet flushed.
    unflushed: bool,
}

impl<S> WsLines<S> {
    /// Wrap an upgraded connection; `ping`: send a ping after that much
    /// silence from the client.
    pub fn new(ws: WebSocketStream<S>, ping: Option<Duration>) -> WsLines<S> {
        WsLines {
            ws,
            incoming: Bytes::new(),
            newline_due: false,
            in_message: false,
            writer_waiting: false,
            keepalive: ping.map(|every| KeepAlive {
                every,
                timer: Box::pin(tokio::time::sleep(every)),
                heard: false,
                unflushed: false,
            }),
            close: None,
            close_sent: false,
            write_shut: false,
            drained: 0,
        }
    }
}

/// One client message as a line: its newlines become spaces.
fn as_line(message: Bytes) -> Bytes {
    if !message.contains(&b'\n') {
        return message;
    }
    let mut line = BytesMut::from(&message[..]);
    for b in line.iter_mut().filter(|b| **b == b'\n') {
        *b = b' ';
    }
    line.freeze()
}

fn close_frame(code: CloseCode, reason: String) -> Option<CloseFrame> {
    // A close frame's reason fits in 123 bytes.
    let mut reason = reason;
    if reason.len() > 123 {
        let mut end = 120;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsLines<S> {
    /// Turn a read error into what the session sees, and remember the close
    /// frame that tells the client why.
    fn read_failed(&mut self, e: WsError) -> Poll<io::Result<()>> {
        let (code, reason, error) = match e {
            WsError::Capacity(CapacityError::MessageTooLong { max_size, .. }) => (
                CloseCode::Size,
                format!("message exceeds the limit of {max_size} bytes"),
                io::Error::new(io::ErrorKind::InvalidData, MessageTooLong { max: max_size }),
            ),
            // The client went away without a close frame: a plain end.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                return Poll::Ready(Ok(()))
            }
            WsError::Io(e) => return Poll::Ready(Err(e)),
            WsError::Utf8(e) => (
                CloseCode::Invalid,
                "text message is not UTF-8".to_string(),
                io::Error::new(io::ErrorKind::InvalidData, e),
            ),
            other => (
                CloseCode::Protocol,
                other.to_string(),
                io::Error::new(io::ErrorKind::InvalidData, other),
            ),
        };
        self.close = close_frame(code, reason);
        Poll::Ready(Err(error))
    }

    /// Called while the reader waits: send a ping after a silent interval.
    /// Only while the writer does not wait on the socket (a ping would not
    /// get through then anyway, and flushing would take the writer's
    /// wake-up away).
    fn keep_alive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(ka) = self.keepalive.as_mut() else {
            return Ok(());
        };
        let mut send = false;
        while ka.timer.as_mut().poll(cx).is_ready() {
            ka.timer.as_mut().reset(Instant::now() + ka.every);
            send = !std::mem::take(&mut ka.heard);
        }
        if self.writer_waiting {
            return Ok(());
        }
        let mut ws = Pin::new(&mut self.ws);
        if send {
            match ws.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    ws.as_mut()
                        .start_send(Message::Ping(Bytes::new()))
                        .map_err(io_error)?;
                    ka.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Err(io_error(e)),
                Poll::Pending => {}
            }
        }
        if ka.unflushed {
            match ws.poll_flush(cx) {
                Poll::Ready(Ok(())) => ka.unflushed = false,
                Poll::Ready(Err(e)) => return Err(io_error(e)),
                Poll::Pending => {}
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsLines<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.incoming.is_empty() || this.newline_due {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.advance(n);
                if this.incoming.is_empty() && this.newline_due && buf.remaining() > 0 {
                    buf.put_slice(b"\n");
                    this.newline_due = false;
                }
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut this.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    if let Some(ka) = this.keepalive.as_mut() {
                        ka.heard = true;
                    }
                    match message {
                        Message::Text(text) => this.incoming = as_line(Bytes::from(text)),
                        Message::Binary(data) => this.incoming = as_line(data),
                        // Pings are answered by tungstenite; a close frame
                        // is answered too, and the next read ends the stream.
                        _ => continue,
                    }
                    this.newline_due = true;
                }
                Poll::Ready(Some(Err(e))) => return this.read_failed(e),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    this.keep_alive(cx)?;
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsLines<S> {
    /// Each `\n`-terminated line becomes one text message, in fragments of
    /// at most [`FRAGMENT`] bytes; bytes after the last `\n` go out as a
    /// fragment whose message the next write continues.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut taken = 0;
        while taken < buf.len() {
            let mut ws = Pin::new(&mut this.ws);
            match ws.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Poll::Pending if taken == 0 => {
                    this.writer_waiting = true;
                    return Poll::Pending;
                }
                Poll::Pending => break,
            }
            let rest = &buf[taken..];
            let window = &rest[..rest.len().min(FRAGMENT)];
            let (chunk, used, last) = match window.iter().position(|b| *b == b'\n') {
                Some(end) => (&window[..end], end + 1, true),
                None => (window, window.len(), false),
            };
            taken += used;
            if last && chunk.is_empty() && !this.in_message {
                // An empty line: nothing to send.
                continue;
            }
            let opcode = if this.in_message {
                Data::Continue
            } else {
                Data::Text
            };
            let frame = Frame::message(Bytes::copy_from_slice(chunk), OpCode::Data(opcode), last);
            this.in_message = !last;
            ws.start_send(Message::Frame(frame)).map_err(io_error)?;
        }
        this.writer_waiting = false;
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.ws).poll_flush(cx);
        this.writer_waiting = flushed.is_pending();
        flushed.map_err(io_error)
    }

    /// Send the close frame, shut the write side, then read and discard
    /// what the client still sends (its close frame, or the rest of a
    /// message that was refused) until it closes too, within [`DRAIN`]
    /// bytes. The session bounds the whole in time.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writer_waiting = true;
        if !this.close_sent {
            let mut ws = Pin::new(&mut this.ws);
            if ready!(ws.as_mut().poll_ready(cx)).is_ok() {
                let close = this
                    .close
                    .take()
                    .or_else(|| close_frame(CloseCode::Normal, String::new()));
                // Refused when the client closed first: tungstenite has
                // answered its close frame already.
                let _ = ws.as_mut().start_send(Message::Close(close));
            }
            this.close_sent = true;
        }
        // A failed flush means the client is gone: nothing left to say.
        let _ = ready!(Pin::new(&mut this.ws).poll_flush(cx));
        let raw = this.ws.get_mut();
        if !this.write_shut {
            let _ = ready!(Pin::new(&mut *raw).poll_shutdown(cx));
            this.write_shut = true;
        }
        let mut sink = [0u8; 1024];
        while this.drained < DRAIN {
            let mut buf = ReadBuf::new(&mut sink);
            match ready!(Pin::new(&mut *raw).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => this.drained += buf.filled().len(),
                _ => break,
            }
        }
        this.writer_waiting = false;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_inside_a_message_become_spaces() {
        let line = as_line(Bytes::from_static(b"{\n  \"id\": 1\n}\n"));
        assert_eq!(&line[..], b"{   \"id\": 1 } ");
        let plain = Bytes::from_static(b"{\"id\":1}");
        assert_eq!(as_line(plain.clone()), plain);
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let frame = close_frame(CloseCode::Protocol, "é".repeat(100)).unwrap();
        assert!(frame.reason.len() <= 123);
        assert!(frame.reason.ends_with("..."));
    }
}
