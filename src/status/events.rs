//! The recent events of one process: what an operator wants to know just
//! happened (an upstream left rotation, subscriptions moved, statuses were
//! held, a reload, clients refused by limits), with times.
//!
//! Owns: a bounded in-memory log ([`EventLog`], [`CAPACITY`] entries, oldest
//! dropped first), the per-upstream record of connection failures (how many,
//! and the last one with its time and reason), and the per-coin handle the
//! recording places hold ([`CoinEvents`]).
//!
//! Recording is cheap but takes a lock, so it is done where state flips
//! (health, connections, failovers, reloads), never per request: refusals by
//! limits are summed from their counters by the sampler, not recorded one by
//! one. A repeat of the same event (same kind, coin, upstream and message)
//! within [`MERGE_WINDOW`] of its last occurrence is counted on the existing
//! entry instead of filling the log: an upstream that stays unreachable
//! shows once, "x 57", with its first and last time.
//!
//! It does not decide anything: the places that record keep their own logic
//! and logs; this only remembers.

use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Entries kept; the oldest goes first.
pub const CAPACITY: usize = 200;
/// A repeat this soon after the last occurrence is counted on that entry.
pub const MERGE_WINDOW: Duration = Duration::from_secs(60);

/// What happened. Serialized in snake_case (`upstream_down`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An upstream came back into rotation.
    UpstreamUp,
    /// An upstream left rotation: no ready connection.
    UpstreamDown,
    /// An upstream left rotation: too far behind the best tip.
    UpstreamLagging,
    /// An upstream started throttling us (see `upstream::throttle`).
    UpstreamThrottled,
    /// An upstream connection was lost (closed, stalled, failed handshake).
    ConnectionLost,
    /// An upstream could not be reached (dial or TLS failed).
    Unreachable,
    /// Subscriptions moved off a lost or demoted upstream connection.
    Failover,
    /// A status that differs after a failover was held (count: statuses).
    StatusHeld,
    /// A hold ran out and the differing status was announced.
    HoldAnnounced,
    /// A configuration reload was applied.
    Reload,
    /// A configuration reload was rejected; the running one is unchanged.
    ReloadRejected,
    /// Clients refused or closed by a limit (count: refusals).
    Refusals,
    /// The process started or stopped draining (reserved: fleet).
    Draining,
}

impl EventKind {
    /// A failure of an upstream: counted in its failure record as well.
    pub fn is_failure(self) -> bool {
        matches!(self, EventKind::ConnectionLost | EventKind::Unreachable)
    }
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Increases with every new entry (a merged repeat keeps its number).
    pub seq: u64,
    pub kind: EventKind,
    /// `None` for process-wide events (reloads).
    pub coin: Option<String>,
    pub upstream: Option<String>,
    pub message: String,
    /// Occurrences merged into this entry (refusals: the refusals counted).
    pub count: u64,
    /// Unix time in milliseconds of the first and the last occurrence.
    pub first_ms: u64,
    pub last_ms: u64,
}

/// The failures of one upstream since the process started.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    pub count: u64,
    /// Unix time in milliseconds of the last one.
    pub at_ms: u64,
    pub reason: String,
}

#[derive(Default)]
struct Inner {
    ring: VecDeque<Event>,
    next_seq: u64,
    /// (coin, upstream) -> failures. Bounded by the upstreams ever configured.
    failures: HashMap<(String, String), Failure>,
}

/// The event log of one running proxy (one per [`crate::Server`]; tests run
/// several in one process, so it is never global).
#[derive(Default)]
pub struct EventLog {
    inner: Mutex<Inner>,
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    pub fn new() -> Arc<EventLog> {
        Arc::new(EventLog::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `n` occurrences of an event now.
    pub fn record(
        &self,
        kind: EventKind,
        coin: Option<&str>,
        upstream: Option<&str>,
        message: &str,
        n: u64,
    ) {
        self.record_at(now_ms(), kind, coin, upstream, message, n)
    }

    /// [`EventLog::record`] at a given time (tests).
    pub fn record_at(
        &self,
        at_ms: u64,
        kind: EventKind,
        coin: Option<&str>,
        upstream: Option<&str>,
        message: &str,
        n: u64,
    ) {
        let mut inner = self.lock();
        if kind.is_failure() {
            if let (Some(c), Some(u)) = (coin, upstream) {
                let f = inner
                    .failures
                    .entry((c.to_string(), u.to_string()))
                    .or_insert(Failure {
                        count: 0,
                        at_ms,
                        reason: String::new(),
                    });
                f.count += n;
                f.at_ms = at_ms;
                f.reason = message.to_string();
            }
        }
        let window = MERGE_WINDOW.as_millis() as u64;
        let repeat = inner.ring.iter().rposition(|e| {
            e.kind == kind
                && e.coin.as_deref() == coin
                && e.upstream.as_deref() == upstream
                && e.message == message
                && at_ms.saturating_sub(e.last_ms) <= window
        });
        let event = match repeat.and_then(|i| inner.ring.remove(i)) {
            Some(mut e) => {
                e.count += n;
                e.last_ms = e.last_ms.max(at_ms);
                e
            }
            None => {
                inner.next_seq += 1;
                Event {
                    seq: inner.next_seq,
                    kind,
                    coin: coin.map(str::to_string),
                    upstream: upstream.map(str::to_string),
                    message: message.to_string(),
                    count: n,
                    first_ms: at_ms,
                    last_ms: at_ms,
                }
            }
        };
        // The most recent occurrence goes to the back.
        inner.ring.push_back(event);
        while inner.ring.len() > CAPACITY {
            inner.ring.pop_front();
        }
    }

    /// Every entry, the most recent first.
    pub fn recent(&self) -> Vec<Event> {
        self.lock().ring.iter().rev().cloned().collect()
    }

    /// The failures of one upstream, if it ever failed.
    pub fn failure(&self, coin: &str, upstream: &str) -> Option<Failure> {
        self.lock()
            .failures
            .get(&(coin.to_string(), upstream.to_string()))
            .cloned()
    }

    /// The handle one coin's pool, hub and limits record through.
    pub fn for_coin(self: &Arc<Self>, coin: &str) -> CoinEvents {
        CoinEvents {
            log: Some(self.clone()),
            coin: coin.into(),
        }
    }
}

/// One coin's view of the event log. Cheap to clone; the default records
/// nothing (for pools and hubs built without a proxy around them, in tests).
#[derive(Clone, Default)]
pub struct CoinEvents {
    log: Option<Arc<EventLog>>,
    coin: Arc<str>,
}

impl std::fmt::Debug for CoinEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoinEvents")
            .field("coin", &self.coin)
            .finish()
    }
}

