//! The TOML configuration: schema, defaults, loading and validation.
//!
//! Owns: turning a file into a checked [`Config`]. Every error names the file,
//! the key and the reason. It does not open sockets or read certificates
//! (that is `tls` and `app`); `validate` only checks what can be known from
//! the text itself.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Certificate and key for every `ssl://` listener.
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub server: ServerConfig,
    /// `[limits]`: abuse limits at the edge, checked as they are read.
    #[serde(default, deserialize_with = "crate::limits::deserialize_checked")]
    pub limits: crate::limits::LimitsConfig,
    #[serde(default)]
    pub coins: BTreeMap<String, CoinConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// `[cache]`: immutable answers kept in memory, per coin (see `cache`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Serve immutable answers from memory (coalescing stays on regardless).
    pub enabled: bool,
    /// Bytes each coin's cache may hold (keys, results and per-entry overhead).
    pub max_bytes: u64,
    /// Headers and proofs are cached once this many blocks below the tip.
    pub reorg_margin: u64,
    /// Seconds fee estimates are served from memory.
    pub fee_ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            reorg_margin: 6,
            fee_ttl_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Side HTTP port for `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> SocketAddr {
    "127.0.0.1:9105".parse().expect("valid literal")
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first. Relative paths are resolved against
    /// the working directory.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Process-wide session and timing settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Longest accepted line from a client, in bytes.
    pub max_line_bytes: usize,
    /// Messages queued for one client before it is considered too slow and
    /// disconnected.
    pub session_queue: usize,
    /// Seconds a forwarded request may wait for its upstream answer.
    pub request_timeout_secs: u64,
    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds a new connection gets for its TLS handshake and first line.
    pub handshake_timeout_secs: u64,
    /// Seconds without any request after which a session is closed.
    pub idle_timeout_secs: u64,
    /// Most members accepted in one batch.
    pub max_batch: usize,
    /// Seconds of silence on an upstream connection before a `server.ping`.
    pub upstream_ping_secs: u64,
    /// Seconds an upstream connection may stay silent with a request
    /// outstanding before it is declared stalled and its requests retried.
    pub upstream_stall_secs: u64,
    /// Seconds allowed to connect (and finish TLS) to an upstream.
    pub upstream_connect_timeout_secs: u64,
    /// Seconds an extra upstream connection (beyond `min_connections`) may
    /// stay idle before it is closed.
    pub upstream_idle_close_secs: u64,
    /// Milliseconds between two health checks of the upstreams.
    pub health_interval_ms: u64,
    /// Good health checks in a row before an upstream returns to rotation.
    pub health_rise: u32,
    /// Bad health checks in a row before an upstream leaves rotation.
    pub health_fall: u32,
    /// Milliseconds a scripthash status is held after its subscription
    /// moved to another upstream that reports a different status (which may
    /// only lag behind: its mempool has not seen a payment yet) before the
    /// new status is announced. 0 announces at once. Capped at half of
    /// `request_timeout_secs`, since reads of that scripthash wait for it.
    pub failover_hold_ms: u64,
    /// Longest wait between two attempts to reach an upstream that is
    /// down: the delay starts at 200 ms and doubles up to this (+-25%).
    pub upstream_reconnect_max_ms: u64,
    /// Software name reported by `server.version` and `server.features`.
    pub server_name: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_line_bytes: 1024 * 1024,
            session_queue: 1024,
            request_timeout_secs: 30,
            shutdown_grace_secs: 10,
            handshake_timeout_secs: 20,
            idle_timeout_secs: 600,
            max_batch: 500,
            upstream_ping_secs: 60,
            upstream_stall_secs: 20,
            upstream_connect_timeout_secs: 10,
            upstream_idle_close_secs: 60,
            health_interval_ms: 1000,
            health_rise: 3,
            health_fall: 2,
            failover_hold_ms: 10_000,
            upstream_reconnect_max_ms: 30_000,
            server_name: format!("electrum-lb {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    /// `failover_hold_ms`, at most half of the request timeout: a read
    /// waiting for a held status must still get its answer in time.
    pub fn failover_hold(&self) -> Duration {
        Duration::from_millis(self.failover_hold_ms).min(self.request_timeout() / 2)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// One coin: its listeners, its upstreams and what the proxy says about it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoinConfig {
    pub listen: Vec<ListenEntry>,
    pub upstreams: Vec<UpstreamEntry>,
    /// Text of `server.banner`.
    #[serde(default)]
    pub banner: Option<String>,
    /// Answer of `server.donation_address`.
    #[serde(default)]
    pub donation_address: Option<String>,
    /// Host name advertised in `server.features` `hosts`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Genesis block hash for `server.features`; learned from an upstream
    /// when not set.
    #[serde(default)]
    pub genesis_hash: Option<String>,
    /// Protocol version the proxy asks every upstream of this coin for.
    #[serde(default = "default_upstream_protocol")]
    pub upstream_protocol: String,
    /// Base58check version byte of P2PKH addresses (built-in for known coins).
    #[serde(default)]
    pub p2pkh_version: Option<u8>,
    /// Base58check version byte of P2SH addresses (built-in for known coins).
    #[serde(default)]
    pub p2sh_version: Option<u8>,
    /// Blocks an upstream may trail the best tip among this coin's upstreams
    /// before it leaves rotation.
    #[serde(default = "default_max_lag")]
    pub max_lag: u64,
    /// Most subscriptions one session may hold.
    #[serde(default = "default_max_subs_per_session")]
    pub max_subscriptions_per_session: usize,
    /// Most distinct scripthash subscriptions held for this coin.
    #[serde(default = "default_max_subs_total")]
    pub max_subscriptions_total: usize,
}

fn default_upstream_protocol() -> String {
    "1.4".into()
}
fn default_max_lag() -> u64 {
    2
}
fn default_max_subs_per_session() -> usize {
    // ElectrumX's default MAX_SUBS_PER_SESSION is 50,000.
    50_000
}
fn default_max_subs_total() -> usize {
    1_000_000
}

/// The transport of a listener or upstream URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Tcp,
    Ssl,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Ssl => "ssl",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `scheme://host:port`, split. `host` keeps no brackets for IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

