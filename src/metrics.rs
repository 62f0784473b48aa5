//! Prometheus metrics: one registry per process, handles resolved once.
//!
//! Owns: metric names and labels, the bounded set of `method` label values
//! (anything unknown is `other`, so clients cannot blow up cardinality), the
//! per-coin handle bundle [`CoinMetrics`] that sessions and connections clone
//! (the hot path never looks up a label), and rendering the text exposition,
//! including values read from pools and hubs at scrape time.
//!
//! It also carries the process's event log (`status::events`): every part
//! that holds metric handles can record an event the same way, so the log
//! reaches the pool, the hub and the limits without extra wiring.

use crate::jsonrpc::ErrorCode;
use crate::status::events::{CoinEvents, EventLog};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Every method the `method` label may name; the last is the catch-all.
pub const METHODS: &[&str] = &[
    "server.version",
    "server.ping",
    "server.banner",
    "server.features",
    "server.donation_address",
    "server.peers.subscribe",
    "server.add_peer",
    "blockchain.headers.subscribe",
    "blockchain.numblocks.subscribe",
    "blockchain.block.header",
    "blockchain.block.headers",
    "blockchain.block.get_header",
    "blockchain.block.get_chunk",
    "blockchain.estimatefee",
    "blockchain.relayfee",
    "blockchain.scripthash.get_balance",
    "blockchain.scripthash.get_history",
    "blockchain.scripthash.get_mempool",
    "blockchain.scripthash.listunspent",
    "blockchain.scripthash.subscribe",
    "blockchain.scripthash.unsubscribe",
    "blockchain.address.get_balance",
    "blockchain.address.get_history",
    "blockchain.address.get_mempool",
    "blockchain.address.listunspent",
    "blockchain.address.subscribe",
    "blockchain.address.unsubscribe",
    "blockchain.transaction.get",
    "blockchain.transaction.get_merkle",
    "blockchain.transaction.id_from_pos",
    "blockchain.transaction.broadcast",
    "mempool.get_fee_histogram",
    "mempool.get_info",
    "mempool.recent",
    "blockchain.transaction.broadcast_package",
    "blockchain.transaction.testmempoolaccept",
    "blockchain.scriptpubkey.get_balance",
    "blockchain.scriptpubkey.get_history",
    "blockchain.scriptpubkey.get_mempool",
    "blockchain.scriptpubkey.listunspent",
    "blockchain.scriptpubkey.subscribe",
    "blockchain.scriptpubkey.unsubscribe",
    "blockchain.outpoint.subscribe",
    "blockchain.outpoint.unsubscribe",
    "blockchain.outpoint.get_status",
    "other",
];

/// The `level` label of sessions: not negotiated, below 1.3, 1.3 to 1.5,
/// 1.6, 1.7.
pub const LEVELS: [&str; 5] = ["none", "legacy", "1.4", "1.6", "1.7"];

/// Index of a session's level in [`LEVELS`].
pub fn level_index(level: crate::protocol::Level) -> usize {
    use crate::protocol::{Level, V1_6, V1_7};
    match level {
        Level::Unnegotiated => 0,
        Level::Legacy(_) => 1,
        Level::Modern(v) if v >= V1_7 => 4,
        Level::Modern(v) if v >= V1_6 => 3,
        Level::Modern(_) => 2,
    }
}

/// Index of a method in [`METHODS`] (`other` for anything unknown).
pub fn method_index(method: &str) -> u8 {
    METHODS
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHODS.len() - 1) as u8
}

/// How a client request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A result (from an upstream, the hub, or the proxy itself).
    Ok,
    /// The upstream's own error object, relayed.
    UpstreamError,
    /// The proxy's error (no upstream, timeout, limit, bad request).
    ProxyError,
}

const OUTCOMES: [&str; 3] = ["ok", "upstream_error", "proxy_error"];
const ERROR_KINDS: [&str; 6] = [
    "parse",
    "invalid",
    "limit",
    "timeout",
    "no_upstream",
    "internal",
];

