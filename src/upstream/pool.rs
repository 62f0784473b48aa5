//! The pool of one coin: the handle the router and the hub hold.
//!
//! Owns: building each generation of upstreams and connection slots (a
//! supervisor task each; slots beyond an upstream's `min_connections` stay
//! dormant until requests queue, see `state`, and are retired again by
//! `monitor`), starting its supervisors and monitor, replacing it on reload,
//! the event stream the subscription hub consumes, and the status read by
//! logs, metrics and the status page. Dispatch itself is `state`'s.
//!
//! Protocol levels: the ordinary slots ask every upstream for the coin's
//! `upstream_protocol`. Each upstream also has one *protocol slot* that asks
//! the range up to `upstream_protocol_max`; it stays dormant until a
//! connection of that upstream learns (from `server.features`) that the
//! upstream offers a level that adds methods, then stays connected. So an
//! ElectrumX 2.0 serves 1.4 requests (`blockchain.scripthash.*`, gone at
//! 1.7) on its ordinary connections and 1.6/1.7 requests on its protocol
//! connection, while an old upstream costs no extra connection. Jobs carry
//! the levels that can answer them ([`select::Need`]); dispatch offers them
//! only connections whose negotiated level fits (see `levels`).

use super::conn::{ConnShared, UpstreamInfo};
use super::connect::Dialer;
use super::health::{Health, HealthRules};
use super::state::{Cell, PoolInner, Slot, SupervisorSettings, Upstream};
use super::supervisor::Supervisor;
use super::throttle::Throttle;
use super::{monitor, select, ConnId, Job, PoolEvent, UpstreamStatus};
use crate::config::{ServerConfig, UpstreamEntry};
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
    /// Highest version a protocol slot asks for (`None`: no protocol slots).
    pub protocol_max: Option<String>,
    pub metrics: Option<Arc<crate::metrics::CoinMetrics>>,
}

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

    /// Start the supervisors and the monitor of the current generation.
    fn launch(&self, pending: Vec<(mpsc::Receiver<Job>, bool)>, options: &PoolOptions) {
        let inner = self.cell.load_full();
        let reachable: Vec<Arc<tokio::sync::Notify>> = inner
            .upstreams
            .iter()
            .map(|_| Arc::new(tokio::sync::Notify::new()))
            .collect();
        for (index, (rx, elastic)) in pending.into_iter().enumerate() {
            let protocol_max = inner.slots[index]
                .top
                .then(|| options.protocol_max.clone())
                .flatten();
            let slot = &inner.slots[index];
            let upstream = &inner.upstreams[slot.upstream];
            let sup = Supervisor {
                coin: inner.coin.clone(),
                label: upstream.label.clone(),
                index,
                elastic,
                protocol_max,
                dialer: slot.dialer.clone(),
                shared: slot.shared.clone(),
                reachable: reachable[slot.upstream].clone(),
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
            crate::cores::spawn_on(slot.core, self.base.tracker.track_future(sup.run()));
        }
        self.base.tracker.spawn(monitor::run(
            inner.clone(),
            options.rules,
            inner.stop.clone(),
        ));
    }

    pub(super) fn inner(&self) -> arc_swap::Guard<Arc<PoolInner>> {
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
        self.preferred_for(select::Need::ANY)
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
                    levels: ready.iter().map(|s| s.shared.level()).collect(),
                    info,
                    throttled: u.throttle.is_throttled(),
                    throttle_reason: u.throttle.reason(),
                    in_flight_limit: ready.iter().map(|s| s.shared.limit()).sum(),
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
    let journal = options
        .metrics
        .as_ref()
        .map(|m| m.journal.clone())
        .unwrap_or_default();
    let mut slots = Vec::new();
    let mut rxs = Vec::new();
    let mut upstreams = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let dialer =
            Dialer::new(entry.clone()).map_err(|e| format!("coins.{coin}.upstreams[{i}]: {e}"))?;
        let label = entry.url.to_string();
        let throttle = Arc::new(Throttle::new(
            coin,
            &label,
            options.metrics.as_ref().map(|m| m.throttle_signals(&label)),
            journal.clone(),
        ));
        upstreams.push(Upstream {
            entry: entry.clone(),
            label,
            healthy: AtomicBool::new(true),
            health: Mutex::new(Health::default()),
            throttle: throttle.clone(),
        });
        // `--per-core`: at least one connection per runtime, so that each
        // has one of its own (see `cores`).
        let slots_max = entry.max_connections.max(1);
        let min = entry
            .min_connections
            .max(1)
            .max(crate::cores::count())
            .min(slots_max);
        let first = slots.len();
        for n in 0..slots_max {
            let (tx, rx) = mpsc::channel(QUEUE_PER_CONNECTION);
            let shared = Arc::new(ConnShared::new(entry.max_in_flight, throttle.clone()));
            shared.active.store(n < min, Ordering::Release);
            slots.push(Slot {
                upstream: i,
                tx,
                shared,
                dialer: dialer.clone(),
                top: false,
                elastic: n >= min,
                core: crate::cores::of_slot(n),
            });
            rxs.push((rx, n >= min));
        }
        if options.protocol_max.is_some() {
            // Dormant, and never closed for idleness once woken: it holds
            // the subscriptions only that level can hold.
            let (tx, rx) = mpsc::channel(QUEUE_PER_CONNECTION);
            let shared = Arc::new(ConnShared::new(entry.max_in_flight, throttle.clone()));
            shared.active.store(false, Ordering::Release);
            for s in &slots[first..] {
                let _ = s.shared.upgrade.set(shared.clone());
            }
            slots.push(Slot {
                upstream: i,
                tx,
                shared,
                dialer: dialer.clone(),
                top: true,
                elastic: false,
                core: 0,
            });
            rxs.push((rx, false));
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
        reply_hold: Duration::from_millis(server.upstream_reply_hold_ms),
    };
    let inner = Arc::new(PoolInner {
        coin: coin.clone(),
        upstreams,
        slots,
        events: base.events.clone(),
        settings,
        stop: base.shutdown.child_token(),
        rules: options.rules,
        journal,
        clients: options.metrics.clone(),
    });
    Ok((inner, rxs))
}
