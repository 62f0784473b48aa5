//! The order in which a process stops serving without losing what it owes.
//!
//! Owns: the states a stopping process goes through and the tokens that
//! mark them.
//!
//! ```text
//! SIGTERM ──> not ready (/readyz 503) ──drain_notice_secs──> stop accepting ──> sessions end once they owe nothing
//!                                                                                   │
//! hand-over (see `handoff`) ─> not ready, stop accepting at once ───────────────────┤
//!                                                        shutdown_grace_secs later: hard stop (upstreams, hubs, admin)
//! ```
//!
//! While not ready the process still accepts and serves, so that a
//! balancer's health check takes it out of rotation before connections
//! could be refused. After a hand-over there is nothing to wait for: the
//! successor accepts on the same sockets. How one session decides it owes
//! nothing is `session`'s business; this module only fires the tokens.

use crate::admin::AdminState;
use crate::listener::bind::Sockets;
use crate::session::Stops;
use crate::status::events::EventKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a stopping process fires, and in which order.
#[derive(Clone)]
pub struct Drain {
    /// `drain`: stop accepting, sessions end once they owe nothing;
    /// `hard`: stop everything.
    pub stops: Stops,
    /// Stops the admin port's accept loop (only a hand-over does: while
    /// draining otherwise, `/readyz` and `/metrics` keep answering).
    pub admin_accept: CancellationToken,
    /// Fired once the listeners have been handed to a successor.
    pub handed_over: CancellationToken,
    admin: Arc<AdminState>,
    sockets: Arc<Sockets>,
}

impl Drain {
    pub fn new(stops: Stops, admin: Arc<AdminState>, sockets: Arc<Sockets>) -> Drain {
        Drain {
            stops,
            admin_accept: CancellationToken::new(),
            handed_over: CancellationToken::new(),
            admin,
            sockets,
        }
    }

    /// `/readyz` answers 503 from now on.
    fn not_ready(&self) {
        if !self.admin.draining.swap(true, Ordering::AcqRel) {
            // The gauge is what `/readyz`, `/status.json` and `/metrics` read.
            let metrics = &self.admin.status.metrics;
            metrics.draining.set(1);
            metrics.journal.record(
                EventKind::Draining,
                None,
                None,
                "draining: not ready for new wallets; sessions end once answered",
                1,
            );
        }
    }

    /// Stop accepting (the listeners drop their sockets, which close unless
    /// a successor holds them) and let sessions end once they owe nothing.
    fn stop_accepting(&self) {
        self.sockets.release();
        self.stops.drain.cancel();
    }

    /// A successor serves our sockets: stop accepting at once, admin port
    /// included (the successor answers there).
    pub fn hand_over(&self) {
        self.not_ready();
        self.admin_accept.cancel();
        self.stop_accepting();
        self.handed_over.cancel();
    }

    /// The whole stop, from wherever it stands: readiness off and `notice`
    /// of serving as usual (skipped after a hand-over), then stop accepting,
    /// give sessions `grace` to end on their own terms, then the hard stop.
    /// The notice ends early if the hard stop is fired meanwhile.
    pub async fn run(&self, notice: Duration, grace: Duration, sessions: &TaskTracker) {
        if !self.stops.drain.is_cancelled() {
            self.not_ready();
            if !notice.is_zero() {
                tracing::info!(
                    notice_secs = notice.as_secs(),
                    "draining: /readyz answers 503, still accepting while balancers notice"
                );
                tokio::select! {
                    _ = tokio::time::sleep(notice) => {}
                    _ = self.stops.hard.cancelled() => {}
                }
            }
            self.stop_accepting();
        }
        sessions.close();
        tracing::info!(
            sessions = sessions.len(),
            grace_secs = grace.as_secs(),
            "accepting stopped: sessions end once every request they sent is answered"
        );
        let ended = tokio::select! {
            r = tokio::time::timeout(grace, sessions.wait()) => r.is_ok(),
            _ = self.stops.hard.cancelled() => false,
        };
        if !ended {
            tracing::warn!(
                sessions = sessions.len(),
                "grace period over with sessions still busy: closing them"
            );
        }
        self.stops.hard.cancel();
        sessions.wait().await;
    }
}
