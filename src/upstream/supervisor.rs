//! Keeps one connection slot connected for the life of the pool.
//!
//! Owns: dialing with exponential backoff and jitter, logging each change of
//! state once, moving jobs queued on a dead connection to another one (they
//! were never written, so they may go anywhere), retrying once what a dead
//! connection left unanswered (read-only requests only, within the client's
//! deadline), and dormancy for slots that open on demand.

use super::conn::{self, ConnCtx, ConnShared};
use super::connect::Dialer;
use super::state::{Cell, SupervisorSettings};
use super::throttle::Signal;
use super::{Job, PoolEvent};
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::status::events::{CoinEvents, EventKind};
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const BACKOFF_START: Duration = Duration::from_millis(200);

/// Every established connection gets a distinct id, process-wide.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

pub(super) struct Supervisor {
    pub coin: String,
    pub label: String,
    pub index: usize,
    /// Opens on demand and closes when idle (beyond `min_connections`).
    pub elastic: bool,
    /// Asks the range `[settings.protocol, protocol_max]` (the upstream's
    /// protocol slot, see `pool`) instead of `settings.protocol`.
    pub protocol_max: Option<String>,
    pub dialer: Dialer,
    pub shared: Arc<ConnShared>,
    /// Shared by the upstream's slots: a slot whose connection comes up
    /// wakes the others from their backoff (see `run`).
    pub reachable: Arc<tokio::sync::Notify>,
    /// The pool's current generation: redispatched jobs go there.
    pub pool: Weak<Cell>,
    pub events: mpsc::UnboundedSender<PoolEvent>,
    pub rx: mpsc::Receiver<Job>,
    pub settings: SupervisorSettings,
    /// Upstream request latency, observed by the connection.
    pub latency: Option<prometheus::Histogram>,
    /// Connection failures are recorded here (and in the upstream's record).
    pub journal: CoinEvents,
    pub shutdown: CancellationToken,
}

impl Supervisor {
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_START;
        // None until the first attempt: the first failure is always logged.
        let mut was_up: Option<bool> = None;
        loop {
            if !self.wait_until_active().await {
                break;
            }
            let dialed = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = self.dialer.dial(self.settings.connect_timeout) => r,
            };
            match dialed {
                Ok(stream) => {
                    self.shared.id.store(
                        NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                        Ordering::Release,
                    );
                    let (pool, index) = (&self.pool, self.index);
                    let resend = move |job: Job| resend(pool, index, job);
                    let ctx = ConnCtx {
                        coin: &self.coin,
                        label: &self.label,
                        shared: &self.shared,
                        events: &self.events,
                        client_name: &self.settings.client_name,
                        protocol: &self.settings.protocol,
                        protocol_max: self.protocol_max.as_deref(),
                        ping_interval: self.settings.ping_interval,
                        stall_after: self.settings.stall_after,
                        idle_close: self.elastic.then_some(self.settings.idle_close),
                        latency: self.latency.as_ref(),
                        resend: &resend,
                        reachable: &self.reachable,
                        shutdown: &self.shutdown,
                    };
                    let mut ended = conn::serve(stream, &mut self.rx, ctx).await;
                    if self.shutdown.is_cancelled() {
                        self.fail_all(ended.unanswered, "shutting down");
                        self.fail_all(ended.queued, "shutting down");
                        break;
                    }
                    // Never written: they may go anywhere.
                    for job in std::mem::take(&mut ended.queued) {
                        self.redispatch(job);
                    }
                    if ended.reason == conn::IDLE {
                        tracing::debug!(coin = %self.coin, upstream = %self.label, "closing an idle extra connection");
                        self.shared.active.store(false, Ordering::Release);
                        self.move_queued();
                        continue;
                    }
                    if ended.was_ready {
                        backoff = BACKOFF_START;
                    }
                    if ended.closed_by_upstream && !ended.unanswered.is_empty() {
                        // What ElectrumX does to a session past its hard
                        // limit (or a server shedding load).
                        self.shared.throttle.signal(
                            Signal::Disconnect,
                            &format!(
                                "closed a connection with {} requests outstanding",
                                ended.unanswered.len()
                            ),
                        );
                    }
                    self.journal.record(
                        EventKind::ConnectionLost,
                        Some(&self.label),
                        &ended.reason,
                    );
                    if ended.was_ready || was_up != Some(false) {
                        tracing::warn!(coin = %self.coin, upstream = %self.label, reason = %ended.reason, "upstream connection down");
                    }
                    was_up = Some(false);
                    self.retry_or_fail(ended.unanswered);
                }
                Err(reason) => {
                    self.journal
                        .record(EventKind::Unreachable, Some(&self.label), &reason);
                    if was_up != Some(false) {
                        tracing::warn!(coin = %self.coin, upstream = %self.label, %reason, "upstream unreachable; retrying with backoff");
                    } else {
                        tracing::debug!(coin = %self.coin, upstream = %self.label, %reason, delay_ms = backoff.as_millis() as u64, "upstream still unreachable");
                    }
                    was_up = Some(false);
                }
            }
            // Wait before reconnecting, moving anything queued here meanwhile.
            // Another slot of the same upstream getting through ends the
            // wait: otherwise an upstream back from a restart could serve for
            // a while on its protocol connection alone, and requests only its
            // ordinary connections answer (1.4 `blockchain.scripthash.*`)
            // would fail meanwhile.
            let delay = jitter(backoff);
            backoff = (backoff * 2).min(self.settings.reconnect_max);
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = self.reachable.notified() => {
                        backoff = BACKOFF_START;
                        break;
                    }
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

    /// Wait while the slot is dormant; false on shutdown.
    async fn wait_until_active(&mut self) -> bool {
        while !self.shared.active.load(Ordering::Acquire) {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = self.shared.wake.notified() => {}
                // A job sent here while dormant (a race with idling) moves on.
                job = self.rx.recv() => match job {
                    Some(job) => self.redispatch(job),
                    None => return false,
                },
            }
        }
        !self.shutdown.is_cancelled()
    }

    fn move_queued(&mut self) {
        while let Ok(job) = self.rx.try_recv() {
            self.redispatch(job);
        }
    }

    fn redispatch(&self, job: Job) {
        self.shared.release();
        resend(&self.pool, self.index, job);
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

/// Send a job that left slot `index` (its in-flight count released) where
/// it goes next: its reroute, or the pool's choice of another connection.
fn resend(pool: &Weak<Cell>, index: usize, mut job: Job) {
    job.last_conn = Some(index);
    if let Some(reroute) = job.reroute.clone() {
        return (reroute.0)(job);
    }
    match pool.upgrade() {
        Some(pool) => pool.load().dispatch(job),
        None => job.responder.fail(RpcError::new(
            ErrorCode::UpstreamUnavailable,
            "shutting down",
        )),
    }
}

/// Spread reconnects: a delay between 75% and 125% of `base`.
fn jitter(base: Duration) -> Duration {
    let factor = rand::rng().random_range(0.75..1.25);
    base.mul_f64(factor)
}
