//! Abuse limits at the edge: what one client, or one client network, may take.
//!
//! Owns: the `[limits]` settings and their validation, the process-wide count
//! of open client connections, the registry of client IP groups (a /24 for
//! IPv4 and a /48 for IPv6 by default, like ElectrumX's session groups) with
//! their session counts and shared token buckets, each session's own token
//! bucket ([`SessionGate`]), the cost of each method, the check of reply
//! sizes ([`ReplyLimits`]) and the `limit_hits_total` counters. It reads no
//! socket (that is `listener` and `session`) and routes nothing: the router
//! asks the session's gate before it routes each request.
//!
//! What each limit defends:
//! - `max_sessions`: file descriptors and memory of the whole process. Taken
//!   at accept, before any TLS or PROXY header, so half-open handshakes count.
//! - `max_sessions_per_group`: one network (a botnet in one /24, one host)
//!   holding every slot of `max_sessions`.
//! - the token buckets (`session_*`, `group_*`): upstream capacity. Each
//!   request costs points by method (a history costs fifty times a ping) plus
//!   one point per `bytes_per_point` received or sent, so a client that asks
//!   for huge histories pays for them. Over budget is a -32003 error; a
//!   client that keeps asking while refused (`max_refusals` in a row) is
//!   disconnected. The group bucket is shared by every session of a group,
//!   so opening more sessions buys no more upstream work.
//! - `max_in_flight`: the upstream pool's in-flight slots. A session with
//!   that many requests awaiting answers is not read until one is answered
//!   (as ElectrumX queues rather than refuses), so a wallet that fires all
//!   its subscriptions at once is slowed, never failed.
//! - `max_response_bytes`: the proxy's memory (a session's queue holds whole
//!   reply lines) and the client's own line limit. A larger reply is replaced
//!   by a -32003 error with the same id.
//!
//! `exempt` networks (loopback by default: monitoring, benchmarks, a local
//! TLS terminator) skip the group limit and the token buckets; every other
//! limit still applies to them. A local terminator should send a PROXY
//! header instead, so that limits see the real client.
//!
//! Layout: `config` the `[limits]` table; `group` IP groups and token
//! buckets; `gate` a session's decision on each request (and what each
//! method costs); `reply` reply sizes on the writer's side. This file holds
//! the process-wide and per-coin state and the connection permits.

mod config;
mod gate;
mod group;
mod reply;
#[cfg(test)]
mod tests;

pub use config::{deserialize_checked, LimitsConfig};
pub use gate::{method_cost, Refusal, SessionGate};
pub use group::{canonical, GroupKey};
pub use reply::{oversized_reply, ReplyLimits};

use config::{parse_net, Net};
use group::{Bucket, Group, Registry, SWEEP_EVERY};

use crate::jsonrpc::{self, ErrorCode, Line, RpcError};
use crate::metrics::CoinMetrics;
use arc_swap::{ArcSwap, Guard};
use prometheus::{IntCounter, IntCounterVec, Opts};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Which limit was hit: the `limit` label of `limit_hits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_sessions`: refused at accept.
    Sessions,
    /// `max_sessions_per_group`: refused at accept.
    GroupSessions,
    /// A request refused by a token bucket.
    Rate,
    /// Disconnected after `max_refusals` refusals in a row.
    Abuse,
    /// Reading paused at `max_in_flight`.
    InFlight,
    /// A batch over `[server] max_batch`.
    Batch,
    /// A line over `[server] max_line_bytes`.
    Line,
    /// A reply over `max_response_bytes`.
    Response,
    /// No line within `[server] idle_timeout_secs`.
    Idle,
    /// No first line within `[server] handshake_timeout_secs`.
    FirstLine,
    /// No TLS handshake within `[server] handshake_timeout_secs`.
    Handshake,
    /// A PROXY header missing, malformed or late.
    ProxyHeader,
}

