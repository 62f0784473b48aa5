//! The pool of one coin: every upstream's connection slots, and dispatch.
//!
//! Owns: the slots (a supervisor task each; slots beyond an upstream's
//! `min_connections` stay dormant until the active ones are saturated, and go
//! dormant again when idle), choosing a slot for each job via `select`,
//! per-upstream health state (judged by `health`), and the event stream the
//! subscription hub consumes.

use super::conn::{ConnShared, UpstreamInfo};
use super::connect::Dialer;
use super::health::{self, Finding, Health, HealthRules};
use super::supervisor::{Supervisor, SupervisorSettings};
use super::{select, ConnId, Job, PoolEvent, UpstreamStatus};
use crate::config::{ServerConfig, UpstreamEntry};
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::status::events::CoinEvents;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Queued jobs one connection holds beyond its in-flight limit.
const QUEUE_PER_CONNECTION: usize = 4096;

/// Per-coin settings of a pool beyond the `[server]` table.
pub struct PoolOptions {
    pub rules: HealthRules,
    /// Protocol version asked of every upstream.
    pub protocol: String,
    pub metrics: Option<Arc<crate::metrics::CoinMetrics>>,
}

/// One upstream server and its rotation state.
pub(super) struct Upstream {
    pub entry: UpstreamEntry,
    pub label: String,
    pub healthy: AtomicBool,
    pub health: Mutex<Health>,
}

/// One connection slot.
pub(super) struct Slot {
    pub upstream: usize,
    pub dialer: Dialer,
    pub tx: mpsc::Sender<Job>,
    pub shared: Arc<ConnShared>,
}

pub(super) struct PoolInner {
    pub coin: String,
    pub upstreams: Vec<Upstream>,
    pub slots: Vec<Slot>,
    pub events: mpsc::UnboundedSender<PoolEvent>,
    pub settings: SupervisorSettings,
    /// Stops this generation's supervisors and health loop.
    pub stop: CancellationToken,
    /// The rules the health loop judges by (the status page judges lag by
    /// the same ones).
    pub rules: HealthRules,
    /// Health flips and connection failures are recorded here.
    pub journal: CoinEvents,
}

/// The current generation of a pool; replaced whole on reload.
pub(super) type Cell = ArcSwap<PoolInner>;

/// A coin's upstream pool. Cheap to clone. Its upstream set can be replaced
/// at run time ([`Pool::reconfigure`]) without dropping client sessions.
#[derive(Clone)]
pub struct Pool {
    cell: Arc<Cell>,
    base: Arc<Base>,
}

