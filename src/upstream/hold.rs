//! Upstreams that hold small replies back, and where a request waits least
//! on them.
//!
//! ElectrumX 2.0 writes replies through a padding transport: it pads every
//! packet it sends with spaces to at least 1 KiB (a power of two), and it
//! holds replies back while fewer than 1 KiB wait to be sent, until one
//! second has passed since the session's previous packet. A session that
//! carries a trickle of small answers therefore answers each of them up to
//! one second late; one that carries enough answers to fill 1 KiB, or that
//! has been quiet for a second, answers at once. Measured in front of
//! ElectrumX 2.0 at its defaults (issue 14), this hold, not the server's
//! cost limits, was most of electrum-lb's p99: spreading the few requests
//! that miss the cache thinly over 16 sessions made each of them wait.
//!
//! What a connection shows selection ([`HoldView`], from `shared`):
//! - whether its upstream holds (`pads`): learned from the padding itself,
//!   a reply line that ends in spaces before its closing bracket, which
//!   compact JSON never does;
//! - when it last received anything (`last_read_ms`): the upstream's last
//!   packet on it was no later than that;
//! - its recent work ([`Work`]): an estimate of the session's cost to
//!   ElectrumX, half a unit per request, decaying by one a second.
//!
//! From those, [`HoldView::state`] tells where a new request's answer would
//! go: at once (the upstream does not hold, or the connection has been
//! quiet for the hold window), into a filling buffer (requests in flight:
//! this answer joins theirs and helps fill the 1 KiB), or into a hold
//! (nothing in flight, a packet sent within the window). `select` ranks
//! them in that order and packs the filling ones, so the answers that do
//! reach the upstream travel together. Packing puts the work on fewer
//! sessions, and ElectrumX meters each session on loopback and private
//! networks (a public proxy address shares one budget per /24 anyway):
//! once a connection's estimated cost passes [`PACK_UNTIL`], half of
//! ElectrumX's soft limit, it is no longer packed and the next one fills
//! instead, so packing itself never brings a session to the sleeps.
//!
//! The window is `[server] upstream_reply_hold_ms` (1,000, ElectrumX 2.0's;
//! 0 turns this off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tokio::time::Instant;

/// Estimated session cost beyond which a connection is no longer packed:
/// half of ElectrumX's default `COST_SOFT_LIMIT` (1,000), past which it
/// sleeps before each request.
pub const PACK_UNTIL: u32 = 500;
/// Cost counted per request, in thousandths: ElectrumX charges a history,
/// balance or header read 0.1 to 1, plus its bytes (1 KiB costs 0.2); it
/// measured 0.4 a read in the real bench.
const COST_PER_REQUEST_MILLI: u64 = 500;

/// Where a new request's answer would go on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Sent as soon as it is ready: the upstream does not hold replies, or
    /// this connection has been quiet for the hold window.
    None,
    /// Joins answers in flight on a connection that holds: the buffer they
    /// fill together goes out once it reaches the upstream's packet size.
    Filling,
    /// Waits out the hold: nothing else is in flight and the upstream sent
    /// a packet on this connection within the window.
    Held,
}

/// Milliseconds since the first call (a process-wide epoch), on tokio's
/// clock.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] for an instant already read.
pub fn ms_at(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_millis() as u64
}

/// Whether a reply line carries padding: spaces right before its closing
/// bracket (at least two, so a lone space from a pretty printer does not
/// count).
pub fn padded(line: &[u8]) -> bool {
    matches!(line, [.., b' ', b' ', b'}' | b']'])
}

/// What selection reads about one connection's hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldView {
    /// The upstream pads (and so holds) its replies.
    pub pads: bool,
    /// [`now_ms`] when the connection last received anything.
    pub last_read_ms: u64,
    pub in_flight: usize,
    /// The hold window in milliseconds (0: ignore holds).
    pub window_ms: u64,
}

impl HoldView {
    pub fn state(&self, now_ms: u64) -> Hold {
        if !self.pads || self.window_ms == 0 {
            return Hold::None;
        }
        if self.in_flight > 0 {
            return Hold::Filling;
        }
        if now_ms.saturating_sub(self.last_read_ms) >= self.window_ms {
            Hold::None
        } else {
            Hold::Held
        }
    }
}

/// A connection's estimated cost to the upstream: each request adds half a
/// unit, and the estimate decays by one unit per second, as ElectrumX
/// decays a session's cost. One atomic word: the upper 32 bits are the
/// time of the last change in [`now_ms`] (wrapping), the lower 32 the
/// estimate in thousandths.
#[derive(Debug, Default)]
pub struct Work(AtomicU64);

impl Work {
    /// The estimate at `now_ms`, in whole units.
    pub fn at(&self, now_ms: u64) -> u32 {
        (decayed(self.0.load(Ordering::Relaxed), now_ms) / 1000) as u32
    }

    /// Count one request sent at `now_ms`.
    pub fn add(&self, now_ms: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let milli = decayed(word, now_ms)
                    .saturating_add(COST_PER_REQUEST_MILLI)
                    .min(u32::MAX as u64);
                Some(((now_ms & 0xffff_ffff) << 32) | milli)
            });
    }
}

/// The count (thousandths) held in `word`, decayed to `now_ms`: one
/// thousandth per millisecond.
fn decayed(word: u64, now_ms: u64) -> u64 {
    let at = (word >> 32) as u32;
    let milli = word & 0xffff_ffff;
    let elapsed = (now_ms as u32).wrapping_sub(at) as u64;
    milli.saturating_sub(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_spaces_before_the_closing_bracket() {
        assert!(padded(b"{\"id\":3,\"result\":1     }"));
        assert!(padded(b"[{\"id\":3,\"result\":1}   ]"));
        assert!(!padded(b"{\"id\":3,\"result\":1}"));
        assert!(!padded(b"{ \"id\": 3, \"result\": 1 }"));
        assert!(!padded(b"}"));
    }

    #[test]
    fn where_an_answer_would_go() {
        let view = |pads, last_read_ms, in_flight| HoldView {
            pads,
            last_read_ms,
            in_flight,
            window_ms: 1000,
        };
        // An upstream that does not pad never holds.
        assert_eq!(view(false, 5_000, 0).state(5_100), Hold::None);
        // Sent a packet 100 ms ago, nothing in flight: the answer waits.
        assert_eq!(view(true, 5_000, 0).state(5_100), Hold::Held);
        // Quiet for the window: at once.
        assert_eq!(view(true, 5_000, 0).state(6_000), Hold::None);
        // Answers in flight: this one joins them.
        assert_eq!(view(true, 5_000, 3).state(5_100), Hold::Filling);
        // Window 0: holds ignored.
        let off = HoldView {
            window_ms: 0,
            ..view(true, 5_000, 0)
        };
        assert_eq!(off.state(5_100), Hold::None);
    }

    #[test]
    fn work_counts_half_a_unit_a_request_and_decays_one_a_second() {
        let w = Work::default();
        for _ in 0..20 {
            w.add(1_000);
        }
        assert_eq!(w.at(1_000), 10);
        assert_eq!(w.at(3_000), 8);
        w.add(3_000);
        w.add(3_000);
        assert_eq!(w.at(3_000), 9);
        assert_eq!(w.at(20_000), 0);
        // The clock's low 32 bits wrap; the decay still reads the gap.
        let w = Work::default();
        let near_wrap = (1u64 << 32) - 500;
        for _ in 0..4 {
            w.add(near_wrap);
        }
        assert_eq!(w.at(near_wrap + 1_000), 1);
    }
}