impl std::str::FromStr for Url {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("`{s}` is not a URL: expected tcp://HOST:PORT or ssl://HOST:PORT")
        })?;
        let scheme = match scheme {
            "tcp" => Scheme::Tcp,
            "ssl" | "tls" => Scheme::Ssl,
            other => {
                return Err(format!(
                    "unknown scheme `{other}` in `{s}`: use tcp:// or ssl://"
                ))
            }
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(stripped) = rest.strip_prefix('[') {
            let (h, p) = stripped
                .split_once("]:")
                .ok_or_else(|| format!("`{s}`: an IPv6 address needs the form [ADDR]:PORT"))?;
            (h, p)
        } else {
            rest.rsplit_once(':')
                .ok_or_else(|| format!("`{s}` has no port"))?
        };
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
        Ok(Url {
            scheme,
            host: host.to_string(),
            port,
        })
    }
}

impl Url {
    /// The socket address of a listener URL (its host must be an IP literal).
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        let ip: std::net::IpAddr = self
            .host
            .parse()
            .map_err(|_| format!("listener host `{}` must be an IP address", self.host))?;
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// A `listen` entry: a URL string or a table with options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEntry {
    pub url: Url,
    /// Expect a PROXY protocol (v1 or v2) header on every connection.
    pub proxy_protocol: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenTable {
    url: String,
    #[serde(default)]
    proxy_protocol: bool,
}

impl TryFrom<ListenTable> for ListenEntry {
    type Error = String;
    fn try_from(t: ListenTable) -> Result<Self, String> {
        Ok(ListenEntry {
            url: t.url.parse()?,
            proxy_protocol: t.proxy_protocol,
        })
    }
}

impl TryFrom<String> for ListenEntry {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(ListenEntry {
            url: s.parse()?,
            proxy_protocol: false,
        })
    }
}

