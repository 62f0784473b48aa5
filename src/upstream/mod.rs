//! The upstream pool of one coin: shared connections to ElectrumX servers.
//!
//! Owns: the connections of every upstream of a coin (a supervisor task per
//! connection that dials, handshakes, serves and reconnects with backoff),
//! dispatching jobs to a connection chosen by `select`, retrying what a dead
//! connection left unanswered, and the stream of [`PoolEvent`]s the
//! subscription hub consumes. Many sessions share few sockets here.
//!
//! Layout: `connect` dials (TCP/TLS), `conn` is the per-socket actor (id
//! rewriting), `select` is the pure choice of a connection.

pub mod conn;
pub mod connect;
pub mod select;

use crate::config::{ServerConfig, UpstreamEntry};
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::Responder;
use conn::{ConnCtx, ConnShared, UpstreamInfo};
use connect::Dialer;
use rand::Rng;
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Identifies one established upstream connection (a reconnect gets a new id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One request on its way to an upstream.
#[derive(Debug)]
pub struct Job {
    /// The request without its id (see `jsonrpc::request_prefix`).
    pub prefix: Vec<u8>,
    pub responder: Responder,
    /// The client's deadline: after it the request is failed, not retried.
    pub deadline: Instant,
    /// Whether it may be resent after its connection died with it written.
    /// Never true for `blockchain.transaction.broadcast`.
    pub retryable: bool,
    /// How many times it has been resent.
    pub attempts: u8,
    /// Index of the connection it last went to (skipped on retry).
    pub last_conn: Option<usize>,
}

impl Job {
    pub fn new(prefix: Vec<u8>, responder: Responder, deadline: Instant) -> Job {
        Job {
            prefix,
            responder,
            deadline,
            retryable: true,
            attempts: 0,
            last_conn: None,
        }
    }
}

/// What connections report to whoever keeps state on them (the hub).
#[derive(Debug)]
pub enum PoolEvent {
    Up {
        conn: ConnId,
    },
    Down {
        conn: ConnId,
    },
    Notification {
        conn: ConnId,
        method: String,
        params: Box<RawValue>,
    },
}

/// A point-in-time view of one upstream, for logs, metrics and readiness.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    pub url: String,
    pub connections: usize,
    pub ready_connections: usize,
    pub in_flight: usize,
    pub info: UpstreamInfo,
}

struct Slot {
    upstream: usize,
    tx: mpsc::Sender<Job>,
    shared: Arc<ConnShared>,
    weight: u32,
    backup: bool,
}

struct PoolInner {
    coin: String,
    entries: Vec<UpstreamEntry>,
    slots: Vec<Slot>,
}

