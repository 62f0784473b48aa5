//! One generation of a coin's pool: its upstreams, their connection slots,
//! and dispatch.
//!
//! Owns: the data every part of the pool reads (`pool` builds it and hands
//! out the public handle, `supervisor` redispatches into it, `monitor`
//! judges it), choosing a slot for each job via `select`, and growing an
//! upstream's connections when requests queue in the proxy.
//!
//! Growth: a job that finds its connection at its learned in-flight limit,
//! once that limit is settled (see `limit`: answers queue upstream, so
//! requests now wait in the proxy), wakes a dormant slot of
//! that upstream, or of another upstream in rotation that is not throttled
//! when that one is (more sessions do not buy budget from a server that
//! meters us). Never beyond `max_connections`, and never more upstream
//! connections for the coin in total than it has client sessions (HAProxy
//! would open one per client connection), except the ones always kept
//! (`min_connections`, protocol connections). Shrinking is `monitor`'s.

use super::conn::ConnShared;
use super::connect::Dialer;
use super::health::{Health, HealthRules};
use super::throttle::Throttle;
use super::{hold, select, ConnId, Job, PoolEvent};
use crate::config::UpstreamEntry;
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::status::events::CoinEvents;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How a generation's supervisors dial and keep connections (from `[server]`).
#[derive(Clone)]
pub struct SupervisorSettings {
    pub client_name: String,
    pub protocol: String,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    pub stall_after: Duration,
    pub idle_close: Duration,
    /// Longest delay between two dial attempts (`upstream_reconnect_max_ms`).
    pub reconnect_max: Duration,
    /// How long an upstream that pads holds small replies
    /// (`upstream_reply_hold_ms`; zero: holds are not considered).
    pub reply_hold: Duration,
}

/// One upstream server and its rotation state.
pub(super) struct Upstream {
    pub entry: UpstreamEntry,
    pub label: String,
    pub healthy: AtomicBool,
    pub health: Mutex<Health>,
    pub throttle: Arc<Throttle>,
}

/// One connection slot.
pub(super) struct Slot {
    pub upstream: usize,
    pub dialer: Dialer,
    pub tx: mpsc::Sender<Job>,
    pub shared: Arc<ConnShared>,
    /// The upstream's protocol slot (see `pool`): never grown into.
    pub top: bool,
    /// Beyond `min_connections`: opened on demand, closed when not needed.
    pub elastic: bool,
}

pub(super) struct PoolInner {
    pub coin: String,
    pub upstreams: Vec<Upstream>,
    pub slots: Vec<Slot>,
    pub events: mpsc::UnboundedSender<PoolEvent>,
    pub settings: SupervisorSettings,
    /// Stops this generation's supervisors and monitor.
    pub stop: CancellationToken,
    /// The rules the monitor judges health by (the status page judges lag
    /// by the same ones).
    pub rules: HealthRules,
    /// Health flips, throttling and connection failures are recorded here.
    pub journal: CoinEvents,
    /// The coin's metrics, whose session gauges count its client sessions
    /// (`None` in unit tests: no cap on connections then).
    pub clients: Option<Arc<crate::metrics::CoinMetrics>>,
}

/// The current generation of a pool; replaced whole on reload.
pub(super) type Cell = ArcSwap<PoolInner>;

impl PoolInner {
    /// Client sessions of the coin right now (`None`: not counted).
    pub fn client_sessions(&self) -> Option<usize> {
        let m = self.clients.as_ref()?;
        let n: i64 = m.sessions_by_level.iter().map(|g| g.get()).sum();
        Some(n.max(0) as usize)
    }

