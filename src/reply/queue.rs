//! A session's bounded outbound queue: the replies [`Outbound`](super::Outbound)
//! clones queue and the session's writer takes, all at once.
//!
//! Owns: the bytes waiting for the writer (each reply a line, newline
//! included, ready to write), how many lines they are, the bound (in
//! lines), the reply size limit, and the writer's wake-up. Replies are
//! written straight into one byte buffer: an answer costs no allocation of
//! its own (it is formatted in place by [`Queue::push_with`]), no list of
//! lines, and no copy into a write buffer; the writer takes the buffer as
//! it is and writes it. It replaces a `tokio::sync::mpsc` channel also
//! because an idle session must cost as little as possible: an empty
//! queue holds no allocation (the writer took the buffer, and hands it to
//! the pool below once written).
//!
//! A buffer the writer has written goes back to a small pool kept per
//! thread ([`recycle`]), and the next answer queued on that thread into an
//! empty queue takes its buffer from there: a busy session costs no
//! `malloc` and `free` of its buffer per write (about 1,000 instructions a
//! write, a 4 KiB block being past glibc's per-thread cache), and an idle
//! session still holds none.
//!
//! The writer learns that nothing more can come when every producer is
//! gone ([`Queue::sender_dropped`] took the count to zero) or when it
//! closed the queue itself (a drained session): then an empty take returns
//! `None`, as `mpsc::Receiver::recv` did.

use crate::limits::ReplyLimits;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// What an empty queue allocates when an answer comes: a few answers'
/// worth, so that the lines of a burst after the first do not grow it
/// (each growth a copy). Held only until the writer has written it.
const FIRST_ROOM: usize = 4096;

/// Buffers kept per thread for the next answers ([`recycle`]): enough for
/// the sessions one upstream read answers at once; past that they are
/// freed.
const POOL: usize = 32;

/// Buffers grown past this are freed, not kept (a pool of large buffers
/// would hold memory that few answers need).
const POOL_LARGEST: usize = 4 * FIRST_ROOM;

thread_local! {
    static BUFFERS: std::cell::Cell<Vec<Vec<u8>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A buffer for the first answer queued into an empty queue: from this
/// thread's pool, or a new one of [`FIRST_ROOM`] bytes.
fn buffer() -> Vec<u8> {
    let mut pool = BUFFERS.take();
    let buf = pool.pop();
    BUFFERS.set(pool);
    buf.unwrap_or_else(|| Vec::with_capacity(FIRST_ROOM))
}

/// A buffer the writer has written: kept in this thread's pool for the
/// next answers if it is an answers' buffer and the pool has room, freed
/// otherwise.
pub fn recycle(mut buf: Vec<u8>) {
    if !(FIRST_ROOM..=POOL_LARGEST).contains(&buf.capacity()) {
        return;
    }
    let mut pool = BUFFERS.take();
    if pool.len() < POOL {
        buf.clear();
        pool.push(buf);
    }
    BUFFERS.set(pool);
}

/// What happened to a pushed line.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue holds `capacity` lines: the client is not reading.
    Full,
    /// The writer is gone or closed the queue: the line is dropped.
    Closed,
}

/// What the writer takes: lines, each with its newline.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub bytes: Vec<u8>,
    pub lines: usize,
}

#[derive(Debug)]
pub struct Queue {
    capacity: usize,
    /// Replies larger than the limit are replaced as they are queued
    /// (none in unit tests).
    limits: Option<ReplyLimits>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    bytes: Vec<u8>,
    /// Lines in `bytes`.
    lines: usize,
    /// The writer, when it waits for a line.
    waker: Option<Waker>,
    /// Producers (`Outbound` clones) alive.
    senders: usize,
    /// No more lines are accepted (the writer closed it, or ended).
    closed: bool,
}