/// What every generation of a pool shares.
struct Base {
    coin: String,
    events: mpsc::UnboundedSender<PoolEvent>,
    /// Parent of each generation's own stop token.
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Pool {
    /// Build the pool, start a supervisor per connection slot and the health
    /// loop. Connections are established in the background: the proxy starts
    /// even when every upstream is down.
    pub fn start(
        coin: &str,
        entries: &[UpstreamEntry],
        server: &ServerConfig,
        options: PoolOptions,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(Pool, mpsc::UnboundedReceiver<PoolEvent>), String> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let base = Arc::new(Base {
            coin: coin.to_string(),
            events: events_tx,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        });
        let (inner, pending) = build(&base, entries, server, &options)?;
        let cell = Arc::new(ArcSwap::from(inner));
        let pool = Pool { cell, base };
        pool.launch(pending, &options);
        Ok((pool, events_rx))
    }

    /// Replace the upstream set. New connections start at once; the old
    /// generation stops taking requests, reports its connections down (the
    /// hub moves their subscriptions) and is closed once `grace` has let its
    /// in-flight requests finish.
    pub fn reconfigure(
        &self,
        entries: &[UpstreamEntry],
        server: &ServerConfig,
        options: PoolOptions,
        grace: Duration,
    ) -> Result<(), String> {
        let (inner, pending) = build(&self.base, entries, server, &options)?;
        let old = self.cell.swap(inner);
        self.launch(pending, &options);
        for s in &old.slots {
            if s.shared.is_ready() {
                let _ = self.base.events.send(PoolEvent::Down {
                    conn: s.shared.conn_id(),
                });
            }
        }
        self.base.tracker.spawn(async move {
            tokio::time::sleep(grace).await;
            old.stop.cancel();
        });
        Ok(())
    }

    /// Start the supervisors and the health loop of the current generation.
    fn launch(&self, pending: Vec<(mpsc::Receiver<Job>, bool)>, options: &PoolOptions) {
        let inner = self.cell.load_full();
        for (index, (rx, elastic)) in pending.into_iter().enumerate() {
            let slot = &inner.slots[index];
            let upstream = &inner.upstreams[slot.upstream];
            let sup = Supervisor {
                coin: inner.coin.clone(),
                label: upstream.label.clone(),
                index,
                elastic,
                dialer: slot.dialer.clone(),
                shared: slot.shared.clone(),
                pool: Arc::downgrade(&self.cell),
                events: self.base.events.clone(),
                rx,
                settings: inner.settings.clone(),
                latency: options
                    .metrics
                    .as_ref()
                    .map(|m| m.upstream_latency(&upstream.label)),
                journal: inner.journal.clone(),
                shutdown: inner.stop.clone(),
            };
            self.base.tracker.spawn(sup.run());
        }
        self.base.tracker.spawn(health::run(
            inner.clone(),
            options.rules,
            inner.stop.clone(),
        ));
    }

    fn inner(&self) -> arc_swap::Guard<Arc<PoolInner>> {
        self.cell.load()
    }

    pub fn coin(&self) -> &str {
        &self.base.coin
    }

    /// Send a job to the best connection, or fail it at once when no
    /// upstream is connected.
    pub fn dispatch(&self, job: Job) {
        self.inner().dispatch(job)
    }

    /// Send a job to the connection `conn` if it is still up; `Err` gives
    /// the job back otherwise (by value: no allocation on this path).
    #[allow(clippy::result_large_err)]
    pub fn dispatch_to(&self, conn: ConnId, job: Job) -> Result<(), Job> {
        let inner = self.inner();
        match inner.slot_of(conn) {
            Some(index) => {
                inner.send_to(index, job);
                Ok(())
            }
            None => Err(job),
        }
    }

    /// The connection a new job would go to right now.
    pub fn preferred(&self) -> Option<ConnId> {
        let inner = self.inner();
        select::pick(&inner.candidates(), None).map(|i| inner.slots[i].shared.conn_id())
    }

    /// The tip height this (ready) connection last reported.
    pub fn conn_tip(&self, conn: ConnId) -> Option<u64> {
        let inner = self.inner();
        inner.slot_of(conn).map(|i| inner.slots[i].shared.tip())
    }

    /// Whether at least one connection is ready.
    pub fn any_ready(&self) -> bool {
        self.inner().slots.iter().any(|s| s.shared.is_ready())
    }

    /// Whether at least one upstream is in rotation with a ready connection.
    pub fn any_healthy(&self) -> bool {
        let inner = self.inner();
        inner.slots.iter().any(|s| {
            s.shared.is_ready() && inner.upstreams[s.upstream].healthy.load(Ordering::Acquire)
        })
    }

    /// Whether this connection is still established.
    pub fn is_up(&self, conn: ConnId) -> bool {
        self.inner().slot_of(conn).is_some()
    }

    /// The first genesis hash any upstream reported.
    pub fn genesis_hash(&self) -> Option<String> {
        self.inner().slots.iter().find_map(|s| {
            s.shared
                .info
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .genesis_hash
                .clone()
        })
    }

    /// The health rules of the current generation.
    pub fn rules(&self) -> HealthRules {
        self.inner().rules
    }

    /// The URL label of the upstream whose connection is (or last was) `conn`.
    pub fn upstream_of(&self, conn: ConnId) -> Option<String> {
        let inner = self.inner();
        let slot = inner.slots.iter().find(|s| s.shared.conn_id() == conn)?;
        Some(inner.upstreams[slot.upstream].label.clone())
    }

    pub fn status(&self) -> Vec<UpstreamStatus> {
        let inner = self.inner();
        inner
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let slots: Vec<&Slot> = inner.slots.iter().filter(|s| s.upstream == i).collect();
                let ready: Vec<&&Slot> = slots.iter().filter(|s| s.shared.is_ready()).collect();
                let info: UpstreamInfo = ready
                    .first()
                    .map(|s| {
                        s.shared
                            .info
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                    })
                    .unwrap_or_default();
                UpstreamStatus {
                    url: u.label.clone(),
                    healthy: u.healthy.load(Ordering::Acquire) && !ready.is_empty(),
                    backup: u.entry.backup,
                    connections: slots
                        .iter()
                        .filter(|s| s.shared.active.load(Ordering::Acquire))
                        .count(),
                    ready_connections: ready.len(),
                    in_flight: slots.iter().map(|s| s.shared.in_flight()).sum(),
                    height: ready.iter().map(|s| s.shared.tip()).max().unwrap_or(0),
                    info,
                }
            })
            .collect()
    }
}

