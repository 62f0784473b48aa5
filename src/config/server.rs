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
