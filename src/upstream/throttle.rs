//! An upstream's own metering, made visible: is it throttling us?
//!
//! Owns: the per-upstream throttled flag, the signals that raise it, and
//! their counters. A signal is one of:
//!
//! - `excessive_resource_usage`: an answer with ElectrumX's error -101 (its
//!   session cost reached the hard limit; ElectrumX closes the session
//!   right after);
//! - `server_busy`: an answer with -102 (SERVER_BUSY);
//! - `disconnect`: the upstream closed a connection that had requests
//!   outstanding;
//! - `slow`: its answers are several times slower than its own unqueued
//!   answer time while another upstream's are not (judged by `monitor`).
//!
//! An upstream is throttled from its first signal until [`HOLD`] passes
//! without one. Entering and leaving are logged once each (never per
//! request) and entering is recorded as an `upstream_throttled` event; the
//! state shows on the status page and as `electrum_lb_upstream_throttled`.
//! What the pool does about it (selection prefers upstreams with room that
//! are not throttled; busy answers are resent elsewhere) lives in `select`,
//! `state` and `conn`.

use crate::status::events::{CoinEvents, EventKind};
use prometheus::IntCounter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A throttled upstream clears after this long without a signal.
pub const HOLD: Duration = Duration::from_secs(10);

/// ElectrumX's EXCESSIVE_RESOURCE_USAGE and SERVER_BUSY error codes.
pub const EXCESSIVE_RESOURCE_USAGE: i64 = -101;
pub const SERVER_BUSY: i64 = -102;

/// What made an upstream look throttled (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Excessive,
    Busy,
    Disconnect,
    Slow,
}

/// The `kind` label values, in [`Signal`] order.
pub const KINDS: [&str; 4] = [
    "excessive_resource_usage",
    "server_busy",
    "disconnect",
    "slow",
];

impl Signal {
    pub fn label(self) -> &'static str {
        KINDS[self as usize]
    }
}

/// Whether an upstream error object (raw JSON) is a throttling answer.
/// Only error answers are parsed, never results.
pub fn busy_signal(error: &str) -> Option<Signal> {
    #[derive(serde::Deserialize)]
    struct Code {
        code: Option<i64>,
    }
    match serde_json::from_str::<Code>(error).ok()?.code? {
        EXCESSIVE_RESOURCE_USAGE => Some(Signal::Excessive),
        SERVER_BUSY => Some(Signal::Busy),
        _ => None,
    }
}

/// The throttle state of one upstream; shared by its connections.
pub struct Throttle {
    coin: String,
    label: String,
    throttled: AtomicBool,
    /// When the last signal came, in ms since `epoch`.
    last_ms: AtomicU64,
    epoch: Instant,
    /// Why it was last throttled, in words (the status page shows it).
    reason: Mutex<String>,
    counters: Option<[IntCounter; 4]>,
    journal: CoinEvents,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("upstream", &self.label)
            .field("throttled", &self.is_throttled())
            .finish()
    }
}

impl Throttle {
    pub fn new(
        coin: &str,
        label: &str,
        counters: Option<[IntCounter; 4]>,
        journal: CoinEvents,
    ) -> Throttle {
        Throttle {
            coin: coin.into(),
            label: label.into(),
            throttled: AtomicBool::new(false),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            reason: Mutex::new(String::new()),
            counters,
            journal,
        }
    }

    pub fn is_throttled(&self) -> bool {
        self.throttled.load(Ordering::Acquire)
    }

    /// Why it is (or was last) throttled.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Count one signal; the first one of a spell throttles the upstream
    /// (logged and recorded once).
    pub fn signal(&self, signal: Signal, detail: &str) {
        if let Some(c) = &self.counters {
            c[signal as usize].inc();
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now.max(1), Ordering::Release);
        if self.throttled.swap(true, Ordering::AcqRel) {
            return;
        }
        let why = format!("{}: {detail}", signal.label());
        tracing::warn!(coin = %self.coin, upstream = %self.label, reason = %why, "upstream throttled: moving load to upstreams with room");
        self.journal
            .record(EventKind::UpstreamThrottled, Some(&self.label), &why);
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Clear the flag once [`HOLD`] passed without a signal (the monitor
    /// calls this every check). Returns true when it cleared.
    pub fn expire(&self) -> bool {
        self.expire_after(HOLD)
    }

    fn expire_after(&self, hold: Duration) -> bool {
        if !self.is_throttled() {
            return false;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        if now.saturating_sub(self.last_ms.load(Ordering::Acquire)) < hold.as_millis() as u64 {
            return false;
        }
        if self.throttled.swap(false, Ordering::AcqRel) {
            tracing::info!(coin = %self.coin, upstream = %self.label, quiet_secs = hold.as_secs(), "upstream no longer throttled");
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_codes() {
        assert_eq!(
            busy_signal(r#"{"code":-101,"message":"excessive resource usage"}"#),
            Some(Signal::Excessive)
        );
        assert_eq!(
            busy_signal(r#"{"code": -102, "message": "server busy"}"#),
            Some(Signal::Busy)
        );
        assert_eq!(busy_signal(r#"{"code":1,"message":"bad"}"#), None);
        assert_eq!(busy_signal(r#"{"message":"no code"}"#), None);
        assert_eq!(busy_signal("[]"), None);
    }

    #[test]
    fn throttled_from_the_first_signal_until_quiet() {
        let log = crate::status::events::EventLog::new();
        let t = Throttle::new("c", "u", None, log.for_coin("c"));
        assert!(!t.is_throttled());
        t.signal(Signal::Excessive, "-101 on a read");
        t.signal(Signal::Excessive, "-101 on a read");
        assert!(t.is_throttled());
        assert!(t.reason().starts_with("excessive_resource_usage"));
        // One event per spell, not per signal.
        let events = log.recent();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::UpstreamThrottled);
        assert!(!t.expire_after(Duration::from_secs(3600)));
        assert!(t.expire_after(Duration::ZERO));
        assert!(!t.is_throttled());
        assert!(!t.expire_after(Duration::ZERO));
    }
}
