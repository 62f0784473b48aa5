//! What one connection slot shares between its actor (`conn`), its
//! supervisor and the pool's selection: readiness, load, the learned
//! in-flight limit, answer times, whether and when the upstream holds its
//! replies (`hold`), and what the upstream said about itself.
//!
//! Owns: these atomics and their meaning; nothing here decides anything.

use super::hold::{HoldView, Work};
use super::throttle::Throttle;
use crate::protocol::Version;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// State of a connection shared with the pool's selection.
#[derive(Debug)]
pub struct ConnShared {
    /// Changes each time the connection is re-established, so subscriptions
    /// know when the connection they were made on is gone.
    pub id: AtomicU64,
    /// Handshake done and socket alive.
    pub ready: AtomicBool,
    /// Jobs dispatched to this connection and not yet resolved (queued or
    /// written).
    pub in_flight: AtomicUsize,
    /// The upstream's `max_in_flight`: the ceiling of [`ConnShared::limit`].
    pub ceiling: usize,
    /// Requests the connection writes before the rest wait in its queue,
    /// learned from answer times (see `limit`).
    pub limit: AtomicUsize,
    /// [`super::limit::Limiter::settled`], for the pool's growth.
    pub settled: AtomicBool,
    /// Recent answer time in microseconds (a peak-sensitive moving
    /// average; 0 while unknown): selection's cost of a request here.
    pub rtt_us: AtomicU64,
    /// The unqueued answer time the limiter measured (µs; 0: unknown).
    pub base_us: AtomicU64,
    /// Answers received since the slot was made (the monitor compares).
    pub answered: AtomicU64,
    /// What the upstream reported in its handshake.
    pub info: Mutex<UpstreamInfo>,
    /// The upstream's tip height as this connection last heard it (0: unknown).
    pub tip: AtomicU64,
    /// Whether the supervisor keeps this slot connected (slots beyond an
    /// upstream's `min_connections` open on demand and close when idle or
    /// retired by the monitor). Selection skips slots that are not active.
    pub active: AtomicBool,
    /// Wakes a dormant slot's supervisor.
    pub wake: tokio::sync::Notify,
    /// The protocol level this connection negotiated (`Version::to_u32`;
    /// 0 while unknown).
    pub level: AtomicU32,
    /// The slot of the same upstream that asks for the highest protocol
    /// (see `pool`): woken when this connection learns that the upstream
    /// offers more than this connection negotiated.
    pub upgrade: OnceLock<Arc<ConnShared>>,
    /// The upstream's throttle state (shared by its slots).
    pub throttle: Arc<Throttle>,
    /// The upstream pads its replies, and so holds small ones (see `hold`).
    pub pads: AtomicBool,
    /// `hold::now_ms` when this connection last received anything.
    pub last_read_ms: AtomicU64,
    /// Requests sent here recently (see `hold::Work`): kept only for
    /// connections whose upstream pads.
    pub work: Work,
}

/// What an upstream told us about itself.
#[derive(Debug, Clone, Default)]
pub struct UpstreamInfo {
    pub server_version: Option<String>,
    pub protocol: Option<String>,
    /// `server.features` `protocol_max`: the highest level the upstream offers.
    pub protocol_max: Option<String>,
    pub genesis_hash: Option<String>,
}

impl ConnShared {
    pub fn new(max_in_flight: usize, throttle: Arc<Throttle>) -> Self {
        let ceiling = max_in_flight.max(1);
        Self {
            id: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            ceiling,
            limit: AtomicUsize::new(super::limit::INITIAL.min(ceiling)),
            settled: AtomicBool::new(super::limit::INITIAL >= ceiling),
            rtt_us: AtomicU64::new(0),
            base_us: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            info: Mutex::new(UpstreamInfo::default()),
            tip: AtomicU64::new(0),
            active: AtomicBool::new(true),
            wake: tokio::sync::Notify::new(),
            level: AtomicU32::new(0),
            upgrade: OnceLock::new(),
            throttle,
            pads: AtomicBool::new(false),
            last_read_ms: AtomicU64::new(0),
            work: Work::default(),
        }
    }

    /// The protocol level negotiated on this connection.
    pub fn level(&self) -> Version {
        Version::from_u32(self.level.load(Ordering::Acquire))
    }

    pub fn tip(&self) -> u64 {
        self.tip.load(Ordering::Relaxed)
    }

    pub fn conn_id(&self) -> super::ConnId {
        super::ConnId(self.id.load(Ordering::Acquire))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Whether the learned limit is where answers queue (see `limit`):
    /// only then do requests beyond it call for another connection.
    pub fn settled(&self) -> bool {
        self.settled.load(Ordering::Relaxed)
    }

    /// Whether the upstream pads (and holds) its replies.
    pub fn pads(&self) -> bool {
        self.pads.load(Ordering::Relaxed)
    }

    /// What selection needs to know about this connection's reply hold,
    /// with the pool's window (ms).
    pub fn hold_view(&self, window_ms: u64) -> HoldView {
        HoldView {
            pads: self.pads(),
            last_read_ms: self.last_read_ms.load(Ordering::Relaxed),
            in_flight: self.in_flight(),
            window_ms,
        }
    }

    pub fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Record one answer's time: a moving average that jumps up at once
    /// (a slowing upstream is seen on its first slow answer) and comes
    /// down by a tenth of the difference per answer.
    pub fn observe_rtt(&self, rtt: Duration) {
        let sample = (rtt.as_micros() as u64).max(1);
        let old = self.rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 || sample >= old {
            sample
        } else {
            old - (old - sample) / 10
        };
        self.rtt_us.store(new, Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_time_jumps_up_and_decays_down() {
        let t = Arc::new(Throttle::new("c", "u", None, Default::default()));
        let s = ConnShared::new(256, t);
        assert_eq!(s.limit(), 10);
        s.observe_rtt(Duration::from_millis(1));
        assert_eq!(s.rtt_us.load(Ordering::Relaxed), 1000);
        s.observe_rtt(Duration::from_millis(100));
        assert_eq!(s.rtt_us.load(Ordering::Relaxed), 100_000);
        s.observe_rtt(Duration::from_millis(0));
        assert_eq!(s.rtt_us.load(Ordering::Relaxed), 90_001);
        assert_eq!(s.answered.load(Ordering::Relaxed), 3);
    }
}