/// Build one generation: upstreams and slots (supervisors not started yet).
#[allow(clippy::type_complexity)]
fn build(
    base: &Base,
    entries: &[UpstreamEntry],
    server: &ServerConfig,
    options: &PoolOptions,
) -> Result<(Arc<PoolInner>, Vec<(mpsc::Receiver<Job>, bool)>), String> {
    let coin = &base.coin;
    let mut slots = Vec::new();
    let mut rxs = Vec::new();
    let mut upstreams = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let dialer =
            Dialer::new(entry.clone()).map_err(|e| format!("coins.{coin}.upstreams[{i}]: {e}"))?;
        upstreams.push(Upstream {
            entry: entry.clone(),
            label: entry.url.to_string(),
            healthy: AtomicBool::new(true),
            health: Mutex::new(Health::default()),
        });
        let min = entry.min_connections.max(1);
        for n in 0..entry.max_connections.max(1) {
            let (tx, rx) = mpsc::channel(QUEUE_PER_CONNECTION);
            let shared = Arc::new(ConnShared::new(entry.max_in_flight));
            shared.active.store(n < min, Ordering::Release);
            slots.push(Slot {
                upstream: i,
                tx,
                shared,
                dialer: dialer.clone(),
            });
            rxs.push((rx, n >= min));
        }
    }
    let settings = SupervisorSettings {
        client_name: server.server_name.clone(),
        protocol: options.protocol.clone(),
        connect_timeout: Duration::from_secs(server.upstream_connect_timeout_secs),
        ping_interval: Duration::from_secs(server.upstream_ping_secs),
        stall_after: Duration::from_secs(server.upstream_stall_secs),
        idle_close: Duration::from_secs(server.upstream_idle_close_secs),
        reconnect_max: Duration::from_millis(server.upstream_reconnect_max_ms),
    };
    let inner = Arc::new(PoolInner {
        coin: coin.clone(),
        upstreams,
        slots,
        events: base.events.clone(),
        settings,
        stop: base.shutdown.child_token(),
        rules: options.rules,
        journal: options
            .metrics
            .as_ref()
            .map(|m| m.journal.clone())
            .unwrap_or_default(),
    });
    Ok((inner, rxs))
}

impl PoolInner {
    /// One health check of every upstream (called by the health loop).
    pub fn check_health(&self, rules: &HealthRules) {
        let inner = self;
        let tips: Vec<Option<u64>> = (0..inner.upstreams.len())
            .map(|i| {
                inner
                    .slots
                    .iter()
                    .filter(|s| s.upstream == i && s.shared.is_ready())
                    .map(|s| s.shared.tip())
                    .max()
            })
            .collect();
        let best = tips.iter().flatten().copied().max().unwrap_or(0);
        for (i, u) in inner.upstreams.iter().enumerate() {
            let finding = health::judge(tips[i], best, rules.max_lag);
            let flip = u
                .health
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(finding == Finding::Ok, rules);
            let Some(now_healthy) = flip else { continue };
            u.healthy.store(now_healthy, Ordering::Release);
            match finding {
                Finding::Ok => {
                    tracing::info!(coin = %inner.coin, upstream = %u.label, "upstream back in rotation")
                }
                Finding::NoConnection => {
                    tracing::warn!(coin = %inner.coin, upstream = %u.label, "upstream out of rotation: no connection")
                }
                Finding::Lagging { behind, best } => tracing::warn!(
                    coin = %inner.coin, upstream = %u.label, behind, best_tip = best,
                    "upstream out of rotation: lagging behind the best tip"
                ),
            }
            inner
                .journal
                .record(finding.event_kind(), Some(&u.label), finding.to_string());
            // Whatever lives on its connections moves (or may come back).
            for s in inner
                .slots
                .iter()
                .filter(|s| s.upstream == i && s.shared.is_ready())
            {
                let conn = s.shared.conn_id();
                let ev = if now_healthy {
                    PoolEvent::Up { conn }
                } else {
                    PoolEvent::Down { conn }
                };
                let _ = inner.events.send(ev);
            }
        }
    }

    fn candidates(&self) -> Vec<select::Candidate> {
        self.slots
            .iter()
            .map(|s| {
                let u = &self.upstreams[s.upstream];
                select::Candidate {
                    ready: s.shared.is_ready(),
                    healthy: u.healthy.load(Ordering::Acquire),
                    in_flight: s.shared.in_flight(),
                    max_in_flight: s.shared.max_in_flight,
                    weight: u.entry.weight,
                    backup: u.entry.backup,
                }
            })
            .collect()
    }

    fn slot_of(&self, conn: ConnId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.shared.is_ready() && s.shared.conn_id() == conn)
    }

    pub(super) fn dispatch(&self, job: Job) {
        match select::pick(&self.candidates(), job.last_conn) {
            Some(index) => self.send_to(index, job),
            None => job.responder.fail(RpcError::new(
                ErrorCode::UpstreamUnavailable,
                format!("no upstream server available for {}", self.coin),
            )),
        }
    }

    fn send_to(&self, index: usize, mut job: Job) {
        let slot = &self.slots[index];
        job.last_conn = Some(index);
        let load = slot.shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        if load > slot.shared.max_in_flight {
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

    /// Wake a dormant slot of `upstream`, if it has one: its active
    /// connections are saturated.
    fn grow(&self, upstream: usize) {
        let dormant = self
            .slots
            .iter()
            .find(|s| s.upstream == upstream && !s.shared.active.load(Ordering::Acquire));
        if let Some(s) = dormant {
            if !s.shared.active.swap(true, Ordering::AcqRel) {
                tracing::debug!(coin = %self.coin, upstream = %self.upstreams[upstream].label, "opening another connection: the open ones are saturated");
                s.shared.wake.notify_one();
            }
        }
    }
}