const LIMITS: [Limit; 12] = [
    Limit::Sessions,
    Limit::GroupSessions,
    Limit::Rate,
    Limit::Abuse,
    Limit::InFlight,
    Limit::Batch,
    Limit::Line,
    Limit::Response,
    Limit::Idle,
    Limit::FirstLine,
    Limit::Handshake,
    Limit::ProxyHeader,
];

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Sessions => "sessions",
            Limit::GroupSessions => "group_sessions",
            Limit::Rate => "rate",
            Limit::Abuse => "abuse",
            Limit::InFlight => "in_flight",
            Limit::Batch => "batch",
            Limit::Line => "line",
            Limit::Response => "response",
            Limit::Idle => "idle",
            Limit::FirstLine => "first_line",
            Limit::Handshake => "handshake",
            Limit::ProxyHeader => "proxy_header",
        }
    }
}

/// The process-wide state of the limits: shared by every coin.
#[derive(Debug)]
pub struct Limits {
    /// Swapped whole by a reload: new connections and the next request of
    /// every session see the new values.
    config: ArcSwap<LimitsConfig>,
    exempt: ArcSwap<Vec<Net>>,
    /// Client connections open now (accepted and not yet closed).
    open: AtomicUsize,
    registry: Mutex<Registry>,
    hits: IntCounterVec,
}

/// The exempt networks of a checked configuration.
fn exempt_nets(config: &LimitsConfig) -> Vec<Net> {
    config
        .exempt
        .iter()
        .filter_map(|n| parse_net(n).ok())
        .collect()
}

impl Limits {
    /// The limits of a checked configuration; `limit_hits_total` is
    /// registered in `registry`.
    pub fn new(config: &LimitsConfig, registry: &prometheus::Registry) -> Arc<Limits> {
        let hits = IntCounterVec::new(
            Opts::new(
                "limit_hits_total",
                "Connections refused or closed, requests refused and reads paused by a limit, by limit.",
            )
            .namespace("electrum_lb"),
            &["coin", "limit"],
        )
        .expect("valid metric");
        // A second registration (two proxies on one registry) keeps the first.
        let _ = registry.register(Box::new(hits.clone()));
        Arc::new(Limits {
            exempt: ArcSwap::from_pointee(exempt_nets(config)),
            config: ArcSwap::from_pointee(config.clone()),
            open: AtomicUsize::new(0),
            registry: Mutex::new(Registry {
                groups: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            hits,
        })
    }

    /// The limits in force now.
    pub fn config(&self) -> Guard<Arc<LimitsConfig>> {
        self.config.load()
    }

    /// Apply a new (checked) `[limits]` table: connections accepted from now
    /// on, and every session's next request, are judged by it. Sessions over
    /// a lowered `max_sessions` or per-group limit are not closed; IP groups
    /// already formed keep their key if the group sizes change.
    pub fn reload(&self, config: &LimitsConfig) {
        self.exempt.store(Arc::new(exempt_nets(config)));
        self.config.store(Arc::new(config.clone()));
    }

    /// The handles one coin's listeners and sessions use.
    pub fn for_coin(self: &Arc<Self>, metrics: Arc<CoinMetrics>) -> Arc<CoinLimits> {
        let hits = LIMITS.map(|l| self.hits.with_label_values(&[&metrics.coin, l.label()]));
        Arc::new(CoinLimits {
            limits: self.clone(),
            metrics,
            hits,
        })
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// `limit_hits_total` now: `(coin, limit, hits)` for every series that
    /// exists (the status page sums refusals from these, never per request).
    pub fn hit_counts(&self) -> Vec<(String, String, u64)> {
        use prometheus::core::Collector;
        let mut out = Vec::new();
        for family in self.hits.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                out.push((
                    label("coin"),
                    label("limit"),
                    m.get_counter().get_value() as u64,
                ));
            }
        }
        out
    }

    /// IP groups remembered now (with sessions, or a bucket still refilling).
    pub fn groups(&self) -> usize {
        self.lock().groups.len()
    }

    /// Whether `ip` is in an exempt network.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.load().iter().any(|n| n.contains(ip))
    }