/// An `upstreams` entry: a URL string or a table with options.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamEntry {
    pub url: Url,
    /// Relative share of new requests among primaries.
    pub weight: u32,
    /// Used only while no primary upstream is healthy.
    pub backup: bool,
    /// PEM file of CA certificates to verify an `ssl://` upstream against,
    /// instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint (hex, `:` allowed) the upstream's certificate must
    /// have; replaces CA verification.
    pub fingerprint: Option<String>,
    /// Skip certificate verification entirely (logged as a warning).
    pub insecure: bool,
    pub min_connections: usize,
    pub max_connections: usize,
    /// Requests in flight on one connection before the pool uses another.
    pub max_in_flight: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamTable {
    url: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default = "default_min_connections")]
    min_connections: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
}

fn default_weight() -> u32 {
    1
}
fn default_min_connections() -> usize {
    1
}
fn default_max_connections() -> usize {
    4
}
fn default_max_in_flight() -> usize {
    256
}

impl TryFrom<UpstreamTable> for UpstreamEntry {
    type Error = String;
    fn try_from(t: UpstreamTable) -> Result<Self, String> {
        Ok(UpstreamEntry {
            url: t.url.parse()?,
            weight: t.weight,
            backup: t.backup,
            ca_file: t.ca_file,
            fingerprint: t.fingerprint,
            insecure: t.insecure,
            min_connections: t.min_connections,
            max_connections: t.max_connections,
            max_in_flight: t.max_in_flight,
        })
    }
}

impl TryFrom<String> for UpstreamEntry {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        UpstreamTable {
            url: s,
            weight: default_weight(),
            backup: false,
            ca_file: None,
            fingerprint: None,
            insecure: false,
            min_connections: default_min_connections(),
            max_connections: default_max_connections(),
            max_in_flight: default_max_in_flight(),
        }
        .try_into()
    }
}

/// Deserialize "a URL string or a table" into `T` with readable errors
/// (an untagged enum would only say "did not match any variant").
fn string_or_table<'de, D, T, Tab>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<String, Error = String> + TryFrom<Tab, Error = String>,
    Tab: Deserialize<'de>,
{
    struct V<T, Tab>(std::marker::PhantomData<(T, Tab)>);
    impl<'de, T, Tab> Visitor<'de> for V<T, Tab>
    where
        T: TryFrom<String, Error = String> + TryFrom<Tab, Error = String>,
        Tab: Deserialize<'de>,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a URL string or a table with `url`")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            T::try_from(s.to_string()).map_err(E::custom)
        }
        fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<T, M::Error> {
            let table = Tab::deserialize(de::value::MapAccessDeserializer::new(map))?;
            T::try_from(table).map_err(de::Error::custom)
        }
    }
    d.deserialize_any(V::<T, Tab>(std::marker::PhantomData))
}

impl<'de> Deserialize<'de> for ListenEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_table::<D, ListenEntry, ListenTable>(d)
    }
}