impl Queue {
    /// An empty queue of at most `capacity` lines, with one producer;
    /// replies over the size in `limits` are replaced by errors.
    pub fn new(capacity: usize, limits: Option<ReplyLimits>) -> Queue {
        Queue {
            capacity: capacity.max(1),
            limits,
            state: Mutex::new(State {
                senders: 1,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a line (without its newline) and wake the writer if it waits.
    /// Into an empty queue it takes only its own room: a notification
    /// fanned out to many idle sessions costs each its size, no more.
    pub fn push(&self, line: &[u8]) -> Pushed {
        self.push_in(Some(line.len() + 1), |buf| buf.extend_from_slice(line))
    }

    /// Queue the line `write` appends to the buffer (without its newline),
    /// formatted in place, and wake the writer if it waits. `write` runs
    /// under the queue's lock: it must only format.
    pub fn push_with(&self, write: impl FnOnce(&mut Vec<u8>)) -> Pushed {
        self.push_in(None, write)
    }

    /// [`Queue::push_with`]; an empty queue takes `room` bytes, or with
    /// `None` a pooled buffer (see [`recycle`]).
    fn push_in(&self, room: Option<usize>, write: impl FnOnce(&mut Vec<u8>)) -> Pushed {
        let waker = {
            let mut st = self.state();
            if st.closed {
                return Pushed::Closed;
            }
            if st.lines >= self.capacity {
                return Pushed::Full;
            }
            let start = st.bytes.len();
            if st.bytes.capacity() == 0 {
                match room {
                    Some(room) => st.bytes.reserve(room),
                    None => st.bytes = buffer(),
                }
            }
            write(&mut st.bytes);
            if let Some(limits) = &self.limits {
                if let Some(instead) = limits.oversized(&st.bytes[start..]) {
                    st.bytes.truncate(start);
                    match instead {
                        Some(line) => st.bytes.extend_from_slice(&line),
                        // A notification too large to relay: nothing.
                        None => return Pushed::Queued,
                    }
                }
            }
            st.bytes.push(b'\n');
            st.lines += 1;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Pushed::Queued
    }

    /// Free slots (what `mpsc::Sender::capacity` told).
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.state().lines)
    }

    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Refuse further lines; those queued can still be taken, and the
    /// writer, if it waits, wakes to take them (or to learn that none come).
    pub fn close(&self) {
        let waker = {
            let mut st = self.state();
            st.closed = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn sender_added(&self) {
        self.state().senders += 1;
    }

    /// A producer is gone; the last one wakes the writer so that it ends.
    pub fn sender_dropped(&self) {
        let waker = {
            let mut st = self.state();
            st.senders -= 1;
            if st.senders > 0 {
                return;
            }
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Wait until something is queued: `Some(bytes queued)`, or `None`
    /// once the queue is empty and nothing more can come (no producer
    /// left, or closed). Takes nothing: [`Queue::take`] does.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Option<usize>> {
        let mut st = self.state();
        if st.lines > 0 {
            return Poll::Ready(Some(st.bytes.len()));
        }
        if st.senders == 0 || st.closed {
            return Poll::Ready(None);
        }
        wait(&mut st, cx)
    }

    /// Every queued line, without waiting (empty when there is none).
    pub fn take(&self) -> Taken {
        take(&mut self.state())
    }

    /// The writer ended: later pushes are dropped.
    pub fn receiver_dropped(&self) {
        let mut st = self.state();
        st.closed = true;
        st.waker = None;
        st.bytes = Vec::new();
        st.lines = 0;
    }
}

/// The queue is empty: the writer waits to be woken.
fn wait<T>(st: &mut State, cx: &mut Context<'_>) -> Poll<T> {
    if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        st.waker = Some(cx.waker().clone());
    }
    Poll::Pending
}

fn take(st: &mut State) -> Taken {
    Taken {
        bytes: std::mem::take(&mut st.bytes),
        lines: std::mem::take(&mut st.lines),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    fn taken(text: &str, lines: usize) -> Taken {
        Taken {
            bytes: text.as_bytes().to_vec(),
            lines,
        }
    }

    #[tokio::test]
    async fn lines_come_out_in_order_and_the_bound_holds() {
        let q = Queue::new(2, None);
        assert_eq!(q.push(b"a"), Pushed::Queued);
        assert_eq!(q.push_with(|b| b.extend_from_slice(b"bc")), Pushed::Queued);
        assert_eq!(q.push(b"c"), Pushed::Full);
        assert_eq!(q.free(), 0);
        assert_eq!(poll_fn(|cx| q.poll_ready(cx)).await, Some(5));
        assert_eq!(q.take(), taken("a\nbc\n", 2));
        assert_eq!(q.free(), 2);
        assert_eq!(q.take(), Taken::default());
    }

    #[test]
    fn a_notification_takes_its_own_room_an_answer_room_for_a_burst() {
        let q = Queue::new(4, None);
        q.push(b"{\"method\":\"x\"}");
        assert!(q.take().bytes.capacity() < 64);
        q.push_with(|b| b.extend_from_slice(b"{\"result\":1}"));
        assert!(q.take().bytes.capacity() >= FIRST_ROOM);
    }

    #[test]
    fn written_buffers_are_reused_from_the_threads_pool() {
        let q = Queue::new(8, None);
        q.push_with(|b| b.extend_from_slice(b"{\"result\":1}"));
        let first = q.take().bytes;
        let at = first.as_ptr();
        recycle(first);
        q.push_with(|b| b.extend_from_slice(b"{\"result\":2}"));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_ready(&mut cx), Poll::Ready(Some(13)));
        let second = q.take();
        assert_eq!(second, taken("{\"result\":2}\n", 1));
        assert_eq!(second.bytes.as_ptr(), at, "the same buffer");
        assert_eq!(q.poll_ready(&mut cx), Poll::Pending);
        // A notification's own small buffer and a grown one are not kept.
        recycle(second.bytes);
        recycle(vec![0; 8]);
        recycle(Vec::with_capacity(POOL_LARGEST + 1));
        assert_eq!(BUFFERS.take().len(), 1);
        // The pool is bounded.
        for _ in 0..POOL + 5 {
            recycle(Vec::with_capacity(FIRST_ROOM));
        }
        assert_eq!(BUFFERS.take().len(), POOL);
    }

    #[tokio::test]
    async fn the_writer_is_woken_by_a_line_and_ends_with_the_last_sender() {
        let q = std::sync::Arc::new(Queue::new(4, None));
        q.sender_added();
        let taker = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while poll_fn(|cx| q.poll_ready(cx)).await.is_some() {
                    got.extend(q.take().bytes);
                }
                got
            })
        };
        tokio::task::yield_now().await;
        q.push(b"x");
        q.sender_dropped();
        q.push(b"y");
        q.sender_dropped();
        assert_eq!(taker.await.unwrap(), b"x\ny\n");
    }

    #[test]
    fn a_closed_queue_refuses_lines_but_gives_back_the_queued_ones() {
        let q = Queue::new(4, None);
        q.push(b"x");
        q.close();
        assert_eq!(q.push(b"y"), Pushed::Closed);
        assert!(q.is_closed());
        assert_eq!(q.take(), taken("x\n", 1));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_ready(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_reply_over_the_size_limit_is_replaced_where_it_was_queued() {
        let limits = ReplyLimits::capped(60);
        let q = Queue::new(8, Some(limits));
        q.push(b"{\"id\":1,\"result\":\"small\"}");
        let big = crate::jsonrpc::result_line("7", &format!("\"{}\"", "x".repeat(100)));
        q.push_with(|b| b.extend_from_slice(&big));
        // A notification that large is dropped: nobody waits for it.
        let note = crate::jsonrpc::notification_line("m", &format!("[\"{}\"]", "y".repeat(100)));
        q.push(&note);
        q.push(b"{\"id\":2,\"result\":0}");
        let t = q.take();
        assert_eq!(t.lines, 3);
        let text = String::from_utf8(t.bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "{\"id\":1,\"result\":\"small\"}");
        assert!(
            lines[1].contains("\"error\"") && lines[1].ends_with("\"id\":7}"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2], "{\"id\":2,\"result\":0}");
        assert!(text.ends_with('\n'));
    }
}
