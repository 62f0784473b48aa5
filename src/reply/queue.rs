//! A session's bounded outbound queue: the lines [`Outbound`](super::Outbound)
//! clones push and the session's writer takes, all at once.
//!
//! Owns: the lines waiting for the writer, the bound, and the writer's
//! wake-up. It replaces a `tokio::sync::mpsc` channel for one reason: an
//! idle session must cost as little as possible, and a tokio channel keeps
//! its first block of 32 slots (about 800 bytes) plus its own shared state
//! for the session's whole life. Here an empty queue holds no allocation:
//! the writer takes the whole `VecDeque` each time (one lock per batch,
//! not one per line), leaving an empty one that allocates only when the
//! next line arrives.
//!
//! The writer learns that nothing more can come when every producer is
//! gone ([`Queue::sender_dropped`] took the count to zero) or when it
//! closed the queue itself (a drained session): then an empty take returns
//! `None`, as `mpsc::Receiver::recv` did.

use crate::jsonrpc::Line;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// What happened to a pushed line.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue holds `capacity` lines: the client is not reading.
    Full,
    /// The writer is gone or closed the queue: the line is dropped.
    Closed,
}

#[derive(Debug)]
pub struct Queue {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<Line>,
    /// The writer, when it waits for a line.
    waker: Option<Waker>,
    /// Producers (`Outbound` clones) alive.
    senders: usize,
    /// No more lines are accepted (the writer closed it, or ended).
    closed: bool,
}

impl Queue {
    /// An empty queue of at most `capacity` lines, with one producer.
    pub fn new(capacity: usize) -> Queue {
        Queue {
            capacity: capacity.max(1),
            state: Mutex::new(State {
                senders: 1,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a line and wake the writer if it waits.
    pub fn push(&self, line: Line) -> Pushed {
        let waker = {
            let mut st = self.state();
            if st.closed {
                return Pushed::Closed;
            }
            if st.lines.len() >= self.capacity {
                return Pushed::Full;
            }
            st.lines.push_back(line);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Pushed::Queued
    }

    /// Free slots (what `mpsc::Sender::capacity` told).
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.state().lines.len())
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

    /// Every queued line, or `None` once the queue is empty and nothing
    /// more can come (no producer left, or closed).
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<VecDeque<Line>>> {
        let mut st = self.state();
        if !st.lines.is_empty() {
            return Poll::Ready(Some(std::mem::take(&mut st.lines)));
        }
        if st.senders == 0 || st.closed {
            return Poll::Ready(None);
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Every queued line, without waiting (empty when there is none).
    pub fn take(&self) -> VecDeque<Line> {
        std::mem::take(&mut self.state().lines)
    }

    /// The writer ended: later pushes are dropped.
    pub fn receiver_dropped(&self) {
        let mut st = self.state();
        st.closed = true;
        st.waker = None;
        st.lines = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn lines_come_out_in_order_and_the_bound_holds() {
        let q = Queue::new(2);
        assert_eq!(q.push(b"a".to_vec()), Pushed::Queued);
        assert_eq!(q.push(b"b".to_vec()), Pushed::Queued);
        assert_eq!(q.push(b"c".to_vec()), Pushed::Full);
        assert_eq!(q.free(), 0);
        let lines = poll_fn(|cx| q.poll_take(cx)).await.unwrap();
        assert_eq!(lines, [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(q.free(), 2);
        assert!(q.take().is_empty());
    }

    #[tokio::test]
    async fn the_writer_is_woken_by_a_line_and_ends_with_the_last_sender() {
        let q = std::sync::Arc::new(Queue::new(4));
        q.sender_added();
        let taker = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(lines) = poll_fn(|cx| q.poll_take(cx)).await {
                    got.extend(lines);
                }
                got
            })
        };
        tokio::task::yield_now().await;
        q.push(b"x".to_vec());
        q.sender_dropped();
        q.push(b"y".to_vec());
        q.sender_dropped();
        assert_eq!(taker.await.unwrap(), [b"x".to_vec(), b"y".to_vec()]);
    }

    #[test]
    fn a_closed_queue_refuses_lines_but_gives_back_the_queued_ones() {
        let q = Queue::new(4);
        q.push(b"x".to_vec());
        q.close();
        assert_eq!(q.push(b"y".to_vec()), Pushed::Closed);
        assert!(q.is_closed());
        assert_eq!(q.take(), [b"x".to_vec()]);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_take(&mut cx), Poll::Ready(None));
    }
}