impl<'de> Deserialize<'de> for UpstreamEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_table::<D, UpstreamEntry, UpstreamTable>(d)
    }
}

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl Config {
    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    /// Parse and validate TOML text; `file` only labels errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            let place = format!("line {line}, column {col}");
            let key = match e.span().and_then(|s| key_at(text, s.start)) {
                Some(key) => format!("{key} ({place})"),
                None => place,
            };
            ConfigError {
                file: file.to_string(),
                key,
                reason: e.message().to_string(),
            }
        })?;
        config.validate().map_err(|(key, reason)| ConfigError {
            file: file.to_string(),
            key,
            reason,
        })?;
        Ok(config)
    }

    /// Reject contradictions, naming the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let s = &self.server;
        if s.max_line_bytes < 1024 {
            return Err((
                "server.max_line_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        if s.session_queue == 0 {
            return Err(("server.session_queue".into(), "must be at least 1".into()));
        }
        if s.request_timeout_secs == 0 {
            return Err((
                "server.request_timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if s.handshake_timeout_secs == 0 {
            return Err((
                "server.handshake_timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if s.upstream_stall_secs == 0
            || s.upstream_ping_secs == 0
            || s.upstream_connect_timeout_secs == 0
        {
            return Err((
                "server.upstream_*_secs".into(),
                "upstream_ping_secs, upstream_stall_secs and upstream_connect_timeout_secs must be at least 1".into(),
            ));
        }
        if s.upstream_reconnect_max_ms < 200 {
            return Err((
                "server.upstream_reconnect_max_ms".into(),
                "must be at least 200 (the first retry comes after 200 ms)".into(),
            ));
        }
        if s.health_interval_ms < 10 || s.upstream_idle_close_secs == 0 {
            return Err((
                "server.health_interval_ms".into(),
                "health_interval_ms must be at least 10 and upstream_idle_close_secs at least 1"
                    .into(),
            ));
        }
        if s.max_batch == 0 {
            return Err(("server.max_batch".into(), "must be at least 1".into()));
        }
        if self.coins.is_empty() {
            return Err(("coins".into(), "no coin is configured".into()));
        }
        let mut bound: BTreeMap<SocketAddr, String> = BTreeMap::new();
        bound.insert(self.metrics.listen, "metrics.listen".into());
        for (name, coin) in &self.coins {
            let key = |k: &str| format!("coins.{name}.{k}");
            if coin.listen.is_empty() {
                return Err((key("listen"), "needs at least one listener".into()));
            }
            for (i, l) in coin.listen.iter().enumerate() {
                let addr = l
                    .url
                    .socket_addr()
                    .map_err(|e| (format!("{}[{i}]", key("listen")), e))?;
                if l.url.scheme == Scheme::Ssl && self.tls.is_none() {
                    return Err((
                        format!("{}[{i}]", key("listen")),
                        "an ssl:// listener needs a [tls] table with cert and key".into(),
                    ));
                }
                if addr.port() != 0 {
                    if let Some(prev) = bound.insert(addr, format!("{}[{i}]", key("listen"))) {
                        return Err((
                            format!("{}[{i}]", key("listen")),
                            format!("address {addr} is already used by {prev}"),
                        ));
                    }
                }
            }
            if coin.upstreams.is_empty() {
                return Err((key("upstreams"), "needs at least one upstream".into()));
            }
            for (i, u) in coin.upstreams.iter().enumerate() {
                let k = format!("{}[{i}]", key("upstreams"));
                if u.max_in_flight == 0 {
                    return Err((format!("{k}.max_in_flight"), "must be at least 1".into()));
                }
                if u.max_connections == 0 || u.min_connections > u.max_connections {
                    return Err((
                        format!("{k}.max_connections"),
                        "must be at least 1 and at least min_connections".into(),
                    ));
                }
                if u.weight == 0 {
                    return Err((format!("{k}.weight"), "must be at least 1".into()));
                }
                let tls_opts = u.ca_file.is_some() || u.fingerprint.is_some() || u.insecure;
                if u.url.scheme == Scheme::Tcp && tls_opts {
                    return Err((
                        k,
                        "ca_file, fingerprint and insecure apply only to ssl:// upstreams".into(),
                    ));
                }
                let modes = [u.ca_file.is_some(), u.fingerprint.is_some(), u.insecure]
                    .iter()
                    .filter(|b| **b)
                    .count();
                if modes > 1 {
                    return Err((k, "choose one of ca_file, fingerprint and insecure".into()));
                }
                if let Some(fp) = &u.fingerprint {
                    crate::tls::parse_fingerprint(fp)
                        .map_err(|e| (format!("{k}.fingerprint"), e))?;
                }
            }
            if !coin.upstream_protocol.starts_with("1.") {
                return Err((
                    key("upstream_protocol"),
                    "must be a protocol version such as \"1.4\"".into(),
                ));
            }
            if let Some(g) = &coin.genesis_hash {
                if g.len() != 64 || hex::decode(g).is_err() {
                    return Err((key("genesis_hash"), "must be 64 hex digits".into()));
                }
            }
            if coin.max_subscriptions_per_session == 0 {
                return Err((
                    key("max_subscriptions_per_session"),
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The dotted key whose value sits at `offset`: the last `[table]` header
/// above it, plus the `key =` on its own line. `None` when the error is not
/// inside a `key = value` line (a bad header, say), where line and column
/// say enough.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(text.len());
    let line = &text[line_start..line_end];
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty()
        || key.starts_with('#')
        || key.starts_with('[')
        || key.contains(char::is_whitespace)
    {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    // Inside an inline table (`{ url = ..., weight = "x" }`), name the
    // member too: the last `name =` before the error.
    let mut key = key.to_string();
    let before = &text[line_start..offset];
    if let Some(brace) = before.rfind('{') {
        if let Some(eq) = before[brace..].rfind('=') {
            let inner = before[brace..brace + eq]
                .rsplit([',', '{'])
                .next()
                .unwrap_or("")
                .trim();
            if !inner.is_empty() && !inner.contains(char::is_whitespace) {
                key = format!("{key}.{inner}");
            }
        }
    }
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[coins.test]
listen = ["tcp://127.0.0.1:0"]
upstreams = ["tcp://127.0.0.1:1"]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.server.max_line_bytes, 1024 * 1024);
        assert_eq!(c.server.request_timeout_secs, 30);
        assert_eq!(c.metrics.listen.port(), 9105);
        let coin = &c.coins["test"];
        assert_eq!(coin.upstreams[0].max_in_flight, 256);
        assert_eq!(coin.upstream_protocol, "1.4");
        assert_eq!(c.server.failover_hold(), Duration::from_secs(10));
    }

    #[test]
    fn failover_hold_is_capped_by_the_request_timeout() {
        let c = Config::parse(
            &format!("[server]\nrequest_timeout_secs = 5\n{MINIMAL}"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.server.failover_hold(), Duration::from_millis(2500));
        let c = Config::parse(
            &format!("[server]\nfailover_hold_ms = 0\n{MINIMAL}"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.server.failover_hold(), Duration::ZERO);
    }

    #[test]
    fn urls() {
        let u: Url = "ssl://[::1]:50002".parse().unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Ssl, "::1", 50002)
        );
        assert_eq!(u.to_string(), "ssl://[::1]:50002");
        let u: Url = "tcp://onix.araguaneybits.com:50001".parse().unwrap();
        assert_eq!(u.host, "onix.araguaneybits.com");
        assert!("http://x:1".parse::<Url>().is_err());
        assert!("tcp://x".parse::<Url>().is_err());
        assert!("tcp://x:99999".parse::<Url>().is_err());
        assert!("x:1".parse::<Url>().is_err());
    }

    #[test]
    fn upstream_table_form() {
        let text = r#"
[coins.test]
listen = [{ url = "tcp://127.0.0.1:0", proxy_protocol = true }]
upstreams = ["tcp://a:1", { url = "ssl://b:2", insecure = true, backup = true, weight = 3 }]
"#;
        let c = Config::parse(text, "t.toml").unwrap();
        let coin = &c.coins["test"];
        assert!(coin.listen[0].proxy_protocol);
        assert!(coin.upstreams[1].insecure && coin.upstreams[1].backup);
        assert_eq!(coin.upstreams[1].weight, 3);
    }

    fn err(text: &str) -> String {
        Config::parse(text, "bad.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = err(
            "[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\nbogus = 1\n",
        );
        assert!(
            e.starts_with("bad.toml: coins.x.bogus (line 4, column 1): unknown field `bogus`"),
            "{e}"
        );
        let e = err("[server]\nrequest_timeout_secs = \"soon\"\n[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(
            e.starts_with(
                "bad.toml: server.request_timeout_secs (line 2, column 24): invalid type"
            ),
            "{e}"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [{ url = \"tcp://a:1\", weight = \"x\" }]\n");
        assert!(e.starts_with("bad.toml: coins.x.upstreams.weight ("), "{e}");
        let e = err("[coins.x]\nlisten = [\"udp://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(e.contains("unknown scheme `udp`"), "{e}");
        let e = err("[coins.x]\nlisten = [\"ssl://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert_eq!(
            e,
            "bad.toml: coins.x.listen[0]: an ssl:// listener needs a [tls] table with cert and key"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = []\n");
        assert_eq!(
            e,
            "bad.toml: coins.x.upstreams: needs at least one upstream"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://localhost:1\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(
            e.contains("coins.x.listen[0]: listener host `localhost` must be an IP address"),
            "{e}"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:5\"]\nupstreams = [{url=\"ssl://a:1\", insecure=true, fingerprint=\"00\"}]\n");
        assert!(e.contains("choose one of"), "{e}");
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:5\", \"tcp://127.0.0.1:5\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(e.contains("already used by coins.x.listen[0]"), "{e}");
        assert_eq!(err(""), "bad.toml: coins: no coin is configured");
    }

    #[test]
    fn shipped_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
