//! The process-wide tables: `[server]` (sessions, timeouts, upstream
//! connection behaviour), `[metrics]`, `[tls]` and `[cache]`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Scripthashes read but subscribed by no wallet that the hub may
    /// subscribe to itself, per coin, so their reads are answered from
    /// memory between status changes (see `cache::answers`); 0: none.
    pub read_subscriptions: usize,
    /// A read-driven subscription not read for this long is dropped (and
    /// unsubscribed upstream).
    pub read_subscription_idle_secs: u64,
}

impl CacheConfig {
    /// Contradictions, naming the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.read_subscriptions > 0 && self.read_subscription_idle_secs == 0 {
            return Err((
                "cache.read_subscription_idle_secs".into(),
                "must be at least 1 when read_subscriptions is set".into(),
            ));
        }
        Ok(())
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            reorg_margin: 6,
            fee_ttl_secs: 5,
            read_subscriptions: 1000,
            read_subscription_idle_secs: 300,
        }
    }
}

/// `[metrics]`: the side HTTP port and who may read it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Side HTTP port for the status page, `/status.json`, `/metrics`,
    /// `/healthz`, `/readyz`.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
    /// Basic-auth user name. With a password (or its hash) set, every path
    /// but those in `open_paths` asks for these credentials.
    pub username: Option<String>,
    /// The password, in clear (keep the file readable by the service only).
    pub password: Option<String>,
    /// Or its SHA-256, hex (`printf %s 'secret' | sha256sum`).
    pub password_sha256: Option<String>,
    /// Paths served without credentials even when they are set: by default
    /// what Prometheus and health probes read.
    #[serde(default = "default_open_paths")]
    pub open_paths: Vec<String>,
}

/// Paths `open_paths` may name.
pub const ADMIN_PATHS: [&str; 5] = ["/", "/status.json", "/metrics", "/healthz", "/readyz"];

fn default_open_paths() -> Vec<String> {
    ["/metrics", "/healthz", "/readyz"]
        .map(String::from)
        .to_vec()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
            username: None,
            password: None,
            password_sha256: None,
            open_paths: default_open_paths(),
        }
    }
}

/// Never prints a password (the effective configuration is logged).
impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<hidden>");
        f.debug_struct("MetricsConfig")
            .field("listen", &self.listen)
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("password_sha256", &hidden(&self.password_sha256))
            .field("open_paths", &self.open_paths)
            .finish()
    }
}

impl MetricsConfig {
    /// Whether credentials are configured.
    pub fn has_credentials(&self) -> bool {
        self.username.is_some()
    }

    /// Reject half-set credentials and unknown paths, naming the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((format!("metrics.{k}"), r.to_string()));
        match (&self.username, &self.password, &self.password_sha256) {
            (None, None, None) => {}
            (None, _, _) => return err("username", "a password is set but no username"),
            (Some(u), _, _) if u.is_empty() || u.contains(':') => {
                return err("username", "must be non-empty and contain no ':'")
            }
            (Some(_), None, None) => {
                return err("password", "a username needs password or password_sha256")
            }
            (Some(_), Some(_), Some(_)) => {
                return err(
                    "password_sha256",
                    "set password or password_sha256, not both",
                )
            }
            (Some(_), Some(p), None) if p.is_empty() => {
                return err("password", "must not be empty")
            }
            (Some(_), None, Some(h)) if h.len() != 64 || hex::decode(h).is_err() => {
                return err("password_sha256", "must be 64 hex digits (a SHA-256)")
            }
            _ => {}
        }
        for p in &self.open_paths {
            if !ADMIN_PATHS.contains(&p.as_str()) {
                return err(
                    "open_paths",
                    &format!("unknown path {p:?}; known: {}", ADMIN_PATHS.join(", ")),
                );
            }
        }
        Ok(())
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
    /// Seconds after SIGTERM/SIGINT during which `/readyz` answers 503 but
    /// the proxy still accepts and serves, so that a balancer's health check
    /// takes it out of rotation before it stops accepting.
    pub drain_notice_secs: u64,
    /// Seconds sessions get, once accepting has stopped, to end on their own
    /// terms (every request read answered and written); sessions still busy
    /// then are closed.
    pub shutdown_grace_secs: u64,
    /// A Unix socket through which a new process (`--takeover`) takes this
    /// one's listening sockets over for an in-place upgrade. None: off.
    pub handoff_socket: Option<PathBuf>,
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
    /// Milliseconds an upstream that pads its replies (ElectrumX 2.0) holds
    /// the small ones back after its previous packet on a connection:
    /// requests go where their answers wait least (see `upstream::hold`).
    /// 0: holds are not considered.
    pub upstream_reply_hold_ms: u64,
    /// Seconds of silence from a WebSocket client after which the proxy
    /// sends it a ping (keeps proxies and NATs from dropping an idle
    /// browser connection). 0: never.
    pub ws_ping_secs: u64,
    /// Software name reported by `server.version` and `server.features`.
    pub server_name: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_line_bytes: 1024 * 1024,
            session_queue: 1024,
            request_timeout_secs: 30,
            drain_notice_secs: 0,
            shutdown_grace_secs: 10,
            handoff_socket: None,
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
            // ElectrumX 2.0's PaddedRSTransport: 1 s.
            upstream_reply_hold_ms: 1000,
            // ElectrumX (the `websockets` library) and Fulcrum both ping
            // every 20 s.
            ws_ping_secs: 20,
            server_name: format!("electrum-lb {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn drain_notice(&self) -> Duration {
        Duration::from_secs(self.drain_notice_secs)
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
