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
//! (`min_connections`, protocol connections). Within that cap each
//! upstream in rotation has a share by weight (`share`): an upstream at
//! its share does not grow, and one below it whose requests queue while
//! the cap is reached has an extra connection of an upstream above its
//! share retired to make room, one at a time. Shrinking is `monitor`'s.

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
    /// The runtime its supervisor and connection run on (`cores`).
    pub core: usize,
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

/// What selection chooses among: the candidates, and the slot each one is.
pub(super) struct Offer {
    pub candidates: Vec<select::Candidate>,
    pub slots: Vec<usize>,
}

impl Offer {
    pub const fn new() -> Offer {
        Offer {
            candidates: Vec::new(),
            slots: Vec::new(),
        }
    }

    /// The slot selection picks, never `skip` (a slot index).
    pub fn pick(&self, skip: Option<usize>) -> Option<usize> {
        let skip = skip.and_then(|slot| self.slots.iter().position(|&s| s == slot));
        select::pick(&self.candidates, skip).map(|i| self.slots[i])
    }
}

impl PoolInner {
    /// Client sessions of the coin right now (`None`: not counted).
    pub fn client_sessions(&self) -> Option<usize> {
        let m = self.clients.as_ref()?;
        let n: i64 = m.sessions_by_level.iter().map(|g| g.get()).sum();
        Some(n.max(0) as usize)
    }