fn error_kind(code: ErrorCode) -> usize {
    match code {
        ErrorCode::ParseError => 0,
        ErrorCode::InvalidRequest
        | ErrorCode::InvalidParams
        | ErrorCode::MethodNotFound
        | ErrorCode::BadRequest => 1,
        ErrorCode::LimitExceeded => 2,
        ErrorCode::UpstreamTimeout => 3,
        ErrorCode::UpstreamUnavailable => 4,
        ErrorCode::InternalError | ErrorCode::DaemonError => 5,
    }
}

/// TLS handshakes waiting for a TLS worker or being answered by one (see
/// `listener::handshake`): one gauge per process, in every registry.
pub static TLS_HANDSHAKES_WAITING: std::sync::LazyLock<IntGauge> = std::sync::LazyLock::new(|| {
    IntGauge::with_opts(opts(
        "tls_handshakes_waiting",
        "TLS handshakes whose ClientHello waits for a TLS worker or is being answered by one.",
    ))
    .expect("valid metric")
});

/// The process-wide registry and metric families.
pub struct Metrics {
    pub registry: Registry,
    /// The recent events of this proxy (the status page shows them).
    pub journal: Arc<EventLog>,
    pub(crate) sessions_open: IntGaugeVec,
    sessions_total: IntCounterVec,
    pub(crate) requests: IntCounterVec,
    request_seconds: HistogramVec,
    pub(crate) errors: IntCounterVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    notifications: IntCounterVec,
    pub(crate) upstream_up: IntGaugeVec,
    pub(crate) upstream_height: IntGaugeVec,
    pub(crate) upstream_in_flight: IntGaugeVec,
    pub(crate) upstream_connections: IntGaugeVec,
    pub(crate) upstream_seconds: HistogramVec,
    pub(crate) upstream_throttled: IntGaugeVec,
    upstream_throttle_signals: IntCounterVec,
    pub(crate) upstream_in_flight_limit: IntGaugeVec,
    pub(crate) subscriptions: IntGaugeVec,
    pub(crate) session_subscriptions: IntGaugeVec,
    pub(crate) sessions_by_level: IntGaugeVec,
    pub(crate) upstream_protocol: IntGaugeVec,
    pub(crate) cache_requests: IntCounterVec,
    pub(crate) cache_entries: IntGaugeVec,
    pub(crate) cache_bytes: IntGaugeVec,
    pub(crate) cache_reorgs: IntCounterVec,
    /// 1 from SIGTERM (or a hand-over) until the process exits.
    pub draining: IntGauge,
    sessions_drained: IntCounterVec,
    drain_late_lines: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("electrum_lb")
}