/// A coin's upstream pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// Queued jobs one connection holds beyond its in-flight limit.
const QUEUE_PER_CONNECTION: usize = 4096;
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Global counter so every established connection has a distinct id.
static NEXT_CONN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Pool {
    /// Build the pool and start a supervisor per connection. Connections are
    /// established in the background: the proxy starts even when every
    /// upstream is down.
    pub fn start(
        coin: &str,
        entries: &[UpstreamEntry],
        server: &ServerConfig,
        protocol: &str,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(Pool, mpsc::UnboundedReceiver<PoolEvent>), String> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut slots = Vec::new();
        let mut rxs = Vec::new();
        let mut dialers = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let dialer = Dialer::new(entry.clone())
                .map_err(|e| format!("coins.{coin}.upstreams[{i}]: {e}"))?;
            dialers.push(dialer);
            for _ in 0..entry.min_connections.max(1) {
                let (tx, rx) = mpsc::channel(QUEUE_PER_CONNECTION);
                slots.push(Slot {
                    upstream: i,
                    tx,
                    shared: Arc::new(ConnShared::new(entry.max_in_flight)),
                    weight: entry.weight,
                    backup: entry.backup,
                });
                rxs.push(rx);
            }
        }
        let inner = Arc::new(PoolInner {
            coin: coin.to_string(),
            entries: entries.to_vec(),
            slots,
        });
        for (index, rx) in rxs.into_iter().enumerate() {
            let slot = &inner.slots[index];
            let sup = Supervisor {
                coin: coin.to_string(),
                label: entries[slot.upstream].url.to_string(),
                index,
                dialer: dialers[slot.upstream].clone(),
                shared: slot.shared.clone(),
                pool: Arc::downgrade(&inner),
                events: events_tx.clone(),
                rx,
                client_name: server.server_name.clone(),
                protocol: protocol.to_string(),
                connect_timeout: Duration::from_secs(server.upstream_connect_timeout_secs),
                ping_interval: Duration::from_secs(server.upstream_ping_secs),
                stall_after: Duration::from_secs(server.upstream_stall_secs),
                shutdown: shutdown.clone(),
            };
            tracker.spawn(sup.run());
        }
        Ok((Pool { inner }, events_rx))
    }

    pub fn coin(&self) -> &str {
        &self.inner.coin
    }

    /// Send a job to the best connection, or fail it at once when no
    /// upstream is ready.
    pub fn dispatch(&self, job: Job) {
        self.inner.dispatch(job)
    }

    /// Send a job to the connection `conn` if it is still up; `Err` gives
    /// the job back otherwise.
    pub fn dispatch_to(&self, conn: ConnId, job: Job) -> Result<(), Job> {
        let Some(index) = self
            .inner
            .slots
            .iter()
            .position(|s| s.shared.is_ready() && s.shared.conn_id() == conn)
        else {
            return Err(job);
        };
        self.inner.send_to(index, job);
        Ok(())
    }

    /// The connection a new job would go to right now.
    pub fn preferred(&self) -> Option<ConnId> {
        select::pick(&self.inner.candidates(), None).map(|i| self.inner.slots[i].shared.conn_id())
    }

    /// Whether at least one connection is ready.
    pub fn any_ready(&self) -> bool {
        self.inner.slots.iter().any(|s| s.shared.is_ready())
    }

    /// Whether this connection is still established.
    pub fn is_up(&self, conn: ConnId) -> bool {
        self.inner
            .slots
            .iter()
            .any(|s| s.shared.is_ready() && s.shared.conn_id() == conn)
    }

    /// The first genesis hash any upstream reported.
    pub fn genesis_hash(&self) -> Option<String> {
        self.inner.slots.iter().find_map(|s| {
            s.shared
                .info
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .genesis_hash
                .clone()
        })
    }

    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.inner
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let slots: Vec<&Slot> = self
                    .inner
                    .slots
                    .iter()
                    .filter(|s| s.upstream == i)
                    .collect();
                let info = slots
                    .iter()
                    .find(|s| s.shared.is_ready())
                    .map(|s| {
                        s.shared
                            .info
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                    })
                    .unwrap_or_default();
                UpstreamStatus {
                    url: e.url.to_string(),
                    connections: slots.len(),
                    ready_connections: slots.iter().filter(|s| s.shared.is_ready()).count(),
                    in_flight: slots.iter().map(|s| s.shared.in_flight()).sum(),
                    info,
                }
            })
            .collect()
    }
}

impl PoolInner {
    fn candidates(&self) -> Vec<select::Candidate> {
        self.slots
            .iter()
            .map(|s| select::Candidate {
                ready: s.shared.is_ready(),
                in_flight: s.shared.in_flight(),
                max_in_flight: s.shared.max_in_flight,
                weight: s.weight,
                backup: s.backup,
            })
            .collect()
    }

