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

use crate::jsonrpc::{self, ErrorCode, Line, RpcError};
use crate::metrics::CoinMetrics;
use arc_swap::{ArcSwap, Guard};
use prometheus::{IntCounter, IntCounterVec, Opts};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `[limits]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections open at once, over every coin and listener
    /// (TLS handshakes and PROXY headers in progress included).
    pub max_sessions: usize,
    /// Client connections open at once from one IP group.
    pub max_sessions_per_group: usize,
    /// Prefix length that groups IPv4 clients (24: one /24 is one group).
    pub ipv4_group_bits: u8,
    /// Prefix length that groups IPv6 clients (48: one /48 is one group).
    pub ipv6_group_bits: u8,
    /// Networks (CIDR) exempt from the group limit and the token buckets.
    pub exempt: Vec<String>,
    /// Points per second refilled into each session's bucket.
    pub session_rate: f64,
    /// Capacity of each session's bucket, in points.
    pub session_burst: f64,
    /// Points per second refilled into each IP group's shared bucket.
    pub group_rate: f64,
    /// Capacity of each IP group's shared bucket, in points.
    pub group_burst: f64,
    /// Bytes received or sent that cost one point.
    pub bytes_per_point: u64,
    /// Refused requests in a row after which a session is disconnected.
    pub max_refusals: u32,
    /// Requests (or batches) of one session awaiting an answer before the
    /// session is no longer read.
    pub max_in_flight: usize,
    /// Largest reply line relayed to a client; larger ones become errors.
    pub max_response_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 20_000,
            max_sessions_per_group: 200,
            ipv4_group_bits: 24,
            ipv6_group_bits: 48,
            exempt: vec!["127.0.0.0/8".into(), "::1/128".into()],
            // 500 headers or 100 histories a second, after a burst worth a
            // large wallet's first synchronisation.
            session_rate: 5_000.0,
            session_burst: 100_000.0,
            group_rate: 20_000.0,
            group_burst: 400_000.0,
            bytes_per_point: 1024,
            max_refusals: 100,
            max_in_flight: 100,
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

impl LimitsConfig {
    /// Reject contradictions, naming the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((format!("limits.{k}"), r.to_string()));
        let at_least_one = [
            ("max_sessions", self.max_sessions),
            ("max_sessions_per_group", self.max_sessions_per_group),
            ("max_in_flight", self.max_in_flight),
            ("bytes_per_point", self.bytes_per_point as usize),
            ("max_refusals", self.max_refusals as usize),
        ];
        for (k, v) in at_least_one {
            if v == 0 {
                return err(k, "must be at least 1");
            }
        }
        if self.ipv4_group_bits > 32 {
            return err("ipv4_group_bits", "must be at most 32");
        }
        if self.ipv6_group_bits > 128 {
            return err("ipv6_group_bits", "must be at most 128");
        }
        let rates = [
            ("session_rate", self.session_rate),
            ("session_burst", self.session_burst),
            ("group_rate", self.group_rate),
            ("group_burst", self.group_burst),
        ];
        for (k, v) in rates {
            if !(v.is_finite() && v > 0.0) {
                return err(k, "must be a positive number");
            }
        }
        if self.max_response_bytes < 1024 {
            return err("max_response_bytes", "must be at least 1024");
        }
        for (i, net) in self.exempt.iter().enumerate() {
            if let Err(e) = parse_net(net) {
                return Err((format!("limits.exempt[{i}]"), e));
            }
        }
        Ok(())
    }
}

/// `deserialize_with` for the `[limits]` field of the config: the table,
/// checked, so a contradiction is reported like any other config error.
pub fn deserialize_checked<'de, D: Deserializer<'de>>(d: D) -> Result<LimitsConfig, D::Error> {
    let config = LimitsConfig::deserialize(d)?;
    config
        .validate()
        .map_err(|(key, reason)| serde::de::Error::custom(format!("{key}: {reason}")))?;
    Ok(config)
}

/// `ADDR/BITS` (or a bare address: all its bits).
fn parse_net(s: &str) -> Result<Net, String> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a network such as 10.0.0.0/8"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => b
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|b| *b <= max)
            .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        None => max,
    };
    Ok(Net {
        key: GroupKey::of(ip, bits, bits),
        bits,
    })
}

/// A network, as the key of its first address.
#[derive(Debug, Clone, Copy)]
struct Net {
    key: GroupKey,
    bits: u8,
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        GroupKey::of(ip, self.bits, self.bits) == self.key
    }
}

/// One client IP group: the address with only its group prefix kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKey {
    V4(u32, u8),
    V6(u128, u8),
}

impl GroupKey {
    /// The group of `ip` (an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> GroupKey {
        fn mask32(bits: u8) -> u32 {
            u32::MAX.checked_shl(32 - bits.min(32) as u32).unwrap_or(0)
        }
        fn mask128(bits: u8) -> u128 {
            u128::MAX
                .checked_shl(128 - bits.min(128) as u32)
                .unwrap_or(0)
        }
        match canonical(ip) {
            IpAddr::V4(a) => GroupKey::V4(u32::from(a) & mask32(v4_bits), v4_bits.min(32)),
            IpAddr::V6(a) => GroupKey::V6(u128::from(a) & mask128(v6_bits), v6_bits.min(128)),
        }
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupKey::V4(a, b) => write!(f, "{}/{b}", std::net::Ipv4Addr::from(*a)),
            GroupKey::V6(a, b) => write!(f, "{}/{b}", std::net::Ipv6Addr::from(*a)),
        }
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack listener) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
        v4 => v4,
    }
}

/// The cost of one request, in points, before its bytes are counted.
pub fn method_cost(method: &str) -> f64 {
    match method {
        // Answered by the proxy itself.
        "server.version"
        | "server.ping"
        | "server.banner"
        | "server.features"
        | "server.donation_address"
        | "server.peers.subscribe"
        | "server.add_peer" => 1.0,
        // One lookup upstream (or a shared subscription).
        "blockchain.headers.subscribe"
        | "blockchain.numblocks.subscribe"
        | "blockchain.block.header"
        | "blockchain.block.get_header"
        | "blockchain.estimatefee"
        | "blockchain.relayfee"
        | "mempool.get_fee_histogram"
        | "mempool.get_info"
        | "blockchain.scripthash.unsubscribe"
        | "blockchain.address.unsubscribe" => 10.0,
        // An index lookup, or a status that needs a history upstream.
        "blockchain.transaction.get"
        | "blockchain.transaction.get_merkle"
        | "blockchain.transaction.id_from_pos"
        | "blockchain.scripthash.subscribe"
        | "blockchain.address.subscribe"
        | "blockchain.scripthash.get_balance"
        | "blockchain.address.get_balance" => 20.0,
        // Whole histories, unspent sets, header chunks.
        "blockchain.scripthash.get_history"
        | "blockchain.address.get_history"
        | "blockchain.scripthash.get_mempool"
        | "blockchain.address.get_mempool"
        | "blockchain.scripthash.listunspent"
        | "blockchain.address.listunspent"
        | "blockchain.block.headers"
        | "blockchain.block.get_chunk" => 50.0,
        "blockchain.transaction.broadcast" => 100.0,
        // Unknown methods (forwarded, answered with an error) and lines
        // that are not requests at all.
        _ => 10.0,
    }
}

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

/// A token bucket in points; it may go below zero when bytes are charged
/// after the fact (never below minus its capacity).
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.last = now;
    }

    fn charge(&mut self, points: f64, burst: f64) {
        self.tokens = (self.tokens - points).max(-burst);
    }

    /// Time until `cost` points are available.
    fn wait(&self, cost: f64, rate: f64) -> Duration {
        Duration::from_secs_f64(((cost - self.tokens) / rate).clamp(0.0, 3600.0))
    }
}

/// One IP group: its open sessions and its shared bucket.
#[derive(Debug)]
struct Group {
    sessions: AtomicUsize,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Registry {
    groups: HashMap<GroupKey, Arc<Group>>,
    last_sweep: Instant,
}

/// Groups without sessions are forgotten once their bucket has refilled;
/// the registry is swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

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

/// A request the gate refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: RpcError,
    /// Too many refusals in a row: close the session after this reply.
    pub disconnect: bool,
}

/// What one session may still do: its bucket, its group's, its slot.
/// Held by the session's state; dropping it frees the slots.
#[derive(Debug)]
pub struct SessionGate {
    /// `None` only for the unlimited gate of tests and internal sessions.
    permit: Option<ConnPermit>,
    /// `None` for exempt clients.
    group: Option<(GroupKey, Arc<Group>)>,
    bucket: Option<Bucket>,
    refusals: u32,
    /// Bytes received and sent not yet charged (the writer adds to it).
    bytes: Arc<AtomicU64>,
}

impl Drop for SessionGate {
    fn drop(&mut self) {
        if let Some((_, g)) = &self.group {
            g.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl SessionGate {
    /// A gate that refuses nothing and counts nothing.
    pub fn unlimited() -> SessionGate {
        SessionGate {
            permit: None,
            group: None,
            bucket: None,
            refusals: 0,
            bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    fn coin(&self) -> Option<&Arc<CoinLimits>> {
        self.permit.as_ref().map(|p| &p.coin)
    }

    /// Count a limit hit on this session's coin (`limit_hits_total`).
    pub fn hit(&self, limit: Limit) {
        if let Some(c) = self.coin() {
            c.hit(limit);
        }
    }

    /// Count a limit that closes or refuses without a counted reply.
    pub fn refused(&self, limit: Limit) {
        if let Some(c) = self.coin() {
            c.refused(limit);
        }
    }

    /// Requests of this session awaiting answers before reading pauses.
    pub fn max_in_flight(&self) -> usize {
        self.coin()
            .map(|c| c.config().max_in_flight)
            .unwrap_or(usize::MAX)
    }

    /// The IP group the session counts in (`None` when exempt).
    pub fn group(&self) -> Option<GroupKey> {
        self.group.as_ref().map(|(k, _)| *k)
    }

    /// Count a line of `n` bytes received (charged at the next request).
    pub fn received(&self, n: usize) {
        if self.bucket.is_some() {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Decide on one request of `method`, charging the bytes received and
    /// sent since the last one.
    pub fn admit(&mut self, method: &str) -> Result<(), Refusal> {
        let (Some(coin), Some(bucket), Some((key, group))) =
            (self.coin(), self.bucket.as_ref(), self.group.as_ref())
        else {
            return Ok(());
        };
        let c = coin.config();
        let (key, group, mut bucket) = (*key, group.clone(), bucket.clone());
        let now = Instant::now();
        let bytes = self.bytes.swap(0, Ordering::Relaxed);
        let debt = (bytes / c.bytes_per_point) as f64;
        // Keep the remainder for next time so small lines add up.
        self.bytes
            .fetch_add(bytes % c.bytes_per_point, Ordering::Relaxed);
        // A request dearer than a bucket can hold needs a full bucket.
        let cost = method_cost(method);
        bucket.refill(now, c.session_rate, c.session_burst);
        bucket.charge(debt, c.session_burst);
        let session_cost = cost.min(c.session_burst);
        let mut refused = None;
        {
            let mut g = group.bucket.lock().unwrap_or_else(|p| p.into_inner());
            g.refill(now, c.group_rate, c.group_burst);
            g.charge(debt, c.group_burst);
            let group_cost = cost.min(c.group_burst);
            if bucket.tokens < session_cost {
                refused = Some(format!(
                    "request rate limit exceeded for this session: retry in {} ms",
                    bucket.wait(session_cost, c.session_rate).as_millis().max(1)
                ));
            } else if g.tokens < group_cost {
                refused = Some(format!(
                    "request rate limit exceeded for your network {key}: retry in {} ms",
                    g.wait(group_cost, c.group_rate).as_millis().max(1)
                ));
            } else {
                g.tokens -= group_cost;
                bucket.tokens -= session_cost;
            }
        }
        let max_refusals = c.max_refusals;
        self.bucket = Some(bucket);
        let Some(message) = refused else {
            self.refusals = 0;
            return Ok(());
        };
        self.refusals += 1;
        self.hit(Limit::Rate);
        let disconnect = self.refusals >= max_refusals;
        let message = if disconnect {
            self.hit(Limit::Abuse);
            format!("{message}; {max_refusals} requests refused in a row: closing the connection")
        } else {
            message
        };
        Err(Refusal {
            error: RpcError::new(ErrorCode::LimitExceeded, message),
            disconnect,
        })
    }

    /// What the session's writer needs: the reply size limit and where to
    /// count the bytes it sends.
    pub fn reply_limits(&self) -> ReplyLimits {
        ReplyLimits {
            max_bytes: self
                .coin()
                .map(|c| c.config().max_response_bytes)
                .unwrap_or(usize::MAX),
            bytes: self.bytes.clone(),
            coin: self.coin().cloned(),
        }
    }
}

/// The writer's side of a session's limits.
#[derive(Debug)]
pub struct ReplyLimits {
    max_bytes: usize,
    bytes: Arc<AtomicU64>,
    coin: Option<Arc<CoinLimits>>,
}

impl ReplyLimits {
    /// The line to write instead of `line`: itself, an error (or a batch of
    /// errors) with the same ids when it is too large, or nothing for a
    /// notification too large to relay.
    pub fn check(&self, line: Line) -> Option<Line> {
        if line.len() <= self.max_bytes {
            return Some(line);
        }
        if let Some(c) = &self.coin {
            c.refused(Limit::Response);
        }
        tracing::debug!(
            bytes = line.len(),
            max = self.max_bytes,
            "reply too large: replaced by an error"
        );
        oversized_reply(&line, self.max_bytes)
    }

    /// Count bytes written to the client (charged at its next request).
    pub fn sent(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The replacement of a reply line larger than `max` bytes: an error with
/// the reply's id, a batch of errors for a batch reply, nothing for a
/// notification (nobody asked for it, so nobody waits for it).
pub fn oversized_reply(line: &[u8], max: usize) -> Option<Line> {
    #[derive(Deserialize)]
    struct Member<'a> {
        #[serde(default, borrow)]
        id: Option<&'a RawValue>,
        #[serde(default, borrow)]
        method: Option<&'a RawValue>,
    }
    let err = RpcError::new(
        ErrorCode::LimitExceeded,
        format!(
            "response of {} bytes exceeds the limit of {max} bytes",
            line.len()
        ),
    );
    let text = std::str::from_utf8(line).ok();
    let first = text.and_then(|t| t.trim_start().bytes().next());
    if first == Some(b'[') {
        let members: Vec<Member> = text
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let errors: Vec<Line> = members
            .iter()
            .filter_map(|m| m.id)
            .map(|id| jsonrpc::error_line(id.get(), &err))
            .collect();
        if errors.is_empty() {
            return Some(jsonrpc::error_line(jsonrpc::NULL_ID, &err));
        }
        return Some(jsonrpc::batch_line(errors));
    }
    match text.and_then(|t| serde_json::from_str::<Member>(t).ok()) {
        Some(Member {
            id: None,
            method: Some(_),
        }) => None,
        Some(Member { id: Some(id), .. }) => Some(jsonrpc::error_line(id.get(), &err)),
        _ => Some(jsonrpc::error_line(jsonrpc::NULL_ID, &err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn coin(config: LimitsConfig) -> Arc<CoinLimits> {
        let m = crate::metrics::Metrics::new();
        let limits = Limits::new(&config, &m.registry);
        limits.for_coin(m.coin("t"))
    }

    fn strict() -> LimitsConfig {
        LimitsConfig {
            exempt: vec![],
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn groups_are_prefixes() {
        let g = |s| GroupKey::of(ip(s), 24, 48);
        assert_eq!(g("203.0.113.7"), g("203.0.113.200"));
        assert_ne!(g("203.0.113.7"), g("203.0.114.7"));
        assert_eq!(g("2001:db8:1:2::1"), g("2001:db8:1:ffff::9"));
        assert_ne!(g("2001:db8:1::1"), g("2001:db8:2::1"));
        // A dual-stack listener sees IPv4 clients as mapped addresses.
        assert_eq!(g("::ffff:203.0.113.9"), g("203.0.113.1"));
        assert_eq!(g("203.0.113.7").to_string(), "203.0.113.0/24");
        assert_eq!(g("2001:db8:1:2::1").to_string(), "2001:db8:1::/48");
        // Edges: no bits is one group for everyone, all bits one per host.
        assert_eq!(
            GroupKey::of(ip("1.2.3.4"), 0, 0),
            GroupKey::of(ip("9.9.9.9"), 0, 0)
        );
        assert_ne!(
            GroupKey::of(ip("1.2.3.4"), 32, 128),
            GroupKey::of(ip("1.2.3.5"), 32, 128)
        );
    }

    #[test]
    fn exempt_networks() {
        let n = parse_net("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.200.1.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(parse_net("::1").unwrap().contains(ip("::1")));
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("nonsense/8").is_err());
    }

    #[test]
    fn defaults_validate_and_contradictions_name_the_key() {
        LimitsConfig::default().validate().unwrap();
        let bad = LimitsConfig {
            session_rate: 0.0,
            ..LimitsConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "limits.session_rate");
        let bad = LimitsConfig {
            exempt: vec!["10.0.0.0/8".into(), "x".into()],
            ..LimitsConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "limits.exempt[1]");
    }

    #[test]
    fn histories_cost_more_than_pings() {
        assert!(method_cost("blockchain.scripthash.get_history") > method_cost("server.ping"));
        assert!(
            method_cost("blockchain.transaction.broadcast")
                > method_cost("blockchain.block.header")
        );
        assert_eq!(method_cost("no.such.method"), 10.0);
    }

    #[test]
    fn total_and_group_sessions() {
        let c = coin(LimitsConfig {
            max_sessions: 3,
            max_sessions_per_group: 2,
            ..strict()
        });
        let a = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
        let b = c.connection().unwrap().admit(ip("198.51.100.2")).unwrap();
        let full = c
            .connection()
            .unwrap()
            .admit(ip("198.51.100.3"))
            .unwrap_err();
        assert_eq!(full.group.to_string(), "198.51.100.0/24");
        let line = String::from_utf8(full.error_line()).unwrap();
        assert!(
            line.contains("-32003") && line.contains("198.51.100.0/24"),
            "{line}"
        );
        // The refused connection still holds its slot until it is closed.
        assert!(c.connection().is_none());
        drop(full);
        let other = c.connection().unwrap().admit(ip("192.0.2.1")).unwrap();
        assert_eq!(c.limits.open_connections(), 3);
        assert!(c.connection().is_none());
        drop(a);
        let again = c.connection().unwrap().admit(ip("198.51.100.4")).unwrap();
        drop((b, other, again));
        assert_eq!(c.limits.open_connections(), 0);
    }

    #[test]
    fn buckets_refuse_then_disconnect() {
        let c = coin(LimitsConfig {
            session_rate: 0.001,
            session_burst: 100.0,
            max_refusals: 3,
            ..strict()
        });
        let mut g = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
        // Two histories (50 points each) fit, the third does not.
        g.admit("blockchain.scripthash.get_history").unwrap();
        g.admit("blockchain.scripthash.get_history").unwrap();
        let r = g.admit("blockchain.scripthash.get_history").unwrap_err();
        assert_eq!(r.error.code, ErrorCode::LimitExceeded);
        assert!(!r.disconnect);
        assert!(
            r.error.message.contains("this session"),
            "{}",
            r.error.message
        );
        assert!(g.admit("server.ping").is_err());
        let r = g.admit("server.ping").unwrap_err();
        assert!(r.disconnect, "{r:?}");
        assert!(r.error.message.contains("closing"), "{}", r.error.message);
    }

    #[test]
    fn bytes_are_charged() {
        let c = coin(LimitsConfig {
            session_rate: 0.001,
            session_burst: 100.0,
            bytes_per_point: 1000,
            ..strict()
        });
        let mut g = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
        // 95 KB of replies leave 5 points: one ping fits, a header does not.
        g.reply_limits().sent(95_000);
        g.admit("server.ping").unwrap();
        assert!(g.admit("blockchain.block.header").is_err());
    }

    #[test]
    fn the_group_bucket_is_shared() {
        let c = coin(LimitsConfig {
            group_rate: 0.001,
            group_burst: 30.0,
            ..strict()
        });
        let mut a = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
        let mut b = c.connection().unwrap().admit(ip("198.51.100.2")).unwrap();
        a.admit("blockchain.block.header").unwrap();
        a.admit("blockchain.block.header").unwrap();
        b.admit("blockchain.block.header").unwrap();
        let r = b.admit("blockchain.block.header").unwrap_err();
        assert!(
            r.error.message.contains("198.51.100.0/24"),
            "{}",
            r.error.message
        );
        // Another network is not affected.
        let mut other = c.connection().unwrap().admit(ip("192.0.2.1")).unwrap();
        other.admit("blockchain.block.header").unwrap();
    }

    #[test]
    fn exempt_clients_skip_groups_and_buckets() {
        let c = coin(LimitsConfig {
            max_sessions_per_group: 1,
            session_rate: 0.001,
            session_burst: 10.0,
            ..LimitsConfig::default()
        });
        let mut a = c.connection().unwrap().admit(ip("127.0.0.1")).unwrap();
        let _b = c.connection().unwrap().admit(ip("127.0.0.2")).unwrap();
        for _ in 0..100 {
            a.admit("blockchain.scripthash.get_history").unwrap();
        }
        assert_eq!(a.group(), None);
        assert_eq!(c.limits.groups(), 0);
    }

    #[test]
    fn oversized_replies_keep_their_ids() {
        let big = format!(
            r#"{{"jsonrpc":"2.0","result":"{}","id":"a\"b"}}"#,
            "x".repeat(100)
        );
        let line = String::from_utf8(oversized_reply(big.as_bytes(), 50).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], "a\"b");
        assert_eq!(v["error"]["code"], -32003);
        let batch = format!(
            r#"[{{"jsonrpc":"2.0","result":"{}","id":1}},{{"jsonrpc":"2.0","result":2,"id":2}}]"#,
            "x".repeat(100)
        );
        let line = String::from_utf8(oversized_reply(batch.as_bytes(), 50).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v[0]["id"], 1);
        assert_eq!(v[1]["id"], 2);
        assert_eq!(v[1]["error"]["code"], -32003);
        let note = r#"{"jsonrpc":"2.0","method":"blockchain.headers.subscribe","params":[{}]}"#;
        assert_eq!(oversized_reply(note.as_bytes(), 10), None);
        let junk = oversized_reply(b"\xff not json", 5).unwrap();
        assert!(String::from_utf8(junk).unwrap().contains("\"id\":null"));
    }
}