/// Latency buckets from 100 us to 30 s.
fn buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ]
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("unique metric");
                m
            }};
        }
        let hist = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help)
                    .namespace("electrum_lb")
                    .buckets(buckets()),
                labels,
            )
        };
        let m = Metrics {
            sessions_open: reg!(IntGaugeVec::new(
                opts("sessions_open", "Client sessions currently open."),
                &["coin", "transport"]
            )),
            sessions_total: reg!(IntCounterVec::new(
                opts("sessions_total", "Client sessions accepted."),
                &["coin", "transport"]
            )),
            requests: reg!(IntCounterVec::new(
                opts("requests_total", "Client requests answered, by method and outcome."),
                &["coin", "method", "outcome"]
            )),
            request_seconds: reg!(hist(
                "request_duration_seconds",
                "Time from a client request to its answer.",
                &["coin", "method"]
            )),
            errors: reg!(IntCounterVec::new(
                opts("errors_total", "Errors the proxy answered or closed a session for, by kind."),
                &["coin", "kind"]
            )),
            bytes_in: reg!(IntCounterVec::new(
                opts("client_received_bytes_total", "Bytes received from clients."),
                &["coin"]
            )),
            bytes_out: reg!(IntCounterVec::new(
                opts("client_sent_bytes_total", "Bytes sent to clients."),
                &["coin"]
            )),
            notifications: reg!(IntCounterVec::new(
                opts("notifications_total", "Subscription notifications written to clients."),
                &["coin"]
            )),
            upstream_up: reg!(IntGaugeVec::new(
                opts("upstream_up", "1 when the upstream is connected and in rotation."),
                &["coin", "upstream"]
            )),
            upstream_height: reg!(IntGaugeVec::new(
                opts("upstream_height", "Tip height last reported by the upstream."),
                &["coin", "upstream"]
            )),
            upstream_in_flight: reg!(IntGaugeVec::new(
                opts("upstream_in_flight", "Requests queued or awaiting an answer on the upstream."),
                &["coin", "upstream"]
            )),
            upstream_connections: reg!(IntGaugeVec::new(
                opts("upstream_connections", "Open connections to the upstream."),
                &["coin", "upstream"]
            )),
            upstream_throttled: reg!(IntGaugeVec::new(
                opts(
                    "upstream_throttled",
                    "1 while the upstream throttles us (a -101/-102 answer, a close with requests outstanding, or answers slowing while another upstream's do not, within the last 10 s)."
                ),
                &["coin", "upstream"]
            )),
            upstream_throttle_signals: reg!(IntCounterVec::new(
                opts(
                    "upstream_throttle_signals_total",
                    "Signals that an upstream throttles us, by kind: excessive_resource_usage (-101), server_busy (-102), disconnect, slow."
                ),
                &["coin", "upstream", "kind"]
            )),
            upstream_in_flight_limit: reg!(IntGaugeVec::new(
                opts(
                    "upstream_in_flight_limit",
                    "Requests the upstream's ready connections may have written and unanswered, as learned from its answer times (summed over connections)."
                ),
                &["coin", "upstream"]
            )),
            upstream_seconds: reg!(hist(
                "upstream_request_duration_seconds",
                "Time from writing a request to an upstream to its answer.",
                &["coin", "upstream"]
            )),
            subscriptions: reg!(IntGaugeVec::new(
                opts(
                    "subscriptions",
                    "Subscriptions held: distinct upstream subscriptions (kind=upstream), session subscriptions (kind=session), and statuses held after a failover because the new upstream reports another (kind=held)."
                ),
                &["coin", "kind"]
            )),
            session_subscriptions: reg!(IntGaugeVec::new(
                opts(
                    "session_subscriptions",
                    "Subscriptions held by sessions, by form: headers, numblocks, scripthash, address, scriptpubkey, outpoint."
                ),
                &["coin", "form"]
            )),
            sessions_by_level: reg!(IntGaugeVec::new(
                opts(
                    "sessions_by_protocol",
                    "Open client sessions by negotiated protocol level: none (never negotiated), legacy (below 1.3), 1.4 (1.3 to 1.5), 1.6, 1.7."
                ),
                &["coin", "level"]
            )),
            upstream_protocol: reg!(IntGaugeVec::new(
                opts(
                    "upstream_protocol_connections",
                    "Open upstream connections by the protocol level they negotiated."
                ),
                &["coin", "upstream", "level"]
            )),
            cache_requests: reg!(IntCounterVec::new(
                opts(
                    "cache_requests_total",
                    "Cacheable or coalescable requests: answered from memory (hit), sent upstream (miss), or joined an identical request in flight (coalesced)."
                ),
                &["coin", "result"]
            )),
            cache_entries: reg!(IntGaugeVec::new(
                opts("cache_entries", "Answers held in the cache."),
                &["coin"]
            )),
            cache_bytes: reg!(IntGaugeVec::new(
                opts("cache_bytes", "Bytes the cache holds, as counted against [cache] max_bytes."),
                &["coin"]
            )),
            cache_reorgs: reg!(IntCounterVec::new(
                opts("cache_reorgs_total", "Reorgs that dropped height-dependent cache entries."),
                &["coin"]
            )),
            draining: reg!(IntGauge::with_opts(opts(
                "draining",
                "1 while the process drains (SIGTERM or an in-place upgrade): /readyz answers 503."
            ))),
            sessions_drained: reg!(IntCounterVec::new(
                opts(
                    "sessions_drained_total",
                    "Sessions ended by a drain: once every request read was answered and written (how=idle), or still busy when shutdown_grace_secs ran out (how=deadline)."
                ),
                &["coin", "how"]
            )),
            drain_late_lines: reg!(IntCounterVec::new(
                opts(
                    "drain_late_lines_total",
                    "Lines a drained session received after it had closed its side: requests the client sent as the session ended, which it re-sends elsewhere."
                ),
                &["coin"]
            )),
            registry,
            journal: EventLog::new(),
        };
        let _ = m
            .registry
            .register(Box::new(TLS_HANDSHAKES_WAITING.clone()));
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        Arc::new(m)
    }

    /// The handle bundle of a coin. Per-method series are resolved on first
    /// use (so unused methods do not bloat every scrape) and never looked up
    /// again.
    pub fn coin(self: &Arc<Self>, coin: &str) -> Arc<CoinMetrics> {
        let requests = METHODS.iter().map(|_| OnceLock::new()).collect();
        let latency = METHODS.iter().map(|_| OnceLock::new()).collect();
        Arc::new(CoinMetrics {
            coin: coin.to_string(),
            registry: self.clone(),
            requests,
            latency,
            errors: ERROR_KINDS.map(|k| self.errors.with_label_values(&[coin, k])),
            bytes_in: self.bytes_in.with_label_values(&[coin]),
            bytes_out: self.bytes_out.with_label_values(&[coin]),
            notifications: self.notifications.with_label_values(&[coin]),
            sessions_by_level: LEVELS.map(|l| self.sessions_by_level.with_label_values(&[coin, l])),
            drained_idle: self.sessions_drained.with_label_values(&[coin, "idle"]),
            drained_deadline: self.sessions_drained.with_label_values(&[coin, "deadline"]),
            drain_late_lines: self.drain_late_lines.with_label_values(&[coin]),
            journal: self.journal.for_coin(coin),
        })
    }

    /// The text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Pre-resolved metric handles of one coin.
