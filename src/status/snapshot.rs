//! The snapshot: everything the status page, `/status.json` and the
//! scrape-time metrics show, read once, at one moment.
//!
//! Owns: the shape of `/status.json` (these types, serialized as they are)
//! and how an upstream's state is judged. Reading them from the live state
//! is `read`'s job.
//!
//! How an upstream's state is judged (see [`judge`]) follows the health
//! rules: `up` while in rotation with a ready connection (what
//! `electrum_lb_upstream_up` says), else `lagging` when its tip is more than
//! `max_lag` behind the best, else `down` (with the last failure as the
//! reason). An upstream in rotation that throttles us (see
//! `upstream::throttle`) is `throttled` (what `electrum_lb_upstream_throttled`
//! says), with the signal as the reason: it still serves, with less load.

use super::events::{Event, Failure};
use crate::upstream::health::HealthRules;
use crate::upstream::UpstreamStatus;
use serde::Serialize;
use std::collections::BTreeMap;

/// The whole proxy at one moment: the body of `/status.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// `[server] server_name`.
    pub server: String,
    /// Unix time in milliseconds when this snapshot was taken.
    pub now_ms: u64,
    pub started_ms: u64,
    /// Not draining and every coin has an upstream in rotation (what
    /// `/readyz` answers).
    pub ready: bool,
    /// The process is draining (`electrum_lb_draining`): `/readyz` answers
    /// 503 so balancers move new wallets elsewhere.
    pub draining: bool,
    pub coins_without_upstream: Vec<String>,
    /// Client connections of every coin, against `[limits] max_sessions`.
    pub connections: Connections,
    /// Seconds the "recent" figures (latency, cache hit rate) cover.
    pub window_secs: f64,
    pub coins: Vec<CoinView>,
    /// The event log, most recent first.
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    pub open: usize,
    pub max: usize,
    /// Client IP groups remembered (see `[limits]`).
    pub groups: usize,
}