    fn dispatch(&self, job: Job) {
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
        slot.shared.in_flight.fetch_add(1, Ordering::Relaxed);
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
}

/// Keeps one connection slot connected for the life of the pool.
struct Supervisor {
    coin: String,
    label: String,
    index: usize,
    dialer: Dialer,
    shared: Arc<ConnShared>,
    pool: Weak<PoolInner>,
    events: mpsc::UnboundedSender<PoolEvent>,
    rx: mpsc::Receiver<Job>,
    client_name: String,
    protocol: String,
    connect_timeout: Duration,
    ping_interval: Duration,
    stall_after: Duration,
    shutdown: CancellationToken,
}

impl Supervisor {
    async fn run(mut self) {
        let mut backoff = BACKOFF_START;
        // None until the first attempt: the first failure is always logged.
        let mut was_up: Option<bool> = None;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            let dialed = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = self.dialer.dial(self.connect_timeout) => r,
            };
            match dialed {
                Ok(stream) => {
                    self.shared.id.store(
                        NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                        Ordering::Release,
                    );
                    let ctx = ConnCtx {
                        label: &self.label,
                        shared: &self.shared,
                        events: &self.events,
                        client_name: &self.client_name,
                        protocol: &self.protocol,
                        ping_interval: self.ping_interval,
                        stall_after: self.stall_after,
                        shutdown: &self.shutdown,
                    };
                    let ended = conn::serve(stream, &mut self.rx, ctx).await;
                    if ended.was_ready {
                        backoff = BACKOFF_START;
                    }
                    if self.shutdown.is_cancelled() {
                        self.fail_all(ended.unanswered, "shutting down");
                        break;
                    }
                    if ended.was_ready || was_up != Some(false) {
                        tracing::warn!(coin = %self.coin, upstream = %self.label, reason = %ended.reason, "upstream connection down");
                    }
                    was_up = Some(false);
                    self.retry_or_fail(ended.unanswered);
                }
                Err(reason) => {
                    if was_up != Some(false) {
                        tracing::warn!(coin = %self.coin, upstream = %self.label, %reason, "upstream unreachable; retrying with backoff");
                    } else {
                        tracing::debug!(coin = %self.coin, upstream = %self.label, %reason, "upstream still unreachable");
                    }
                    was_up = Some(false);
                }
            }
            // Wait before reconnecting, moving anything queued here meanwhile
            // to another connection: it was never written, so it may go anywhere.
            let delay = jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(wake) => break,
                    job = self.rx.recv() => match job {
                        Some(job) => self.redispatch(job),
                        None => return,
                    },
                }
            }
        }
        // Shutdown: nothing queued may be left without an answer.
        self.rx.close();
        while let Ok(job) = self.rx.try_recv() {
            self.shared.release();
            job.responder.fail(RpcError::new(
                ErrorCode::UpstreamUnavailable,
                "shutting down",
            ));
        }
    }

    fn redispatch(&self, mut job: Job) {
        self.shared.release();
        job.last_conn = Some(self.index);
        match self.pool.upgrade() {
            Some(pool) => pool.dispatch(job),
            None => job.responder.fail(RpcError::new(
                ErrorCode::UpstreamUnavailable,
                "shutting down",
            )),
        }
    }

    /// Jobs written to a connection that died: resend read-only ones once,
    /// elsewhere, within their deadline; fail the rest.
    fn retry_or_fail(&self, jobs: Vec<Job>) {
        let now = Instant::now();
        for mut job in jobs {
            if job.retryable && job.attempts == 0 && job.deadline > now {
                job.attempts += 1;
                self.redispatch(job);
            } else {
                self.shared.release();
                let msg = if job.retryable {
                    "upstream connection lost before answering"
                } else {
                    "upstream connection lost after the request was sent; it was not resent"
                };
                job.responder
                    .fail(RpcError::new(ErrorCode::UpstreamUnavailable, msg));
            }
        }
    }

    fn fail_all(&self, jobs: Vec<Job>, why: &str) {
        for job in jobs {
            self.shared.release();
            job.responder
                .fail(RpcError::new(ErrorCode::UpstreamUnavailable, why));
        }
    }
}

/// Spread reconnects: a delay between 75% and 125% of `base`.
fn jitter(base: Duration) -> Duration {
    let factor = rand::rng().random_range(0.75..1.25);
    base.mul_f64(factor)
}
