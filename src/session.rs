//! One client session, independent of its transport.
//!
//! Owns: the reader loop (bounded framing, first-line and idle timeouts, one
//! call into the router per line) and the writer task (drains the session's
//! bounded queue and writes everything queued with one `write` call). The two
//! are joined by the bounded queue whose sending side is [`Outbound`]: upstream
//! answers and hub notifications arrive through clones of it. A client whose
//! queue fills is disconnected, never buffered without limit.
//!
//! Backpressure: the reader reads a line only while the queue has a free slot
//! for the answer of every request still in flight plus one, so a client that
//! pipelines faster than the writer drains (thousands of requests in one
//! write) is slowed down instead of overflowing its own queue with answers.
//! A client that stops reading then leaves the reader waiting for room; after
//! the idle timeout it is disconnected.
//!
//! Draining (the proxy is stopping or handing over): the session keeps
//! serving until it owes nothing: its first line has come, every request it
//! read has been answered, and nothing it sent is waiting to be read. Then
//! it ends: the writer flushes what is queued and closes its side, and what
//! the client still sends (a request that crossed the close on the wire) is
//! read and discarded briefly, so the close is not a reset that could
//! destroy answers on their way. A session still busy when the grace period
//! ends is closed by the hard stop.
//!
//! The session works on any `AsyncRead + AsyncWrite` (TCP, TLS, in-memory
//! pipes in tests, the WebSocket adapter of `ws::lines`); it knows nothing
//! of sockets.

use crate::codec::{CodecError, Frame, LineReader};
use crate::hub::SessionId;
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::limits::{Limit, ReplyLimits, SessionGate};
use crate::reply::{self, Inbox, Outbound};
use crate::router::{Router, SessionState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Limits one session runs under.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_line: usize,
    pub queue: usize,
    /// Time allowed for the first line.
    pub first_line_timeout: Duration,
    /// Time allowed between two lines.
    pub idle_timeout: Duration,
}

/// Tokens that end sessions.
#[derive(Clone)]
pub struct Stops {
    /// Stop accepting; every session ends once it owes nothing (see
    /// "Draining" above).
    pub drain: CancellationToken,
    /// Stop everything now (grace period over).
    pub hard: CancellationToken,
}

/// Past this many bytes a write goes out without waiting for more answers.
const WRITE_BATCH: usize = 64 * 1024;

/// How often a paused reader looks again without a wake-up.
const RECHECK: Duration = Duration::from_millis(100);

/// After a drained session closed its side: how long, and how many lines,
/// it reads and discards what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_LINES: u64 = 1000;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A fresh process-wide session id.
pub fn next_session_id() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// Why a session ended (logged once, at debug level).
#[derive(Debug)]
#[allow(dead_code)] // read through Debug in the log line
enum End {
    ClientClosed,
    Idle,
    LineTooLong,
    ReadError(String),
    Disconnected,
    /// No room for answers within the idle timeout: the client stopped reading.
    SlowReader,
    Refused,
    /// Draining, and nothing was owed any more.
    Drained,
    /// The hard stop (the grace period of a drain ran out).
    Shutdown,
}