/// One coin.
#[derive(Debug, Clone, Serialize)]
pub struct CoinView {
    pub name: String,
    /// An upstream is in rotation.
    pub ready: bool,
    /// The tip the hub last announced (0: none yet).
    pub tip_height: u64,
    pub listeners: Vec<ListenerView>,
    pub sessions: Sessions,
    pub subscriptions: Subscriptions,
    pub cache: CacheView,
    /// Client requests answered (`electrum_lb_requests_total`).
    pub requests: u64,
    /// Errors the proxy produced, by kind (`electrum_lb_errors_total`; kinds
    /// never hit are left out).
    pub errors: BTreeMap<String, u64>,
    /// Notifications written to clients.
    pub notifications: u64,
    pub upstreams: Vec<UpstreamView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerView {
    pub transport: String,
    pub addr: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sessions {
    pub open: i64,
    /// `electrum_lb_sessions_open` by its `transport` label (`tcp`, `ssl`,
    /// and whatever other transports open sessions).
    pub by_transport: BTreeMap<String, i64>,
    /// `electrum_lb_sessions_by_protocol` by its `level` label.
    pub by_protocol: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Subscriptions {
    /// Distinct scripthashes subscribed upstream (`kind="upstream"`).
    pub upstream: usize,
    /// Subscriptions held by sessions (`kind="session"`).
    pub session: usize,
    /// Statuses held after a failover (`kind="held"`).
    pub held: usize,
    /// Reads waiting for their subscription to settle.
    pub parked_reads: usize,
    /// Distinct outpoints watched (`kind="outpoint"`), and those emulated
    /// over a script's status (`kind="outpoint_emulated"`).
    pub outpoint: usize,
    pub outpoint_emulated: usize,
    /// Session subscriptions by form (`electrum_lb_session_subscriptions`).
    pub by_form: BTreeMap<String, usize>,
    /// `max_subscriptions_total` and `max_subscriptions_per_session`.
    pub max_total: usize,
    pub max_per_session: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheView {
    /// `electrum_lb_cache_requests_total` by result, since start.
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    /// Hits over all cacheable requests, since start (`None`: none yet).
    pub hit_rate: Option<f64>,
    /// The same over the recent window.
    pub recent_hit_rate: Option<f64>,
    pub entries: usize,
    pub bytes: u64,
    /// `[cache] max_bytes` (0: the cache is disabled).
    pub max_bytes: u64,
    pub reorgs: u64,
}

/// What an upstream is doing, as the page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Up,
    Down,
    Lagging,
    Throttled,
}

/// One upstream.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamView {
    /// The URL, as in the metrics' `upstream` label.
    pub url: String,
    pub state: State,
    /// Why, in words (empty when there is nothing to say).
    pub reason: String,
    /// In rotation with a ready connection (`electrum_lb_upstream_up`).
    pub up: bool,
    pub backup: bool,
    /// Tip height last reported (`electrum_lb_upstream_height`; 0: unknown).
    pub height: u64,
    /// Blocks behind the best tip among the coin's connected upstreams.
    pub lag: Option<u64>,
    pub max_lag: u64,
    /// Protocol version and software it reported in its handshake.
    pub protocol: Option<String>,
    pub server_version: Option<String>,
    /// The highest protocol it offers (`server.features` `protocol_max`).
    pub protocol_max: Option<String>,
    /// Ready connections by the protocol level they negotiated
    /// (`electrum_lb_upstream_protocol_connections`).
    pub levels: BTreeMap<String, usize>,
    /// Ready connections (`electrum_lb_upstream_connections`) and the
    /// connection slots kept open or opening.
    pub connections: usize,
    pub slots_active: usize,
    /// Requests queued or awaiting an answer (`electrum_lb_upstream_in_flight`).
    pub in_flight: usize,
    /// The in-flight limits its connections learned, summed
    /// (`electrum_lb_upstream_in_flight_limit`).
    pub in_flight_limit: usize,
    /// It throttles us (`electrum_lb_upstream_throttled`).
    pub throttled: bool,
    /// Latency over the recent window.
    pub latency: Latency,
    /// Requests answered since start (the latency histogram's count).
    pub requests: u64,
    /// Connection failures since start, and the last one.
    pub failures: u64,
    pub last_failure: Option<Failure>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Answers in the window.
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Judge what an upstream is doing from what the health rules look at.
pub fn judge(
    u: &UpstreamStatus,
    lag: Option<u64>,
    rules: &HealthRules,
    failure: Option<&Failure>,
) -> (State, String) {
    let behind = lag.filter(|l| *l > rules.max_lag);
    if u.healthy && u.throttled && behind.is_none() {
        return (State::Throttled, u.throttle_reason.clone());
    }
    if u.healthy {
        let reason = match behind {
            Some(l) => format!(
                "{l} blocks behind the best tip: leaves rotation after {} checks like this",
                rules.fall
            ),
            None => String::new(),
        };
        return (State::Up, reason);
    }
    if u.ready_connections == 0 {
        let reason = match failure {
            Some(f) => format!("no connection: {}", f.reason),
            None => "no connection yet".to_string(),
        };
        return (State::Down, reason);
    }
    match behind {
        Some(l) => (
            State::Lagging,
            format!("{l} blocks behind the best tip (max_lag {})", rules.max_lag),
        ),
        None => (
            State::Down,
            format!(
                "connected again: back in rotation after {} good checks in a row",
                rules.rise
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::conn::UpstreamInfo;
    use std::time::Duration;

    const RULES: HealthRules = HealthRules {
        interval: Duration::from_secs(1),
        rise: 3,
        fall: 2,
        max_lag: 2,
    };

    fn status(healthy: bool, ready: usize) -> UpstreamStatus {
        UpstreamStatus {
            url: "tcp://a:1".into(),
            healthy,
            backup: false,
            connections: 1,
            ready_connections: ready,
            in_flight: 0,
            height: 100,
            levels: Vec::new(),
            info: UpstreamInfo::default(),
            throttled: false,
            throttle_reason: String::new(),
            in_flight_limit: 10,
        }
    }

    #[test]
    fn states_follow_the_health_rules() {
        assert_eq!(
            judge(&status(true, 1), Some(0), &RULES, None),
            (State::Up, String::new())
        );
        let (s, why) = judge(&status(true, 1), Some(5), &RULES, None);
        assert_eq!(s, State::Up, "still in rotation until the rule flips it");
        assert!(why.contains("5 blocks behind"), "{why}");
        let (s, why) = judge(&status(false, 1), Some(5), &RULES, None);
        assert_eq!(s, State::Lagging);
        assert!(why.contains("max_lag 2"), "{why}");
        let failure = Failure {
            count: 3,
            at_ms: 1,
            reason: "connect: refused".into(),
        };
        let (s, why) = judge(&status(false, 0), None, &RULES, Some(&failure));
        assert_eq!(s, State::Down);
        assert_eq!(why, "no connection: connect: refused");
        let (s, why) = judge(&status(false, 1), Some(1), &RULES, None);
        assert_eq!(s, State::Down);
        assert!(why.contains("3 good checks"), "{why}");
        let mut throttled = status(true, 1);
        throttled.throttled = true;
        throttled.throttle_reason = "excessive_resource_usage: x".into();
        let (s, why) = judge(&throttled, Some(0), &RULES, None);
        assert_eq!(
            (s, why.as_str()),
            (State::Throttled, "excessive_resource_usage: x")
        );
        // Out of rotation, it is what that says.
        throttled.healthy = false;
        assert_eq!(judge(&throttled, Some(0), &RULES, None).0, State::Down);
    }
}