    pub fn group_of(&self, ip: IpAddr) -> GroupKey {
        let c = self.config.load();
        GroupKey::of(ip, c.ipv4_group_bits, c.ipv6_group_bits)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count one more session in the group of `ip`, unless it is full.
    fn join(&self, key: GroupKey) -> Option<Arc<Group>> {
        let now = Instant::now();
        let c = self.config.load();
        let mut reg = self.lock();
        if now.saturating_duration_since(reg.last_sweep) >= SWEEP_EVERY {
            reg.last_sweep = now;
            let (rate, burst) = (c.group_rate, c.group_burst);
            reg.groups.retain(|_, g| {
                if g.sessions.load(Ordering::Relaxed) > 0 {
                    return true;
                }
                let mut b = g.bucket.lock().unwrap_or_else(|p| p.into_inner());
                b.refill(now, rate, burst);
                b.tokens < burst
            });
        }
        let group = reg
            .groups
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Group {
                    sessions: AtomicUsize::new(0),
                    bucket: Mutex::new(Bucket::full(c.group_burst, now)),
                })
            })
            .clone();
        if group.sessions.load(Ordering::Relaxed) >= c.max_sessions_per_group {
            return None;
        }
        group.sessions.fetch_add(1, Ordering::Relaxed);
        Some(group)
    }
}

/// One coin's view of the limits: the shared state plus its counters.
pub struct CoinLimits {
    pub limits: Arc<Limits>,
    metrics: Arc<CoinMetrics>,
    hits: [IntCounter; LIMITS.len()],
}

impl fmt::Debug for CoinLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoinLimits")
            .field("coin", &self.metrics.coin)
            .finish()
    }
}

impl CoinLimits {
    /// A slot for a newly accepted connection, or `None` at `max_sessions`
    /// (the caller closes the connection).
    pub fn connection(self: &Arc<Self>) -> Option<ConnPermit> {
        let max = self.limits.config.load().max_sessions;
        let taken = self
            .limits
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(ConnPermit { coin: self.clone() }),
            Err(_) => {
                self.refused(Limit::Sessions);
                None
            }
        }
    }

    /// Count a limit hit (`limit_hits_total` only).
    pub fn hit(&self, limit: Limit) {
        self.hits[LIMITS.iter().position(|l| *l == limit).unwrap_or(0)].inc();
    }

    /// Count a limit hit that refused or closed something without a
    /// JSON-RPC reply being counted elsewhere: also `errors_total{kind="limit"}`.
    pub fn refused(&self, limit: Limit) {
        self.hit(limit);
        self.metrics.limit_hit();
    }

    pub fn config(&self) -> Guard<Arc<LimitsConfig>> {
        self.limits.config()
    }
}

/// A slot among `max_sessions`, held from accept until the connection ends.
#[derive(Debug)]
pub struct ConnPermit {
    coin: Arc<CoinLimits>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.coin.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection refused because its IP group is full. It keeps its slot
/// while the refusal is written.
#[derive(Debug)]
pub struct GroupFull {
    pub permit: ConnPermit,
    pub group: GroupKey,
}

impl GroupFull {
    /// The error line a plain-TCP client is sent before the close.
    pub fn error_line(&self) -> Line {
        let max = self.permit.coin.config().max_sessions_per_group;
        jsonrpc::error_line(
            jsonrpc::NULL_ID,
            &RpcError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "too many sessions from your network {} (limit {max}): closing the connection",
                    self.group
                ),
            ),
        )
    }
}

impl ConnPermit {
    /// The coin whose listener accepted the connection.
    pub fn coin(&self) -> &Arc<CoinLimits> {
        &self.coin
    }

    /// Admit the client at `ip` (the real client, after any PROXY header)
    /// into its group.
    pub fn admit(self, ip: IpAddr) -> Result<SessionGate, GroupFull> {
        let limits = self.coin.limits.clone();
        let bytes = Arc::new(AtomicU64::new(0));
        if limits.is_exempt(ip) {
            return Ok(SessionGate {
                permit: Some(self),
                group: None,
                bucket: None,
                refusals: 0,
                bytes,
            });
        }
        let key = limits.group_of(ip);
        match limits.join(key) {
            Some(group) => Ok(SessionGate {
                bucket: Some(Bucket::full(limits.config().session_burst, Instant::now())),
                permit: Some(self),
                group: Some((key, group)),
                refusals: 0,
                bytes,
            }),
            None => {
                self.coin.refused(Limit::GroupSessions);
                Err(GroupFull {
                    permit: self,
                    group: key,
                })
            }
        }
    }
}