/// Serve one client until it leaves, misbehaves, or the proxy stops. The
/// `gate` holds the session's slots and budgets (see `limits`).
///
/// Not an `async fn`: one keeps a copy of each argument beside the locals
/// made from it for as long as it runs. Here the setup (the writer task is
/// spawned now) happens before the future exists, and the future holds
/// only what the session needs while it waits: about 0.2 KiB less per idle
/// session.
pub fn run<S>(
    stream: S,
    router: Arc<Router>,
    limits: SessionLimits,
    stops: Stops,
    gate: SessionGate,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    // The hard stop cancels `kill` too: the reader and the writer wait on
    // one token fewer at every wake-up (the hard stop is told apart by
    // asking it when `kill` fires).
    let kill = stops.hard.child_token();
    let metrics = router.metrics.clone();
    let (out, rx) = reply::channel(
        limits.queue,
        kill.clone(),
        Some(gate.reply_limits()),
        Some(metrics.clone()),
    );
    let writer = tokio::spawn(write_loop(
        wr,
        rx,
        kill.clone(),
        router.metrics.bytes_out.clone(),
        gate.reply_limits(),
    ));
    let mut st = SessionState::new(next_session_id(), out);
    let max_in_flight = gate.max_in_flight();
    st.gate = gate;
    let mut reader = LineReader::new(rd, limits.max_line);
    async move {
        let mut first_line = true;
        // Set up once, not per line: each of these registers itself with a
        // timer wheel or a waiter list when first polled.
        let drain = stops.drain.cancelled();
        let killed = kill.cancelled();
        let mut draining = false;
        // The idle timer is re-armed lazily: a line only moves `deadline` later;
        // when the timer fires before it, it is set to the deadline and waited
        // again. The timer must never be later than the deadline.
        let mut deadline = Instant::now() + limits.first_line_timeout;
        let idle = tokio::time::sleep_until(deadline);
        tokio::pin!(drain, killed, idle);
        let killed_why = || {
            if stops.hard.is_cancelled() {
                End::Shutdown
            } else {
                End::Disconnected
            }
        };

        let end = loop {
            if !has_room(&st.out, max_in_flight) {
                if st.out.pending() >= max_in_flight {
                    st.gate.hit(Limit::InFlight);
                }
                let waited = tokio::select! {
                    _ = &mut drain, if !draining => {
                        draining = true;
                        continue;
                    }
                    _ = &mut killed => break killed_why(),
                    // Boxed, as every wait off the common path: inline, each
                    // would make every session's task larger (see README
                    // "Performance", idle sessions).
                    r = Box::pin(tokio::time::timeout(limits.idle_timeout, wait_for_room(&st.out, max_in_flight))) => r,
                };
                if waited.is_err() {
                    // The writer is stuck on a client that does not read.
                    kill.cancel();
                    break End::SlowReader;
                }
                // Time spent waiting for room is not the client's idle time.
                deadline = Instant::now() + limits.idle_timeout;
            }
            let frame = if draining && owes_nothing(first_line, &st.out, &reader) {
                // Bytes may have arrived that nobody has read yet: a request
                // already received is answered before the session ends.
                let last = Box::pin(async {
                    tokio::task::yield_now().await;
                    tokio::time::timeout(Duration::ZERO, reader.next_frame()).await
                });
                match last.await {
                    Ok(r) => Ok(r),
                    Err(_) => break End::Drained,
                }
            } else {
                tokio::select! {
                    biased;
                    r = reader.next_frame() => Ok(r),
                    _ = &mut drain, if !draining => {
                        draining = true;
                        continue;
                    }
                    _ = &mut killed => break killed_why(),
                    // An answer left: the session may owe nothing now (the
                    // writer's wake-up can come just before the request stops
                    // counting as pending, hence the timeout).
                    // Built only once draining (the block runs when first polled).
                    _ = async { Box::pin(tokio::time::timeout(RECHECK, st.out.room().notified())).await }, if draining => continue,
                    _ = &mut idle => Err(()),
                }
            };
            let frame = match frame {
                Err(()) if Instant::now() < deadline => {
                    idle.as_mut().reset(deadline);
                    continue;
                }
                other => other,
            };
            match frame {
                Err(()) => {
                    // Slowloris (no first line) or an idle wallet.
                    st.gate.refused(if first_line {
                        Limit::FirstLine
                    } else {
                        Limit::Idle
                    });
                    break End::Idle;
                }
                Ok(Ok(Frame::Line(line))) => {
                    metrics.bytes_in.inc_by(line.len() as u64 + 1);
                    st.line_at = Instant::now();
                    deadline = st.line_at + limits.idle_timeout;
                    if first_line {
                        // The timer may be set later than the idle deadline
                        // (a longer first-line timeout): the only time the
                        // deadline moves earlier, so re-arm now.
                        idle.as_mut().reset(deadline);
                        first_line = false;
                    }
                    router.handle_line(&mut st, line);
                    if st.close {
                        break End::Refused;
                    }
                }
                Ok(Ok(Frame::Eof)) => break End::ClientClosed,
                Ok(Err(CodecError::TooLong { max })) => {
                    metrics.limit_hit();
                    st.gate.hit(Limit::Line);
                    st.out.send(&jsonrpc::error_line(
                        jsonrpc::NULL_ID,
                        &RpcError::new(
                            ErrorCode::InvalidRequest,
                            format!(
                                "line exceeds the limit of {max} bytes: closing the connection"
                            ),
                        ),
                    ));
                    break End::LineTooLong;
                }
                Ok(Err(CodecError::Io(e))) => break End::ReadError(e.to_string()),
            }
        };
        tracing::debug!(?end, pending = st.out.pending(), "session ends");
        match end {
            End::Drained => metrics.drained_idle.inc(),
            End::Shutdown => metrics.drained_deadline.inc(),
            _ => {}
        }
        if matches!(end, End::Drained) {
            st.out.finish();
        }
        router.hub.session_closed(st.id, st.subs.drain().collect());
        // The writer finishes once every pending answer has been written (each
        // holds a clone of the queue's sender) or the hard stop comes.
        drop(st);
        let _ = writer.await;
        if matches!(end, End::Drained) {
            let late = Box::pin(linger(&mut reader, &stops.hard)).await;
            if late > 0 {
                metrics.drain_late_lines.inc_by(late);
                tracing::debug!(
                    lines = late,
                    "requests arrived after the drained session closed"
                );
            }
        }
    }
}