pub struct CoinMetrics {
    pub coin: String,
    registry: Arc<Metrics>,
    requests: Vec<OnceLock<[IntCounter; 3]>>,
    latency: Vec<OnceLock<Histogram>>,
    errors: [IntCounter; 6],
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub notifications: IntCounter,
    /// Open sessions by negotiated level (see [`LEVELS`]).
    pub sessions_by_level: [IntGauge; LEVELS.len()],
    /// Sessions a drain ended once idle / at the grace deadline.
    pub drained_idle: IntCounter,
    pub drained_deadline: IntCounter,
    /// Lines received by drained sessions after they closed their side.
    pub drain_late_lines: IntCounter,
    /// Where this coin's pool, hub and limits record events.
    pub journal: CoinEvents,
}

impl std::fmt::Debug for CoinMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoinMetrics")
            .field("coin", &self.coin)
            .finish()
    }
}

impl CoinMetrics {
    /// Record one answered client request.
    pub fn request(&self, method: u8, outcome: Outcome, elapsed: Duration) {
        let i = method as usize;
        let o = match outcome {
            Outcome::Ok => 0,
            Outcome::UpstreamError => 1,
            Outcome::ProxyError => 2,
        };
        let method = METHODS[i];
        let reg = &self.registry;
        self.requests[i].get_or_init(|| {
            OUTCOMES.map(|o| reg.requests.with_label_values(&[&self.coin, method, o]))
        })[o]
            .inc();
        self.latency[i]
            .get_or_init(|| reg.request_seconds.with_label_values(&[&self.coin, method]))
            .observe(elapsed.as_secs_f64());
    }

    /// Count an error the proxy produced.
    pub fn error(&self, code: ErrorCode) {
        self.errors[error_kind(code)].inc();
    }

    /// Count a session closed for an oversized line.
    pub fn limit_hit(&self) {
        self.errors[2].inc();
    }

    /// A session of this transport opened; the guard closes it.
    pub fn session_opened(&self, transport: &str) -> GaugeGuard {
        self.registry
            .sessions_total
            .with_label_values(&[&self.coin, transport])
            .inc();
        let open = self
            .registry
            .sessions_open
            .with_label_values(&[&self.coin, transport]);
        GaugeGuard::enter(&open)
    }