    /// Connections counted against the client-session cap and kept (not
    /// retired): what the monitor trims to the cap. Counted as `open_on`
    /// counts them, so that a connection `grow` opened within the cap is
    /// never over it for the monitor (a down upstream's unconnected slot
    /// counted by one and not the other had them open and close one
    /// connection at every check).
    pub fn kept_open(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.shared.is_active() && self.counted(s))
            .count()
    }

    /// The slots that can take a job of `need` now (connected, kept open,
    /// at a level that answers it), as selection's candidates, into `out`.
    /// The others are left out: most slots of a pool are dormant, and
    /// every request is dispatched.
    pub(super) fn offer_into(&self, need: select::Need, out: &mut Offer) {
        let window = self.settings.reply_hold.as_millis() as u64;
        let mut now = None;
        out.candidates.clear();
        out.slots.clear();
        for (index, s) in self.slots.iter().enumerate() {
            if !(s.shared.is_ready() && s.shared.is_active()) {
                continue;
            }
            if !need.is_any() && !select::capable(s.shared.level(), need) {
                continue;
            }
            let u = &self.upstreams[s.upstream];
            // The clock is read only when some upstream holds.
            let pads = window > 0 && s.shared.pads();
            let (hold, work) = if pads {
                let t = *now.get_or_insert_with(hold::now_ms);
                (s.shared.hold_view(window).state(t), s.shared.work.at(t))
            } else {
                (hold::Hold::None, 0)
            };
            out.candidates.push(select::Candidate {
                ready: true,
                healthy: u.healthy.load(Ordering::Acquire),
                in_flight: s.shared.in_flight(),
                limit: s.shared.limit(),
                rtt_us: s.shared.rtt_us.load(Ordering::Relaxed),
                weight: u.entry.weight,
                backup: u.entry.backup,
                throttled: u.throttle.is_throttled(),
                upstream: s.upstream,
                pads,
                hold,
                work,
            });
            out.slots.push(index);
        }
    }

    pub(super) fn slot_of(&self, conn: ConnId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.shared.is_ready() && s.shared.conn_id() == conn)
    }

    pub(super) fn dispatch(&self, job: Job) {
        // Every request is dispatched: the candidates are gathered into a
        // buffer kept per thread rather than a new one each time.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Offer> = const { std::cell::RefCell::new(Offer::new()) };
        }
        let pick = |offer: &mut Offer| {
            self.offer_into(job.need, offer);
            offer.pick(job.last_conn)
        };
        let chosen = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut offer) => pick(&mut offer),
            // Not reentered today (nothing here dispatches); if it ever is,
            // a buffer of its own.
            Err(_) => pick(&mut Offer::new()),
        });
        match chosen {
            Some(index) => {
                let index = self.on_this_core(index, job.need, job.last_conn);
                self.send_to(index, job)
            }
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

    /// `--per-core` (see `cores`): selection chose slot `index`; a ready
    /// connection of the same upstream on the caller's runtime with room
    /// takes the job instead, so that it stays on this thread. Selection
    /// still decides the upstream (health, tier, throttling, cost); only
    /// the connection within it changes.
    fn on_this_core(&self, index: usize, need: select::Need, skip: Option<usize>) -> usize {
        if crate::cores::count() == 1 {
            return index;
        }
        let here = crate::cores::current();
        let chosen = &self.slots[index];
        // Where the upstream pads, selection packs requests on chosen
        // connections on purpose (see `hold`): left as chosen.
        if chosen.core == here || chosen.shared.pads() {
            return index;
        }
        self.slots
            .iter()
            .enumerate()
            .position(|(i, s)| {
                s.core == here
                    && s.upstream == chosen.upstream
                    && Some(i) != skip
                    && s.shared.is_ready()
                    && s.shared.is_active()
                    && (need.is_any() || select::capable(s.shared.level(), need))
                    && s.shared.in_flight() < s.shared.limit()
            })
            .unwrap_or(index)
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
        if let Some(clients) = self.client_sessions() {
            if self.open_on(Some(target)) >= self.share(target, clients) {
                return;
            }
            if self.open_on(None) >= clients {
                self.make_room(clients);
                return;
            }
        }
        // One of the caller's runtime first (`--per-core`, see `cores`).
        let here = crate::cores::current();
        let dormant = |s: &&Slot| s.upstream == target && s.elastic && !s.shared.is_active();
        let dormant = self
            .slots
            .iter()
            .filter(dormant)
            .find(|s| s.core == here)
            .or_else(|| self.slots.iter().find(dormant));
        if let Some(s) = dormant {
            if !s.shared.active.swap(true, Ordering::AcqRel) {
                tracing::debug!(coin = %self.coin, upstream = %self.upstreams[target].label, "opening another connection: requests are queueing");
                s.shared.wake.notify_one();
            }
        }
    }

    /// Connections the upstreams see from us (of `upstream`, or of all):
    /// connected ones, retired ones still closing among them, and ones
    /// opening to an upstream in rotation. The slots of an upstream out of
    /// rotation that are not connected are no session of anyone's: they do
    /// not keep the others from growing (when it comes back, the monitor
    /// retires what is then over the cap).
    fn open_on(&self, upstream: Option<usize>) -> usize {
        self.slots
            .iter()
            .filter(|s| upstream.is_none_or(|u| s.upstream == u) && self.counted(s))
            .count()
    }

    /// Whether `slot` is a session some upstream sees (see `open_on`).
    fn counted(&self, slot: &Slot) -> bool {
        slot.shared.is_ready()
            || (slot.shared.is_active()
                && self.upstreams[slot.upstream]
                    .healthy
                    .load(Ordering::Acquire))
    }

    /// `upstream`'s share of the client-session cap: the cap split by
    /// weight among the upstreams of its tier in rotation that do not
    /// throttle us (itself always counted), rounded up. So one upstream
    /// that grew first cannot hold the whole cap while another one's
    /// requests queue: with two equal upstreams, half each, as HAProxy
    /// balancing the same wallets would give them.
    fn share(&self, upstream: usize, clients: usize) -> usize {
        let tier = self.upstreams[upstream].entry.backup;
        let total: u64 = self
            .upstreams
            .iter()
            .enumerate()
            .filter(|(i, u)| {
                *i == upstream
                    || (u.entry.backup == tier
                        && u.healthy.load(Ordering::Acquire)
                        && !u.throttle.is_throttled())
            })
            .map(|(_, u)| u64::from(u.entry.weight.max(1)))
            .sum();
        let mine = u64::from(self.upstreams[upstream].entry.weight.max(1));
        ((clients as u64 * mine).div_ceil(total) as usize).max(1)
    }

    /// The cap is reached while an upstream below its share needs another
    /// connection: retire one extra connection of an upstream above its
    /// share, so the next request that queues can open one. One at a time:
    /// nothing is retired while a retired connection is still closing.
    fn make_room(&self, clients: usize) {
        let closing = self
            .slots
            .iter()
            .any(|s| !s.shared.is_active() && s.shared.is_ready());
        if closing {
            return;
        }
        let over = (0..self.upstreams.len()).find(|&u| {
            let active = self
                .slots
                .iter()
                .filter(|s| s.upstream == u && s.shared.is_active())
                .count();
            active > self.share(u, clients)
        });
        if let Some(u) = over {
            self.retire_one(
                Some(u),
                "another upstream needs its share of the connections",
            );
        }
    }

    /// Retire the least busy extra connection (of `upstream`, or of any):
    /// it takes no new request and closes once its answers are in.
    pub(super) fn retire_one(&self, upstream: Option<usize>, why: &str) {
        let victim = self
            .slots
            .iter()
            .filter(|s| s.elastic && s.shared.is_active())
            .filter(|s| upstream.is_none_or(|u| s.upstream == u))
            .min_by_key(|s| s.shared.in_flight());
        if let Some(s) = victim {
            if s.shared.active.swap(false, Ordering::AcqRel) {
                tracing::debug!(coin = %self.coin, upstream = %self.upstreams[s.upstream].label, reason = why, "closing an extra connection");
                // A slot that never connected has nothing to drain.
                s.shared.wake.notify_one();
            }
        }
    }
}