impl CoinEvents {
    /// Record one occurrence. `upstream` is the upstream's URL label (as in
    /// the metrics' `upstream` label).
    pub fn record(&self, kind: EventKind, upstream: Option<&str>, message: impl AsRef<str>) {
        self.add(kind, upstream, message, 1)
    }

    /// Record `n` occurrences at once.
    pub fn add(&self, kind: EventKind, upstream: Option<&str>, message: impl AsRef<str>, n: u64) {
        if let Some(log) = &self.log {
            log.record(kind, Some(&self.coin), upstream, message.as_ref(), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_window_are_counted_on_one_entry() {
        let log = EventLog::new();
        let t = 1_000_000;
        log.record_at(
            t,
            EventKind::Unreachable,
            Some("c"),
            Some("u"),
            "refused",
            1,
        );
        log.record_at(
            t + 10,
            EventKind::UpstreamDown,
            Some("c"),
            Some("u"),
            "x",
            1,
        );
        log.record_at(
            t + 20,
            EventKind::Unreachable,
            Some("c"),
            Some("u"),
            "refused",
            1,
        );
        let r = log.recent();
        assert_eq!(r.len(), 2);
        // The repeat moved to the front (most recent), counted twice.
        assert_eq!(r[0].kind, EventKind::Unreachable);
        assert_eq!((r[0].count, r[0].first_ms, r[0].last_ms), (2, t, t + 20));
        assert_eq!(r[0].seq, 1);
        // Past the window from the last occurrence: a new entry.
        let later = t + 20 + MERGE_WINDOW.as_millis() as u64 + 1;
        log.record_at(
            later,
            EventKind::Unreachable,
            Some("c"),
            Some("u"),
            "refused",
            1,
        );
        assert_eq!(log.recent().len(), 3);
        // Another message, coin or upstream: never merged.
        log.record_at(
            later,
            EventKind::Unreachable,
            Some("c"),
            Some("v"),
            "refused",
            1,
        );
        log.record_at(
            later,
            EventKind::Unreachable,
            Some("c"),
            Some("u"),
            "reset",
            1,
        );
        assert_eq!(log.recent().len(), 5);
    }

    #[test]
    fn failures_are_kept_per_upstream_beyond_the_ring() {
        let log = EventLog::new();
        log.record_at(
            5,
            EventKind::ConnectionLost,
            Some("c"),
            Some("u"),
            "stalled",
            1,
        );
        log.record_at(
            9,
            EventKind::Unreachable,
            Some("c"),
            Some("u"),
            "refused",
            1,
        );
        for i in 0..CAPACITY as u64 + 10 {
            log.record_at(10 + i, EventKind::Reload, None, None, &format!("r{i}"), 1);
        }
        assert_eq!(log.recent().len(), CAPACITY);
        assert!(log.recent().iter().all(|e| e.kind == EventKind::Reload));
        let f = log.failure("c", "u").unwrap();
        assert_eq!((f.count, f.at_ms, f.reason.as_str()), (2, 9, "refused"));
        assert_eq!(log.failure("c", "v"), None);
        // Health flips are not failures.
        log.record_at(99, EventKind::UpstreamDown, Some("c"), Some("w"), "gone", 1);
        assert_eq!(log.failure("c", "w"), None);
    }

    #[test]
    fn a_default_handle_records_nothing() {
        let e = CoinEvents::default();
        e.record(EventKind::Failover, None, "moved");
        let log = EventLog::new();
        let c = log.for_coin("btc");
        c.add(EventKind::Refusals, None, "rate", 7);
        let r = log.recent();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].coin.as_deref(), r[0].count), (Some("btc"), 7));
    }
}