    /// The throttle-signal counters of one upstream, in
    /// `upstream::throttle::KINDS` order.
    pub fn throttle_signals(&self, upstream: &str) -> [IntCounter; 4] {
        crate::upstream::throttle::KINDS.map(|k| {
            self.registry
                .upstream_throttle_signals
                .with_label_values(&[&self.coin, upstream, k])
        })
    }

    /// The latency histogram of requests to one upstream.
    pub fn upstream_latency(&self, upstream: &str) -> Histogram {
        self.registry
            .upstream_seconds
            .with_label_values(&[&self.coin, upstream])
    }
}

/// One unit of a gauge for as long as it lives: counted in when made,
/// out when dropped, however its owner ends (an open session; a TLS
/// handshake waiting for a worker, even one cut by its timeout).
pub struct GaugeGuard {
    gauge: IntGauge,
}

impl GaugeGuard {
    pub fn enter(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard {
            gauge: gauge.clone(),
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

// ---- Scripthash reads and their kept answers (issue 14, `cache::answers`) ----
// Kept apart from the families above: registered per coin, with the coin as
// a constant label, by the cache's owner when the coin starts.

impl CoinMetrics {
    /// `electrum_lb_read_answers_total{coin, event}`: scripthash reads
    /// answered from memory, joined, sent upstream; answers kept, refused,
    /// dropped; read-driven subscriptions started and dropped (see
    /// [`crate::cache::ANSWER_EVENTS`]). Counted but not exported when the
    /// coin registered them already.
    pub fn read_answers(&self) -> crate::cache::AnswerCounters {
        let family = IntCounterVec::new(
            opts(
                "read_answers_total",
                "Scripthash reads (history, balance, unspent, mempool): answered from memory (hit), joined to an identical read in flight (join), sent upstream (miss); answers kept (store), not kept because their status was not the subscribers' (mismatch), dropped on a status change, failover or reorg (invalidate); read-driven subscriptions started (subscribe) and dropped (unsubscribe).",
            )
            .const_label("coin", &self.coin),
            &["event"],
        )
        .expect("valid metric");
        if let Err(e) = self.registry.registry.register(Box::new(family.clone())) {
            tracing::warn!(coin = %self.coin, "read answer counters not exported: {e}");
        }
        crate::cache::AnswerCounters::from_fn(|event| family.with_label_values(&[event]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_gauge_guard_counts_out_however_its_owner_ends() {
        let gauge = IntGauge::new("waiting", "test").unwrap();
        {
            let _one = GaugeGuard::enter(&gauge);
            let _two = GaugeGuard::enter(&gauge);
            assert_eq!(gauge.get(), 2);
        }
        assert_eq!(gauge.get(), 0);
        // A future dropped while it waits (a timeout) counts out too.
        let waiting = async {
            let _w = GaugeGuard::enter(&gauge);
            std::future::pending::<()>().await;
        };
        let cut = tokio::time::timeout(Duration::ZERO, waiting).await;
        assert!(cut.is_err());
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn unknown_methods_are_other() {
        assert_eq!(METHODS[method_index("server.ping") as usize], "server.ping");
        assert_eq!(METHODS[method_index("x.y.z") as usize], "other");
        assert_eq!(METHODS[method_index("") as usize], "other");
    }

    #[test]
    fn renders_with_prefix_and_labels() {
        let m = Metrics::new();
        let c = m.coin("btc");
        c.request(
            method_index("server.ping"),
            Outcome::Ok,
            Duration::from_millis(1),
        );
        c.error(ErrorCode::ParseError);
        let _g = c.session_opened("tcp");
        let text = m.render();
        assert!(text.contains(
            "electrum_lb_requests_total{coin=\"btc\",method=\"server.ping\",outcome=\"ok\"} 1"
        ));
        assert!(text.contains("electrum_lb_errors_total{coin=\"btc\",kind=\"parse\"} 1"));
        assert!(text.contains("electrum_lb_sessions_open{coin=\"btc\",transport=\"tcp\"} 1"));
        assert!(text.contains("electrum_lb_request_duration_seconds_bucket"));
    }
}