/// Whether a draining session may end: it has been asked something (a new
/// connection is about to ask), every request it read is answered, and no
/// part of a line is waiting in the buffer.
fn owes_nothing<R: AsyncRead + Unpin>(
    first_line: bool,
    out: &Outbound,
    reader: &LineReader<R>,
) -> bool {
    !first_line && out.pending() == 0 && reader.buffered() == 0
}

/// Read and discard what a client sends after the session closed its side,
/// until it closes too (bounded in time and lines); returns the lines.
async fn linger<R: AsyncRead + Unpin>(reader: &mut LineReader<R>, hard: &CancellationToken) -> u64 {
    let mut lines = 0;
    let discard = async {
        while lines < LINGER_LINES {
            match reader.next_frame().await {
                Ok(Frame::Line(_)) => lines += 1,
                Ok(Frame::Eof) | Err(CodecError::Io(_)) => break,
                Err(CodecError::TooLong { .. }) => break,
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(LINGER, discard) => {}
        _ = hard.cancelled() => {}
    }
    lines
}

/// Whether the queue can take the answers of every request in flight and
/// the answer of one more line, and the session is under its in-flight
/// limit (a session at the limit is not read until an answer leaves).
fn has_room(out: &Outbound, max_in_flight: usize) -> bool {
    out.free_slots() > out.pending() && out.pending() < max_in_flight
}

/// Wait until [`has_room`]: only the writer makes room (an answer arriving
/// moves a line from "in flight" to "queued" and changes nothing; below the
/// in-flight limit, the writer taking that answer is the wake-up).
async fn wait_for_room(out: &Outbound, max_in_flight: usize) {
    while !has_room(out, max_in_flight) {
        // An answer is queued before its request stops counting as in
        // flight: on a multi-threaded runtime the writer's wake-up can come
        // in between and be the last one, so look again now and then.
        let _ = tokio::time::timeout(RECHECK, out.room().notified()).await;
    }
}

/// The writer (not an `async fn`, for the reason given at [`run`]). What
/// ends it: `kill` (the client is gone or misbehaved, or the hard stop,
/// whose child it is) at once, dropping what is queued; a drained session
/// (`Outbound::finish`) once what is queued is written.
#[allow(clippy::manual_async_fn)] // see `run`: the future holds less
fn write_loop<W>(
    mut wr: W,
    mut rx: Inbox,
    kill: CancellationToken,
    bytes_out: prometheus::IntCounter,
    limits: ReplyLimits,
) -> impl std::future::Future<Output = ()> + Send
where
    W: AsyncWrite + Unpin + Send,
{
    async move {
        // Registered once for the whole session, not once per write.
        let killed = kill.cancelled();
        tokio::pin!(killed);
        loop {
            let queued = tokio::select! {
                biased;
                _ = &mut killed => break,
                // `None` also once a drained session finished the queue
                // (`Outbound::finish`) and what it held is written.
                m = rx.ready() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            if queued < WRITE_BATCH && rx.pending() > 0 {
                // Answers come in bursts (one upstream read holds many): let
                // the burst land so that it leaves in one write. With no
                // answer owed there is no burst to wait for (a wallet's one
                // request, a notification): written at once, without a
                // round of the scheduler.
                tokio::task::yield_now().await;
            }
            // The queue's own buffer, lines formatted in place: written as
            // it is, then handed to the thread's pool for the next answers
            // (an idle session holds no buffer; see `reply::queue`).
            let buf = rx.try_recv_all().bytes;
            rx.made_room();
            // Flushed too: a transport may hold written bytes back until then
            // (the WebSocket adapter; TCP and TLS write through).
            let written = tokio::select! {
                biased;
                r = async {
                    wr.write_all(&buf).await?;
                    wr.flush().await
                } => r,
                _ = &mut killed => break,
            };
            if written.is_err() {
                break;
            }
            bytes_out.inc_by(buf.len() as u64);
            limits.sent(buf.len());
            reply::recycle(buf);
        }
        // Stop the reader too (a write error means the client is gone).
        kill.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    }
}