    /// Slots kept open or opening.
    pub fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.shared.is_active()).count()
    }

    /// Whether one more connection stays within the client-session cap.
    /// Retired connections still closing count: they are sessions the
    /// upstream sees until they are gone.
    fn may_open_another(&self) -> bool {
        let Some(clients) = self.client_sessions() else {
            return true;
        };
        let open = self
            .slots
            .iter()
            .filter(|s| s.shared.is_active() || s.shared.is_ready())
            .count();
        open < clients
    }

    pub(super) fn candidates(&self) -> Vec<select::Candidate> {
        let window = self.settings.reply_hold.as_millis() as u64;
        let mut now = None;
        self.slots
            .iter()
            .map(|s| {
                let u = &self.upstreams[s.upstream];
                // The clock is read only when some upstream holds.
                let (hold, work) = if window > 0 && s.shared.pads() {
                    let t = *now.get_or_insert_with(hold::now_ms);
                    (s.shared.hold_view(window).state(t), s.shared.work.at(t))
                } else {
                    (hold::Hold::None, 0)
                };
                select::Candidate {
                    ready: s.shared.is_ready() && s.shared.is_active(),
                    healthy: u.healthy.load(Ordering::Acquire),
                    in_flight: s.shared.in_flight(),
                    limit: s.shared.limit(),
                    rtt_us: s.shared.rtt_us.load(Ordering::Relaxed),
                    weight: u.entry.weight,
                    backup: u.entry.backup,
                    throttled: u.throttle.is_throttled(),
                    upstream: s.upstream,
                    pads: window > 0 && s.shared.pads(),
                    hold,
                    work,
                }
            })
            .collect()
    }

    pub(super) fn slot_of(&self, conn: ConnId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.shared.is_ready() && s.shared.conn_id() == conn)
    }

    pub(super) fn dispatch(&self, job: Job) {
        match select::pick(&self.capable_candidates(job.need), job.last_conn) {
            Some(index) => self.send_to(index, job),
            None if job.need.is_any() || !self.slots.iter().any(|s| s.shared.is_ready()) => {
                job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamUnavailable,
                    format!("no upstream server available for {}", self.coin),
                ))
            }
            None => {
                let need = job.need;
                job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamUnavailable,
                    format!(
                        "no upstream connection of {} speaks {need} right now",
                        self.coin
                    ),
                ))
            }
        }
    }

    pub(super) fn send_to(&self, index: usize, mut job: Job) {
        let slot = &self.slots[index];
        job.last_conn = Some(index);
        let load = slot.shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        if slot.shared.pads() {
            slot.shared.work.add(hold::now_ms());
        }
        if load > slot.shared.limit() && slot.shared.settled() {
            self.grow(slot.upstream);
        }
        match slot.tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                slot.shared.release();
                job.responder.fail(RpcError::new(
                    ErrorCode::LimitExceeded,
                    "upstream queue full: try again later",
                ));
            }
            Err(mpsc::error::TrySendError::Closed(job)) => {
                slot.shared.release();
                job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamUnavailable,
                    "upstream connection closed",
                ));
            }
        }
    }

    /// Requests queue in the proxy on `upstream`'s connections: wake a
    /// dormant slot of it or, when it throttles us, of another upstream
    /// in rotation that does not (see the module doc).
    fn grow(&self, upstream: usize) {
        if !self.may_open_another() {
            return;
        }
        let target = if self.upstreams[upstream].throttle.is_throttled() {
            let same_tier = self.upstreams[upstream].entry.backup;
            let other = self.upstreams.iter().position(|u| {
                u.entry.backup == same_tier
                    && u.healthy.load(Ordering::Acquire)
                    && !u.throttle.is_throttled()
            });
            match other {
                Some(o) => o,
                None => return,
            }
        } else {
            upstream
        };
        let dormant = self
            .slots
            .iter()
            .find(|s| s.upstream == target && s.elastic && !s.shared.is_active());
        if let Some(s) = dormant {
            if !s.shared.active.swap(true, Ordering::AcqRel) {
                tracing::debug!(coin = %self.coin, upstream = %self.upstreams[target].label, "opening another connection: requests are queueing");
                s.shared.wake.notify_one();
            }
        }
    }
}
